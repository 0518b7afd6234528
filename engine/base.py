"""The interface the runtime talks to. The runtime never imports model definitions or backend libraries.

All tensors are torch tensors on `device`; layout (B, L, C, H, W); pixels in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from nuwaxl.config import ModelConfig


@dataclass(frozen=True)
class NetworkSpec:
    """What the runtime must know about a set of networks: taken from the checkpoint's config."""

    config: ModelConfig
    device: torch.device
    dtype: torch.dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:  # (c, h, w) of one frame
        return (self.config.vae.latent_channels, self.config.latent_size, self.config.latent_size)


class Networks(Protocol):
    spec: NetworkSpec

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """P prompts -> (P, l_p, d_p) prompt embeddings."""

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, cond: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """eps_theta(x_t, p, t, x0^c, x0^m): (B, L, c, h, w), (B,), (B, L, l_p, d_p), (B, L, c, h, w),
        (B, L, 1, h, w) -> (B, L, c, h, w)."""

    def encode_frames(self, video: torch.Tensor) -> torch.Tensor:
        """(B, L, 3, H, W) pixels -> (B, L, c, h, w) scaled latents (posterior mean)."""

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, L, c, h, w) scaled latents -> (B, L, 3, H, W) pixels."""
