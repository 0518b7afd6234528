"""FP8 (e4m3) transformer linears (`models.fp8`): an experiment option of the step benchmarks, not yet offered as
a precision (README "Speed"). CPU tests: torch's CPU `_scaled_mm` rounds weights and inputs to e4m3 as a GPU does."""

import pytest
import torch
from torch import nn

from nuwaxl.config import preset
from nuwaxl.models.fp8 import E4M3_MAX, Float8Linear, calibration, fp8_linears, quantize_fp8
from nuwaxl.models.unet import MaskUNet3D


@torch.no_grad()
def test_float8_linear_is_the_linear_within_e4m3_rounding_and_saturates():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    x = torch.randn(40, 64)
    q = Float8Linear(linear, input_amax=x.abs().max().item())
    ref = linear(x)
    err = ((q(x) - ref).norm() / ref.norm()).item()
    assert 1e-4 < err < 0.05  # rounded (3 mantissa bits), not exact, not broken
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight.shape == (32, 64)
    big = q(x * 100)  # past the calibrated range: saturates at +-448 * scale, no NaN or inf
    assert torch.isfinite(big).all()
    assert q(x.unsqueeze(0)).shape == (1, 40, 32)
    assert E4M3_MAX == 448.0


@torch.no_grad()
def test_quantize_fp8_replaces_the_transformer_linears_with_their_calibrated_ranges():
    torch.manual_seed(0)
    unet = MaskUNet3D(preset("tiny").unet).eval()
    layers = fp8_linears(unet)
    assert layers and all(".cross_attn.to_k" not in n and ".cross_attn.to_v" not in n for n in layers)
    assert all(".attn." in n for n in layers)  # inside the transformer blocks only: not temb_proj, time_embed
    with pytest.raises(ValueError, match="no calibration"):
        quantize_fp8(unet, {})
    b, frames, lat = 1, 16, 8
    x = torch.randn(b, frames, 4, lat, lat)
    args = (x, torch.tensor([500]), torch.randn(b, frames, 77, unet.cfg.context_dim), torch.randn_like(x),
            torch.zeros(b, frames, 1, lat, lat))
    with calibration(unet) as amax:
        ref = unet(*args)
    assert set(amax) == set(layers) and all(v > 0 for v in amax.values())
    assert quantize_fp8(unet, amax) == len(layers)
    assert all(isinstance(unet.get_submodule(n), Float8Linear) for n in layers)
    assert not any(isinstance(m, nn.Linear) for n, m in unet.named_modules() if n in layers)
    out = unet(*args)
    assert 1e-4 < ((out - ref).norm() / ref.norm()).item() < 0.1  # e4m3 rounding through 140 layers, not broken
