"""The interface between the runtime and the engines. The runtime never imports model code or backend libraries.

An `Engine` runs one network: `run(feeds, stream) -> outputs`, tensors named and shaped by its `IOSpec`.
`EngineNetworks` turns the engines of `nuwaxl.iospec.NETWORKS` plus a tokenizer into what the runtime calls
(`encode_prompts`, `denoiser`, `encode_frames`, `decode_latents`), splitting batches that exceed an engine's built
range. The denoiser runs `unet_prepare` once per batch of calls and binds its outputs to `unet_step`, for every
backend.
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
    """Optional: `bind(fixed) -> run(varying)` (inputs fixed over many runs, copied once: CUDA graphs),
    `capture(static) -> (replay, outputs)` (a backend's own CUDA-graph capture), `release()` (free caches)."""

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
    cuda_graphs: str = "off"  # "on", or why not (a backend that cannot be captured, a CPU device)

    @property
    def latent_shape(self) -> tuple[int, int, int]:  # (c, h, w) of one frame
        return (self.config.vae.latent_channels, self.config.latent_size, self.config.latent_size)


class EngineNetworks:
    def __init__(self, engines: dict[str, Engine], tokenizer: PromptTokenizer, spec: NetworkSpec):
        self.engines = engines
        self.tokenizer = tokenizer
        self.spec = spec

    def _chunks(self, name: str, batch: int) -> list[slice]:
        """Row ranges within the engine's built batch range."""
        spec = self.engines[name].spec
        step = spec.batch_max if spec is not None else batch
        return [slice(i, i + step) for i in range(0, batch, step)]

    def _run(self, name: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        engine = self.engines[name]
        parts = [engine.run({k: v[s] for k, v in feeds.items()})
                 for s in self._chunks(name, next(iter(feeds.values())).shape[0])]
        return parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _bind(self, name: str, fixed: dict[str, torch.Tensor]) -> Callable[[dict], dict]:
        """run(varying) for inputs `fixed` over many runs (engines with `bind` copy them once)."""
        engine = self.engines[name]
        runs = []
        for s in self._chunks(name, next(iter(fixed.values())).shape[0]):
            part = {k: v[s] for k, v in fixed.items()}
            bind = getattr(engine, "bind", None)
            runs.append((s, bind(part) if bind is not None else
                         (lambda varying, part=part: engine.run({**part, **varying}))))

        def run(varying: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            parts = [fn({k: v[s] for k, v in varying.items()}) for s, fn in runs]
            return parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

        return run

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """P prompts -> (P, l_p, d_p) prompt embeddings."""
        return self._run("text_encoder", {"input_ids": self.tokenizer(prompts).to(self.spec.device)})["embeddings"]

    def denoiser(self, context, cond, mask) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """eps(x_t, t) for a batch of calls whose prompts and conditions stay fixed while they are sampled:
        `unet_prepare` runs once here (condition injection, prompt keys and values), `unet_step` per step.
        context: (B, L, l_p, d_p); cond: (B, L, c, h, w); mask: (B, L, 1, h, w)."""
        prepared = self._run("unet_prepare", {"context": context, "cond": cond, "mask": mask})
        step = self._bind("unet_step", prepared)
        return lambda x_t, t: step({"x_t": x_t, "timesteps": t})["eps"]

    def denoise(self, x_t, t, context, cond, mask) -> torch.Tensor:
        """eps_theta(x_t, p, t, x0^c, x0^m) in one go: (B, L, c, h, w), (B,), (B, L, l_p, d_p), (B, L, c, h, w),
        (B, L, 1, h, w) -> (B, L, c, h, w)."""
        return self.denoiser(context, cond, mask)(x_t, t)

    def release(self) -> None:
        """Free per-shape caches (CUDA graphs) after an out-of-memory error, before retrying smaller batches."""
        for engine in self.engines.values():
            if hasattr(engine, "release"):
                engine.release()

    def encode_frames(self, video: torch.Tensor) -> torch.Tensor:
        """(B, L, 3, H, W) pixels -> (B, L, c, h, w) scaled latents (posterior mean)."""
        return self._run("vae_encoder", {"video": video})["latents"]

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, L, c, h, w) scaled latents -> (B, L, 3, H, W) pixels."""
        return self._run("vae_decoder", {"latents": latents})["video"]
