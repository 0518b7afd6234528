"""The four networks generation runs, as modules with tensor-only I/O in the order of `nuwaxl.iospec`.

These are what gets exported to ONNX, compiled by AOTInductor, and run eagerly: one definition for every backend.
Latent scaling (LDM's scaling_factor) lives inside the VAE wrappers, so every backend sees scaled latents.
"""

from __future__ import annotations

import torch
from torch import nn

from nuwaxl.models.checkpoint import NuwaModels


class TextEncoderNet(nn.Module):
    def __init__(self, models: NuwaModels):
        super().__init__()
        self.text = models.text

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids)


class UNetNet(nn.Module):
    def __init__(self, models: NuwaModels):
        super().__init__()
        self.unet = models.unet

    def forward(self, x_t, timesteps, context, cond, mask):
        return self.unet(x_t, timesteps, context, cond, mask)

    # Live-module engines split the network: `prepare` once per batch of calls, `step` once per denoising step.
    def prepare(self, context, cond, mask) -> list[torch.Tensor]:
        return self.unet.prepare(context, cond, mask)

    def step(self, x_t, timesteps, *prepared) -> torch.Tensor:
        return self.unet.step(x_t, timesteps, list(prepared))


class VAEEncoderNet(nn.Module):
    def __init__(self, models: NuwaModels):
        super().__init__()
        self.vae = models.vae
        self.scale = models.config.vae.scaling_factor

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        mean, _ = self.vae.encode(video)  # the posterior mean: conditions are deterministic
        return mean * self.scale


class VAEDecoderNet(nn.Module):
    def __init__(self, models: NuwaModels):
        super().__init__()
        self.vae = models.vae
        self.scale = models.config.vae.scaling_factor

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scale)


def networks(models: NuwaModels) -> dict[str, nn.Module]:
    return {"text_encoder": TextEncoderNet(models).eval(), "unet": UNetNet(models).eval(),
            "vae_encoder": VAEEncoderNet(models).eval(), "vae_decoder": VAEDecoderNet(models).eval()}
