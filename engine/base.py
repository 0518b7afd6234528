"""The interface between the runtime and the engines. The runtime never imports model code or backend libraries.

An `Engine` runs one network: `run(feeds, stream) -> outputs`, tensors named and shaped by its `IOSpec`.
`EngineNetworks` turns four engines plus a tokenizer into what the runtime calls (`encode_prompts`, `denoise`,
`encode_frames`, `decode_latents`), splitting batches that exceed an engine's built range.
All tensors are torch tensors on `device`; layout (B, L, C, H, W); pixels in [-1, 1]; latents scaled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from nuwaxl.config import RANDOM_WEIGHTS, ModelConfig, SamplingDefaults, TrainingRecord
from nuwaxl.iospec import IOSpec
from nuwaxl.tokenizer import PromptTokenizer


class Engine(Protocol):
    spec: IOSpec | None  # None: any batch (live PyTorch modules)

    def run(self, feeds: dict[str, torch.Tensor], stream: torch.cuda.Stream | None = None) -> dict[str, torch.Tensor]:
        ...


@dataclass(frozen=True)
class NetworkSpec:
    """What the runtime must know about a set of networks."""

    config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    frames_per_call: int | None = None  # fixed by built engines; None: any L
    backend: str = "torch-eager"
    sampling: SamplingDefaults = SamplingDefaults()  # what the weights recommend; requests may override
    trained_on: TrainingRecord = RANDOM_WEIGHTS  # what the weights were trained on (resolution, words)

    @property
    def latent_shape(self) -> tuple[int, int, int]:  # (c, h, w) of one frame
        return (self.config.vae.latent_channels, self.config.latent_size, self.config.latent_size)


class EngineNetworks:
    def __init__(self, engines: dict[str, Engine], tokenizer: PromptTokenizer, spec: NetworkSpec):
        self.engines = engines
        self.tokenizer = tokenizer
        self.spec = spec

    def _run(self, name: str, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        engine = self.engines[name]
        batch = next(iter(feeds.values())).shape[0]
        step = engine.spec.batch_max if engine.spec is not None else batch
        outs = []
        for i in range(0, batch, step):  # chunks within the engine's built batch range
            (out,) = engine.run({k: v[i: i + step] for k, v in feeds.items()}).values()
            outs.append(out)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """P prompts -> (P, l_p, d_p) prompt embeddings."""
        return self._run("text_encoder", {"input_ids": self.tokenizer(prompts).to(self.spec.device)})

    def denoise(self, x_t, t, context, cond, mask) -> torch.Tensor:
        """eps_theta(x_t, p, t, x0^c, x0^m): (B, L, c, h, w), (B,), (B, L, l_p, d_p), (B, L, c, h, w),
        (B, L, 1, h, w) -> (B, L, c, h, w)."""
        return self._run("unet", {"x_t": x_t, "timesteps": t, "context": context, "cond": cond, "mask": mask})

    def denoiser(self, context, cond, mask) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """eps(x_t, t) for a batch of calls whose prompts and conditions stay fixed while they are sampled.
        Engines with a `bind` (live PyTorch modules) compute the step-invariant part once here (condition
        injection, prompt keys and values); others run the whole network at every step."""
        engine = self.engines["unet"]
        bind = getattr(engine, "bind", None)
        if bind is not None and (engine.spec is None or cond.shape[0] <= engine.spec.batch_max):
            fn = bind({"context": context, "cond": cond, "mask": mask})
            if fn is not None:
                return fn
        return lambda x_t, t: self.denoise(x_t, t, context, cond, mask)

    def release(self) -> None:
        """Free per-shape caches (CUDA graphs) after an out-of-memory error, before retrying smaller batches."""
        for engine in self.engines.values():
            if hasattr(engine, "release"):
                engine.release()

    def encode_frames(self, video: torch.Tensor) -> torch.Tensor:
        """(B, L, 3, H, W) pixels -> (B, L, c, h, w) scaled latents (posterior mean)."""
        return self._run("vae_encoder", {"video": video})

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, L, c, h, w) scaled latents -> (B, L, 3, H, W) pixels."""
        return self._run("vae_decoder", {"latents": latents})
