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


class UNetPrepareNet(nn.Module):
    """The UNet's step-invariant part, once per batch of calls: (context, cond, mask) -> the prepared tensors of
    `nuwaxl.iospec.prepared_tensors`, each (B, L, ...)."""

    def __init__(self, models: NuwaModels):
        super().__init__()
        self.unet = models.unet

    def forward(self, context, cond, mask) -> tuple[torch.Tensor, ...]:
        b, l = cond.shape[:2]
        # contiguous: engines read their inputs as dense row-major buffers (PA's keys and values are transposes)
        return tuple(t.unflatten(0, (b, l)).contiguous() for t in self.unet.prepare(context, cond, mask))


class UNetStepNet(nn.Module):
    """One denoising step: (x_t, timesteps, *prepared) -> eps."""

    def __init__(self, models: NuwaModels):
        super().__init__()
        self.unet = models.unet

    def forward(self, x_t, timesteps, *prepared) -> torch.Tensor:
        return self.unet.step(x_t, timesteps, [t.flatten(0, 1) for t in prepared])


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


def compile_regions() -> tuple[type[nn.Module], ...]:
    """The repeated blocks that torch.compile compiles one by one (regional compilation): UNet layers and VAE
    blocks. Blocks of one shape share one compiled graph, so compiling them costs a few blocks' time instead of the
    whole network's (torch's "regional compilation" recipe). Not CLIP's encoder layers: transformers builds their
    attention mask differently while a CUDA graph is being captured (a guard failure, then a recompile inside the
    capture, measured on the H200); the small text encoder is compiled whole, mask included."""
    from nuwaxl.models.unet import UNetLayer
    from nuwaxl.models.vae import AttnBlock, ResnetBlock

    return (UNetLayer, ResnetBlock, AttnBlock)


def networks(models: NuwaModels) -> dict[str, nn.Module]:
    """Every network of `nuwaxl.iospec.NETWORKS`, as a module whose arguments and outputs follow its IOSpec."""
    return {"text_encoder": TextEncoderNet(models).eval(), "unet_prepare": UNetPrepareNet(models).eval(),
            "unet_step": UNetStepNet(models).eval(), "vae_encoder": VAEEncoderNet(models).eval(),
            "vae_decoder": VAEDecoderNet(models).eval()}
