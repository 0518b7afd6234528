"""Mask 3D-UNet (MTD, paper section 3.2, Fig. 3).

Every layer: [skip concat (up blocks, Eq. 6)] -> ResBlock (timestep added, Eq. 7; spatial then temporal conv,
Eq. 8-9) -> visual-condition and mask injection (Eq. 10-11) -> SA, PA, TA (Eq. 12-15).
The visual condition x0^c reaches each resolution through a cascade of convolutions; the binary mask x0^m through
max-pooling. Injection is switchable per the paper's ablation: MI (every scale vs. only the highest) and SI
(down and up blocks vs. only up blocks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nuwaxl.config import UNetConfig
from nuwaxl.models.layers import Attention, STConv, TemporalAttention, each_module, fused_linear, timestep_embedding


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int, temporal: bool):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = STConv(cin, cout, temporal)
        self.temb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = STConv(cout, cout, temporal)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor, num_frames: int) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), num_frames)
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]  # Eq. 7: h := h + t
        h = self.conv2(F.silu(self.norm2(h)), num_frames)
        return self.skip(x) + h


class ConditionInjection(nn.Module):
    """Eq. 10-11: zero-initialised convolutions turn x0^c and x0^m into scale and shift; a no-op at init."""

    def __init__(self, channels: int, cond_channels: int):
        super().__init__()
        self.cond = nn.Conv2d(cond_channels, 2 * channels, 1)
        self.mask = nn.Conv2d(1, 2 * channels, 1)
        for conv in (self.cond, self.mask):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def affine(self, cond: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 10-11 folded into one affine map h -> scale * h + shift. It depends only on x0^c and x0^m, which
        are fixed during sampling, so it is computed once per call rather than at every denoising step:
        h' = w_c h + b_c + h, h'' = w_m h' + b_m + h'  =>  scale = (1 + w_m)(1 + w_c), shift = (1 + w_m) b_c + b_m."""
        w_c, b_c = self.cond(cond).chunk(2, dim=1)
        w_m, b_m = self.mask(mask).chunk(2, dim=1)
        gain = 1.0 + w_m
        return gain * (1.0 + w_c), gain * b_c + b_m

    @staticmethod
    def apply(h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(shift, scale, h)

    def forward(self, h: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.apply(h, *self.affine(cond, mask))


class SpaceTimeTransformer(nn.Module):
    """SA over the H*W tokens of each frame, PA to that frame's prompt, TA over frames, then a feed-forward."""

    # What the matrix products of the feed-forward and the output projection do in their epilogues
    # (`models.layers.fused_linear`): "none" (bias only; what eager runs and ONNX exports), "gelu" (the first
    # feed-forward product's GELU too: one cuBLASLt call instead of a GEMM and a memory-bound GELU kernel over the 4C
    # hidden features), "gelu-residual" (also the two residual additions after the feed-forward and the output
    # projection, as the products' C input). The same function up to GELU's tanh approximation on CUDA (tested).
    EPILOGUES = ("none", "gelu", "gelu-residual")
    epilogues = "none"

    def __init__(self, channels: int, num_heads: int, context_dim: int, groups: int, temporal: bool):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.proj_in = nn.Linear(channels, channels)
        self.norm_sa = nn.LayerNorm(channels)
        self.self_attn = Attention(channels, num_heads)
        self.norm_pa = nn.LayerNorm(channels)
        self.cross_attn = Attention(channels, num_heads, context_dim=context_dim)
        self.temporal = TemporalAttention(channels, num_heads) if temporal else None
        self.norm_ff = nn.LayerNorm(channels)
        self.ff = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels))
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], num_frames: int) -> torch.Tensor:
        """kv: the prompt's keys and values for PA, `self.cross_attn.kv(context)` (fixed during sampling)."""
        bl, c, hh, ww = x.shape
        # (B*L, HW, C): the same view as reshape + transpose(1, 2), and in an ONNX graph a Transpose right after the
        # GroupNorm, which ONNX Runtime's channels-last GroupNorm then cancels
        h = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(bl, hh * ww, c))
        h = h + self.self_attn(self.norm_sa(h))  # Eq. 12-13
        h = h + self.cross_attn(self.norm_pa(h), kv=kv)  # Eq. 14-15, context (B*L, l_p, d_p)
        if self.temporal is not None:
            h = self.temporal(h, num_frames)
        if self.epilogues == "gelu-residual":
            up, _, down = self.ff
            h = fused_linear(fused_linear(self.norm_ff(h), up, gelu=True), down, residual=h)
            # x is channels-last in the packages: its (B*L, H, W, C) view has the rows of proj_out's output
            out = fused_linear(h, self.proj_out, residual=x.permute(0, 2, 3, 1))
            return out.reshape(bl, hh, ww, c).permute(0, 3, 1, 2)
        h = h + self.feed_forward(self.norm_ff(h))
        return x + self.proj_out(h).reshape(bl, hh, ww, c).permute(0, 3, 1, 2)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.epilogues == "none":
            return self.ff(x)
        up, _, down = self.ff
        return down(fused_linear(x, up, gelu=True))


