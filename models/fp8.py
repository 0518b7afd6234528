"""FP8 (e4m3) linear layers: `torch._scaled_mm` with per-tensor scales, the input's scale fixed by calibration.

The UNet's transformer blocks (projections, attention, feed-forward) are a third of its FLOPs; on Hopper an e4m3
matmul has twice the fp16 tensor-core rate. Weights are scaled by their own absolute maximum; inputs by the largest
absolute value seen while calibrating (`calibrate`), so a step needs no reduction over its activations. Values past
the calibrated range saturate at +-448 instead of overflowing. The convolutions stay in fp16: torch has no FP8
convolution.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448


def to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale in e4m3, saturating (a plain cast of an out-of-range value gives NaN)."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


class Float8Linear(nn.Module):
    """`nn.Linear` with its weight and input in e4m3: y = (x / s_x)(W / s_w)^T s_x s_w + b, output in x's dtype."""

    def __init__(self, linear: nn.Linear, input_amax: float):
        super().__init__()
        w = linear.weight.detach().float()
        w_scale = w.abs().amax().clamp(min=1e-12) / E4M3_MAX
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", to_e4m3(w, w_scale))  # (out, in) row-major: weight.t() is column-major
        # scales of shape (1,), not (): AOTInductor turns 0-dim buffers into unnamed constants of its own, which a
        # package whose weights are stored apart from it cannot be given
        self.register_buffer("weight_scale", w_scale.reshape(1))
        self.register_buffer("input_scale", torch.tensor([max(input_amax, 1e-12) / E4M3_MAX], device=w.device))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        # cuBLASLt takes a bias only with a 16-bit output
        fused = self.bias is not None and x.dtype in (torch.float16, torch.bfloat16)
        y = torch._scaled_mm(to_e4m3(x.reshape(-1, self.in_features), self.input_scale), self.weight.t(),
                             scale_a=self.input_scale, scale_b=self.weight_scale,
                             bias=self.bias if fused else None, out_dtype=x.dtype, use_fast_accum=True)
        if self.bias is not None and not fused:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


def fp8_linears(module: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers FP8 applies to: those inside the UNet's transformer blocks (both dimensions multiples of
    16, as cuBLASLt's FP8 matmul needs) except cross-attention's keys and values, which are computed once per call."""
    from nuwaxl.models.unet import SpaceTimeTransformer

    found = {}
    for name, block in module.named_modules():
        if not isinstance(block, SpaceTimeTransformer):
            continue
        fixed = {id(block.cross_attn.to_k), id(block.cross_attn.to_v)}
        for sub, m in block.named_modules():
            if (isinstance(m, nn.Linear) and id(m) not in fixed and m.in_features % 16 == 0
                    and m.out_features % 16 == 0):
                found[f"{name}.{sub}"] = m
    return found


@contextlib.contextmanager
def calibration(module: nn.Module):
    """Record the largest absolute input of every `fp8_linears` layer while the block runs; yields the dict
    (name -> amax), filled as the module runs."""
    amax: dict[str, float] = {}

    def hook(name):
        def record(_, args):
            amax[name] = max(amax.get(name, 0.0), args[0].detach().abs().amax().item())
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in fp8_linears(module).items()]
    try:
        yield amax
    finally:
        for h in handles:
            h.remove()


def quantize_fp8(module: nn.Module, amax: dict[str, float]) -> int:
    """Replace every `fp8_linears` layer of `module` by a `Float8Linear` with its calibrated input range, in place;
    returns how many. A layer that calibration never reached is an error (its range is unknown)."""
    layers = fp8_linears(module)
    missing = sorted(set(layers) - set(amax))
    if missing:
        raise ValueError(f"no calibration for {len(missing)} FP8 layers, e.g. {missing[0]}: run calibration through "
                         "the whole network")
    for name, linear in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        setattr(parent, child, Float8Linear(linear, amax[name]))  # nn.Sequential children too ("0", "2")
    return len(layers)
