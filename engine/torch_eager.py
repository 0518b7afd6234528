"""Eager PyTorch backend: the reference every other backend is checked against."""

from __future__ import annotations

import torch

from nuwaxl.config import ModelConfig, preset
from nuwaxl.engine.base import NetworkSpec
from nuwaxl.errors import UserError
from nuwaxl.models.checkpoint import NuwaModels, load_checkpoint

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but no CUDA GPU is visible; use --device cpu")
    return dev


def resolve_dtype(precision: str | None, device: torch.device) -> torch.dtype:
    if precision in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in DTYPES:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[precision]


class TorchNetworks:
    def __init__(self, models: NuwaModels, device: str | None = None, precision: str | None = None,
                 resolution: int | None = None):
        dev = resolve_device(device)
        dtype = resolve_dtype(precision, dev)
        config = models.config if resolution is None else models.config.with_resolution(resolution)
        self.models = models.to(device=dev, dtype=dtype).eval()
        self.spec = NetworkSpec(config=config, device=dev, dtype=dtype)

    @classmethod
    def from_checkpoint(cls, path, **kw) -> TorchNetworks:
        return cls(load_checkpoint(path), **kw)

    @classmethod
    def from_preset(cls, name: str | ModelConfig, seed: int = 0, **kw) -> TorchNetworks:
        cfg = preset(name) if isinstance(name, str) else name
        return cls(NuwaModels.random(cfg, seed=seed), **kw)

    @torch.inference_mode()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        ids = self.models.tokenizer(prompts).to(self.spec.device)
        return self.models.text(ids).to(self.spec.dtype)

    @torch.inference_mode()
    def denoise(self, x_t, t, context, cond, mask):
        return self.models.unet(x_t, t, context, cond, mask)

    @torch.inference_mode()
    def encode_frames(self, video):
        mean, _ = self.models.vae.encode(video)
        return mean * self.spec.config.vae.scaling_factor

    @torch.inference_mode()
    def decode_latents(self, latents):
        return self.models.vae.decode(latents / self.spec.config.vae.scaling_factor)