def matmul_epilogues(module: nn.Module, epilogues: str):
    """Run every `SpaceTimeTransformer` of `module` with `epilogues` (one of `SpaceTimeTransformer.EPILOGUES`)
    inside the block."""
    return each_module(module, SpaceTimeTransformer, "epilogues", epilogues, SpaceTimeTransformer.EPILOGUES)


class UNetLayer(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: UNetConfig, temb_dim: int, attention: bool, inject: bool):
        super().__init__()
        self.res = ResBlock(cin, cout, temb_dim, cfg.norm_groups, cfg.temporal)
        self.inject = ConditionInjection(cout, cout) if inject else None
        self.attn = (SpaceTimeTransformer(cout, cfg.num_heads, cfg.context_dim, cfg.norm_groups, cfg.temporal)
                     if attention else None)

    @property
    def num_prepared(self) -> int:
        return 2 * (self.inject is not None) + 2 * (self.attn is not None)

    def prepare(self, context, cond, mask) -> list[torch.Tensor]:
        """This layer's step-invariant tensors: injection scale and shift, PA keys and values (0, 2 or 4)."""
        out = list(self.inject.affine(cond, mask)) if self.inject is not None else []
        if self.attn is not None:
            out += self.attn.cross_attn.kv(context)
        return out

    def forward(self, h, temb, prepared: list[torch.Tensor], num_frames):
        """prepared: what `prepare` returned, in that order."""
        h = self.res(h, temb, num_frames)
        i = 0
        if self.inject is not None:
            h = self.inject.apply(h, prepared[0], prepared[1])
            i = 2
        if self.attn is not None:
            h = self.attn(h, (prepared[i], prepared[i + 1]), num_frames)
        return h


