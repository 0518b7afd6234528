"""Factorized space-time layers shared by the T-KLVAE and the Mask 3D-UNet.

Hidden states travel as (B*L, C, H, W) so spatial layers treat frames as batch (paper Eq. 8);
temporal layers fold space into batch instead (Eq. 9, and TA after Eq. 15). `num_frames` = L.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn


class TemporalConv(nn.Module):
    """1-D convolution over frames, initialised to the identity (paper Eq. 1)."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        # A (k,1,1) Conv3d is exactly a Conv1d over L applied at every pixel, and exports cleanly to ONNX.
        self.conv = nn.Conv3d(channels, channels, (kernel_size, 1, 1), padding=(kernel_size // 2, 0, 0))
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            for i in range(channels):
                self.conv.weight[i, i, kernel_size // 2, 0, 0] = 1.0

    # How `forward` lays the frames out: "volume" runs the Conv3d on (B, C, L, H, W); "frames-as-height" runs the
    # same weights as a (k, 1) 2-D convolution on the channels-last hidden state read as an image of height L and
    # width H*W, (B, L, H*W, C) -- a reshape of (B*L, H, W, C), so a graph that keeps its convolutions channels-last
    # (ONNX Runtime's NhwcConv) needs no transposes around it. "frames-as-matmul" (the T-KLVAE's packages: cuDNN runs
    # its full-resolution (k, 1) convolutions in a slow kernel; engine.torch_backend.TEMPORAL_CONV) reads the same
    # (B, L, H*W, C) rows, puts the k frame-shifted copies side by side (zero frames at the ends) and multiplies them
    # by the weights as one (k*C, C) matrix. The same function every way (tested).
    LAYOUTS = ("volume", "frames-as-height", "frames-as-matmul")
    layout = "volume"

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        bl, c, h, w = x.shape
        if self.layout in ("frames-as-height", "frames-as-matmul"):
            rows = x.permute(0, 2, 3, 1).reshape(bl // num_frames, num_frames, h * w, c)  # (B, L, H*W, C)
            if self.layout == "frames-as-matmul":
                k = self.conv.kernel_size[0]
                padded = F.pad(rows, (0, 0, 0, 0, k // 2, k // 2))
                shifted = torch.cat([padded[:, j: j + num_frames] for j in range(k)], dim=-1)  # (B, L, H*W, k*C)
                y = torch.addmm(self.conv.bias, shifted.reshape(-1, k * c), self.frames_matrix)
                return y.reshape(bl, h, w, c).permute(0, 3, 1, 2)
            y = self.frames_conv(rows.permute(0, 3, 1, 2))  # (B, C, L, H*W)
            return y.permute(0, 2, 3, 1).reshape(bl, h, w, c).permute(0, 3, 1, 2)
        x5 = x.reshape(bl // num_frames, num_frames, c, h, w).transpose(1, 2)  # (B, C, L, H, W)
        return self.conv(x5).transpose(1, 2).reshape(bl, c, h, w)


@contextlib.contextmanager
def each_module(module: nn.Module, kind: type[nn.Module], attr: str, value: str, choices: tuple[str, ...]):
    """Inside the block, every `kind` submodule of `module` has `attr` = `value` (one of `choices`); afterwards the
    class default again. Yields those submodules."""
    if value not in choices:
        raise ValueError(f"unknown {kind.__name__} {attr} {value!r}; use one of {choices}")
    found = [m for m in module.modules() if isinstance(m, kind)]
    try:
        for m in found:
            setattr(m, attr, value)
        yield found
    finally:
        for m in found:
            m.__dict__.pop(attr, None)


@contextlib.contextmanager
def temporal_conv_layout(module: nn.Module, layout: str):
    """Run every `TemporalConv` of `module` with `layout` (one of `TemporalConv.LAYOUTS`) inside the block. For
    "frames-as-height" each gets a temporary `frames_conv`, a Conv2d whose parameters are views of the Conv3d's (an
    exporter then writes them as weights, not as an op on the 3-D ones)."""
    with each_module(module, TemporalConv, "layout", layout, TemporalConv.LAYOUTS) as convs:
        try:
            for m in convs if layout == "frames-as-height" else ():
                k, c = m.conv.kernel_size[0], m.conv.out_channels
                m.frames_conv = nn.Conv2d(c, c, (k, 1), padding=(k // 2, 0), device="meta")
                m.frames_conv.weight = nn.Parameter(m.conv.weight.detach().squeeze(-1), requires_grad=False)
                m.frames_conv.bias = nn.Parameter(m.conv.bias.detach(), requires_grad=False)
            for m in convs if layout == "frames-as-matmul" else ():
                k, c = m.conv.kernel_size[0], m.conv.out_channels  # (C_out, C_in, k, 1, 1) -> rows (j, C_in)
                m.frames_matrix = nn.Parameter(m.conv.weight.detach()[..., 0, 0].permute(2, 1, 0).reshape(k * c, c),
                                               requires_grad=False)
            yield module
        finally:
            for m in convs:
                if "frames_conv" in m._modules:
                    del m.frames_conv
                if "frames_matrix" in m._parameters:
                    del m.frames_matrix


class PaddedConv2d(nn.Module):
    """The function of a Conv2d, run with its input and output channels zero-padded to multiples of `multiple`
    (cuDNN's fast fp16 kernels want channel counts that are multiples of 8): the input gets zero channels, the
    weights zero filters, and the output is cut back. Keeps the weights' memory format."""

    def __init__(self, conv: nn.Conv2d, multiple: int):
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"cannot pad {conv}: only plain zero-padded convolutions")
        self.cin, self.cout = conv.in_channels, conv.out_channels
        self.pad_in, pad_out = -self.cin % multiple, -self.cout % multiple
        w = conv.weight.detach()
        fmt = torch.channels_last if w.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        self.weight = nn.Parameter(F.pad(w, (0, 0, 0, 0, 0, self.pad_in, 0, pad_out)).contiguous(memory_format=fmt),
                                   requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(F.pad(conv.bias.detach(), (0, pad_out)),
                                                                 requires_grad=False)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_in:
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad_in))
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        return y[:, : self.cout] if y.shape[1] != self.cout else y


@contextlib.contextmanager
def aligned_convs(module: nn.Module, multiple: int = 8):
    """Inside the block, every Conv2d of `module` whose channel counts are not multiples of `multiple` (the T-KLVAE's
    RGB and latent convolutions, the temporal ones over 3 channels made by `temporal_conv_layout`) runs as a
    `PaddedConv2d`: the same function. Yields the number replaced; afterwards the original modules again."""
    swapped = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d) and (child.in_channels % multiple or child.out_channels % multiple):
                parent._modules[name] = PaddedConv2d(child, multiple)
                swapped.append((parent, name, child))
    try:
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            parent._modules[name] = child


class STConv(nn.Module):
    """A spatial convolution followed, when temporal layers are on, by an identity-initialised temporal one."""

    def __init__(self, cin: int, cout: int, temporal: bool, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.spatial = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=kernel_size // 2)
        self.temporal = TemporalConv(cout) if temporal else None

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        x = self.spatial(x)
        return self.temporal(x, num_frames) if self.temporal is not None else x


class Attention(nn.Module):
    """Multi-head attention on (N, S, D) sequences; optional cross-attention context (N, S_ctx, D_ctx)."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, zero_out: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.is_cross = context_dim is not None
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        if zero_out:  # paper Eq. 2: the new temporal branch starts as a no-op
            nn.init.zeros_(self.to_out.weight)
            nn.init.zeros_(self.to_out.bias)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(N, S, D) -> (N, heads, S, d_head)."""
        return t.reshape(t.shape[0], -1, self.num_heads, self.to_q.out_features // self.num_heads).transpose(1, 2)

    def kv(self, context: torch.Tensor) -> list[torch.Tensor]:
        """Keys and values (N, heads, S_ctx, d_head) of a context; for cross-attention they are fixed during
        sampling and computed once per call."""
        return [self.split_heads(t(context)) for t in (self.to_k, self.to_v)]

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention's queries, keys and values of x (..., D), each (..., D): three matrix products, or one
        with a (3D, D) weight inside `fused_projections` (views of its output, side by side)."""
        if "qkv" in self._parameters:
            return F.linear(x, self.qkv).chunk(3, dim=-1)
        return self.to_q(x), self.to_k(x), self.to_v(x)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        n, s, d = x.shape
        if context is None and kv is None:  # self-attention
            q, k, v = map(self.split_heads, self.projections(x))
        else:
            q, (k, v) = self.split_heads(self.to_q(x)), kv if kv is not None else self.kv(context)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, S, d_head)
        return self.to_out(out.transpose(1, 2).reshape(n, s, d))


@contextlib.contextmanager
def fused_projections(module: nn.Module):
    """Inside the block, every self-attention `Attention` of `module` computes queries, keys and values as one
    matrix product (a temporary `qkv` weight, the three side by side): one read of the normalised input instead of
    three, and one larger GEMM. The same function, tested; an exporter writes `qkv` as the weight it uses."""
    found = [m for m in module.modules() if isinstance(m, Attention) and not m.is_cross]
    try:
        for m in found:
            m.qkv = nn.Parameter(torch.cat([m.to_q.weight, m.to_k.weight, m.to_v.weight]).detach(),
                                 requires_grad=False)
        yield module
    finally:
        for m in found:
            m._parameters.pop("qkv", None)


def fused_linear(x: torch.Tensor, linear: nn.Linear, residual: torch.Tensor | None = None,
                 gelu: bool = False) -> torch.Tensor:
    """`linear(x)` over the last dim as one matrix product with one more operation in its epilogue: `gelu` (then GELU
    of it, `torch._addmm_activation`) or `residual` (plus a tensor with the output's elements in the same order, added
    by the product itself as addmm's C, with the bias folded in). On CUDA cuBLASLt applies GELU as its tanh
    approximation (within 5e-4 of the exact GELU the module computes elsewhere); on the CPU it is exact."""
    if type(linear) is not nn.Linear:
        raise TypeError(f"fused_linear needs an nn.Linear, got {type(linear).__name__}")
    if gelu == (residual is not None):
        raise ValueError("fused_linear: give either gelu=True or a residual for the epilogue")
    rows = x.reshape(-1, linear.in_features)
    if gelu:
        y = torch._addmm_activation(linear.bias, rows, linear.weight.t(), use_gelu=True)
    else:
        y = torch.addmm(residual.reshape(-1, linear.out_features) + linear.bias, rows, linear.weight.t())
    return y.reshape(*x.shape[:-1], linear.out_features)


def frame_position_encoding(num_frames: int, dim: int, device, dtype) -> torch.Tensor:
    """Sinusoidal encoding of frame index, (L, dim): attention alone cannot tell frame order."""
    pos = torch.arange(num_frames, device=device, dtype=torch.float32)[:, None]
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    args = pos * freqs  # (L, dim/2)
    pe = torch.stack((torch.sin(args), torch.cos(args)), dim=-1).reshape(num_frames, dim)  # sin, cos interleaved
    return pe.to(dtype)


class TemporalAttention(nn.Module):
    """Self-attention over frames with space folded into batch; zero-initialised output (Eq. 2)."""

    # How `forward` attends over the L frames (the same function either way, tested). "sdpa": the tokens gathered
    # into (B*S, L, D) sequences and F.scaled_dot_product_attention, what eager runs and ONNX exports. Fused
    # attention kernels tile a sequence by 64-128 queries and keys, so L = 16 frames leave most of each tile empty:
    # in the paper UNet's batch-69 step the temporal attentions took about 20 of 28 ms of attention on an H200.
    # "math": scores and weighted sum as matrix products over the frames, without the gather. "fused": the same as
    # sums of products that a compiler (Inductor) turns into a few memory-bound kernels; eagerly it would
    # materialise an L-times larger product, so it is only for compiled engines. "triton": one Triton kernel that
    # keeps each token's scores in registers (`models.frame_attention`; CUDA, or Triton's interpreter).
    KERNELS = ("sdpa", "math", "fused", "triton")
    kernel = "sdpa"
    # How the kernels other than "sdpa" take the LayerNorm plus frame position encoding: "torch" (the ops, as
    # traced) or "triton" (`models.frame_attention.frame_layer_norm`, one kernel writing row-major; an experiment)
    NORM_KERNELS = ("torch", "triton")
    norm_kernel = "torch"

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, zero_out=True)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x: (B*L, S, D) with S = H*W tokens per frame."""
        bl, s, d = x.shape
        b = bl // num_frames
        pe = self._buffers.get("position_table")  # inside `position_tables`
        if pe is None:
            pe = frame_position_encoding(num_frames, d, x.device, x.dtype)
        elif pe.shape[0] != num_frames:
            raise ValueError(f"position table for {pe.shape[0]} frames used for {num_frames}: give "
                             f"position_tables the frames per call (L={num_frames})")
        if self.kernel == "sdpa":
            xt = x.reshape(b, num_frames, s, d).transpose(1, 2).reshape(b * s, num_frames, d)  # (B*S, L, D)
            xt = xt + self.attn(self.norm(xt) + pe)
            return xt.reshape(b, s, num_frames, d).transpose(1, 2).reshape(bl, s, d)
        xt = x.reshape(b, num_frames, s, d)
        if self.norm_kernel == "triton":
            from nuwaxl.models.frame_attention import frame_layer_norm

            h = frame_layer_norm(xt, self.norm.weight, self.norm.bias, pe, self.norm.eps)
        else:
            h = self.norm(xt) + pe[:, None]
        return (xt + self.over_frames(h)).reshape(bl, s, d)

    def over_frames(self, h: torch.Tensor) -> torch.Tensor:
        """Attention over dim 1 of (B, L, S, D) for every token and head, by `kernel` "math", "fused" or "triton"."""
        a = self.attn
        return a.to_out(attend_over_frames(*a.projections(h), a.num_heads, self.kernel))


def attend_over_frames(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kernel: str) -> torch.Tensor:
    """Softmax attention over dim 1 of (B, L, S, D) queries, keys and values, per token and head, by a
    `TemporalAttention` kernel other than "sdpa": (B, L, S, D), the heads side by side."""
    if kernel == "triton":
        from nuwaxl.models.frame_attention import frame_attention

        return frame_attention(q, k, v, heads)
    d_head = q.shape[-1] // heads
    q, k, v = (t.unflatten(-1, (heads, d_head)) for t in (q, k, v))  # (B, L, S, heads, d)
    q = q * d_head ** -0.5
    if kernel == "fused":
        scores = (q.unsqueeze(2) * k.unsqueeze(1)).sum(-1, dtype=torch.float32)  # (B, Lq, Lk, S, heads)
        weights = scores.softmax(2).to(v.dtype)
        out = (weights.unsqueeze(-1) * v.unsqueeze(1)).sum(2)  # (B, Lq, S, heads, d)
    else:
        scores = q.permute(0, 2, 3, 1, 4) @ k.permute(0, 2, 3, 4, 1)  # (B, S, heads, Lq, Lk)
        out = (scores.float().softmax(-1).to(v.dtype) @ v.permute(0, 2, 3, 1, 4)).permute(0, 3, 1, 2, 4)
    return out.flatten(-2)


@contextlib.contextmanager
def position_tables(module: nn.Module, num_frames: int):
    """Inside the block, every `TemporalAttention` of `module` adds its frame position encoding from a temporary
    buffer computed here once (the same values) instead of computing it in `forward`: an exported program then holds
    a constant table rather than the arange/exp/sin/cos ops a compiler fuses into the temporal LayerNorm's kernel."""
    found = [m for m in module.modules() if isinstance(m, TemporalAttention)]
    try:
        for m in found:
            w = m.norm.weight
            m.register_buffer("position_table", frame_position_encoding(num_frames, w.shape[0], w.device, w.dtype),
                              persistent=False)
        yield found
    finally:
        for m in found:
            m._buffers.pop("position_table", None)


def temporal_norm_kernel(module: nn.Module, kernel: str):
    """Run every `TemporalAttention` of `module` with its LayerNorm by `kernel` (one of
    `TemporalAttention.NORM_KERNELS`) inside the block."""
    return each_module(module, TemporalAttention, "norm_kernel", kernel, TemporalAttention.NORM_KERNELS)


def temporal_attention_kernel(module: nn.Module, kernel: str):
    """Run every `TemporalAttention` of `module` with `kernel` (one of `TemporalAttention.KERNELS`) inside the
    block."""
    return each_module(module, TemporalAttention, "kernel", kernel, TemporalAttention.KERNELS)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of diffusion timesteps t (B,) -> (B, dim), as in DDPM / LDM."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
