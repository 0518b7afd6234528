"""T-KLVAE (paper section 3.1): the LDM KL autoencoder with temporal layers.

A temporal convolution follows every spatial 3x3 convolution (identity init, Eq. 1) and a temporal attention
follows the spatial attention (zero-initialised output, Eq. 2), in encoder and decoder. With `temporal=False`
the same module tree minus the temporal layers is the image KLVAE, so at init both compute the same function.
Pixels are in [-1, 1], layout (B, L, 3, H, W); latents (B, L, c, H/f, W/f).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nuwaxl.config import VAEConfig
from nuwaxl.models.layers import Attention, STConv, TemporalAttention


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, temporal: bool):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = STConv(cin, cout, temporal)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = STConv(cout, cout, temporal)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), num_frames)
        h = self.conv2(F.silu(self.norm2(h)), num_frames)
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention (LDM), then temporal attention when enabled."""

    def __init__(self, channels: int, groups: int, temporal: bool):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.attn = Attention(channels, num_heads=1)
        self.temporal = TemporalAttention(channels, num_heads=1) if temporal else None

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        bl, c, h, w = x.shape
        tokens = self.norm(x).reshape(bl, c, h * w).transpose(1, 2)  # (B*L, HW, C)
        out = x.reshape(bl, c, h * w).transpose(1, 2) + self.attn(tokens)
        if self.temporal is not None:
            out = self.temporal(out, num_frames)
        # contiguous NCHW either way: the next conv then runs the same kernel with or without temporal layers
        return out.transpose(1, 2).reshape(bl, c, h, w).contiguous()


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, temporal: bool):
        super().__init__()
        self.res1 = ResnetBlock(channels, channels, groups, temporal)
        self.attn = AttnBlock(channels, groups, temporal)
        self.res2 = ResnetBlock(channels, channels, groups, temporal)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x, num_frames), num_frames), num_frames)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, t = cfg.channels, cfg.norm_groups, cfg.temporal
        self.conv_in = STConv(cfg.in_channels, ch[0], t)
        self.blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        cin = ch[0]
        for i, cout in enumerate(ch):
            self.blocks.append(nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, g, t)
                                             for j in range(cfg.num_res_blocks)))
            cin = cout
            if i < len(ch) - 1:
                self.downsamples.append(STConv(cout, cout, t, stride=2))
        self.mid = MidBlock(ch[-1], g, t)
        self.norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = STConv(ch[-1], 2 * cfg.latent_channels, t)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        h = self.conv_in(x, num_frames)
        for i, block in enumerate(self.blocks):
            for res in block:
                h = res(h, num_frames)
            if i < len(self.downsamples):
                h = self.downsamples[i](h, num_frames)
        h = self.mid(h, num_frames)
        return self.conv_out(F.silu(self.norm_out(h)), num_frames)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, t = cfg.channels, cfg.norm_groups, cfg.temporal
        self.conv_in = STConv(cfg.latent_channels, ch[-1], t)
        self.mid = MidBlock(ch[-1], g, t)
        self.blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        cin = ch[-1]
        for i, cout in reversed(list(enumerate(ch))):
            self.blocks.append(nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, g, t)
                                             for j in range(cfg.num_res_blocks + 1)))
            cin = cout
            if i > 0:
                self.upsamples.append(STConv(cout, cout, t))
        self.norm_out = nn.GroupNorm(g, ch[0], eps=1e-6)
        self.conv_out = STConv(ch[0], cfg.in_channels, t)

    def forward(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        h = self.mid(self.conv_in(z, num_frames), num_frames)
        for i, block in enumerate(self.blocks):
            for res in block:
                h = res(h, num_frames)
            if i < len(self.upsamples):
                h = self.upsamples[i](F.interpolate(h, scale_factor=2.0, mode="nearest"), num_frames)
        return self.conv_out(F.silu(self.norm_out(h)), num_frames)


class TKLVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, 3, H, W) pixels in [-1, 1] -> posterior mean and log-variance, each (B, L, c, h, w)."""
        b, l = video.shape[:2]
        moments = self.quant_conv(self.encoder(video.flatten(0, 1), l))
        mean, logvar = moments.chunk(2, dim=1)
        return mean.unflatten(0, (b, l)), logvar.clamp(-30.0, 20.0).unflatten(0, (b, l))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, L, c, h, w) unscaled latents -> (B, L, 3, H, W) pixels in about [-1, 1]."""
        b, l = z.shape[:2]
        return self.decoder(self.post_quant_conv(z.flatten(0, 1)), l).unflatten(0, (b, l))

    def forward(self, video: torch.Tensor, sample_posterior: bool = True) -> tuple[torch.Tensor, ...]:
        """Reconstruction for training: returns (reconstruction, mean, logvar)."""
        mean, logvar = self.encode(video)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar) if sample_posterior else mean
        return self.decode(z), mean, logvar