class MaskUNet3D(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, t, n = cfg.channels, cfg.temporal, len(cfg.channels)
        temb_dim = 4 * ch[0]
        self.time_embed = nn.Sequential(nn.Linear(ch[0], temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = STConv(cfg.latent_channels, ch[0], t)

        # Visual condition cascade: x0^c at latent resolution -> features at every level's resolution.
        self.cond_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.cond_down = nn.ModuleList(nn.Conv2d(ch[i - 1], ch[i], 3, stride=2, padding=1) for i in range(1, n))

        plan = cfg.layer_plan()
        down = [p for p in plan if p.block == "down"]
        up = [p for p in plan if p.block == "up"]
        self.down = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        skip_channels = [ch[0]]
        cin = ch[0]
        for i, cout in enumerate(ch):
            layers = nn.ModuleList()
            for p in down[i * cfg.num_res_blocks: (i + 1) * cfg.num_res_blocks]:
                layers.append(UNetLayer(cin, cout, cfg, temb_dim, p.attention, p.inject))
                cin = cout
                skip_channels.append(cout)
            self.down.append(layers)
            if i < n - 1:
                self.downsamples.append(STConv(cout, cout, t, stride=2))
                skip_channels.append(cout)

        self.mid = nn.ModuleList(UNetLayer(ch[-1], ch[-1], cfg, temb_dim, p.attention, p.inject)
                                 for p in plan if p.block == "mid")

        self.up = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        per_level = cfg.num_res_blocks + 1
        for k, i in enumerate(reversed(range(n))):
            cout = ch[i]
            layers = nn.ModuleList()
            for p in up[k * per_level: (k + 1) * per_level]:
                layers.append(UNetLayer(cin + skip_channels.pop(), cout, cfg, temb_dim, p.attention, p.inject))
                cin = cout
            self.up.append(layers)
            if i > 0:
                self.upsamples.append(STConv(cout, cout, t))
        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch[0])
        self.conv_out = STConv(ch[0], cfg.latent_channels, t)

    def layers(self) -> list[tuple[UNetLayer, int]]:
        """Every UNetLayer in execution order (`UNetConfig.layer_plan`), with the resolution level of its
        conditions."""
        modules = [layer for blocks in (self.down, [self.mid], self.up) for layers in blocks for layer in layers]
        return [(layer, p.level) for layer, p in zip(modules, self.cfg.layer_plan(), strict=True)]

    def prepare(self, context: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Everything that stays fixed while a call is sampled, computed once per call instead of once per step:
        the condition cascade folded into every layer's injection scale and shift, and PA's prompt keys and
        values. context: (B, L, l_p, d_p); cond: (B, L, c, h, w); mask: (B, L, 1, h, w). A flat tensor list."""
        context = context.flatten(0, 1)  # (B*L, l_p, d_p): frames as batch for PA
        conds, masks = [self.cond_in(cond.flatten(0, 1))], [mask.flatten(0, 1)]
        for conv in self.cond_down:
            conds.append(conv(F.silu(conds[-1])))
            masks.append(F.max_pool2d(masks[-1], 2))
        return [t for layer, i in self.layers() for t in layer.prepare(context, conds[i], masks[i])]

    def step(self, x: torch.Tensor, timesteps: torch.Tensor, prepared: list[torch.Tensor]) -> torch.Tensor:
        """One denoising step given `prepare`'s tensors: (B, L, c, h, w), (B,) -> eps (B, L, c, h, w)."""
        b, l = x.shape[:2]
        temb = self.time_embed(timestep_embedding(timesteps, self.cfg.channels[0]).to(x.dtype))
        temb = temb.repeat_interleave(l, dim=0)  # (B*L, temb_dim)
        chunks, k = [], 0
        for layer, _ in self.layers():
            chunks.append(prepared[k: k + layer.num_prepared])
            k += layer.num_prepared
        if k != len(prepared):
            raise ValueError(f"{len(prepared)} prepared tensors given, the layers take {k}")
        chunks.reverse()  # popped in execution order

        h = self.conv_in(x.flatten(0, 1), l)
        skips = [h]
        for i, layers in enumerate(self.down):
            for layer in layers:
                h = layer(h, temb, chunks.pop(), l)
                skips.append(h)
            if i < len(self.downsamples):
                h = self.downsamples[i](h, l)
                skips.append(h)
        for layer in self.mid:
            h = layer(h, temb, chunks.pop(), l)
        for k, layers in enumerate(self.up):
            for layer in layers:
                h = layer(torch.cat([skips.pop(), h], dim=1), temb, chunks.pop(), l)  # Eq. 6
            if k < len(self.upsamples):
                h = self.upsamples[k](F.interpolate(h, scale_factor=2.0, mode="nearest"), l)
        out = self.conv_out(F.silu(self.norm_out(h)), l)
        return out.unflatten(0, (b, l))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, cond: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """Predict the noise eps_theta(x_t, p, t, x0^c) of Eq. 5.

        x, cond: (B, L, c, h, w); timesteps: (B,); context: (B, L, l_p, d_p) per-frame prompt embeddings;
        mask: (B, L, 1, h, w), 1 where the frame is a visual condition. Returns (B, L, c, h, w).
        """
        return self.step(x, timesteps, self.prepare(context, cond, mask))
