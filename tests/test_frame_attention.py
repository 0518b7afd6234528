"""The Triton kernel for attention over frames (`models.frame_attention`, `TemporalAttention.kernel = "triton"`):
the same function as the UNet's reference temporal attention. On the CPU it runs in Triton's interpreter
(TRITON_INTERPRET=1, in a subprocess: Triton reads it when the kernel is defined); on a GPU compiled, and compiled
into an AOTInductor package."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from nuwaxl.models import frame_attention

needs_triton = pytest.mark.skipif(not frame_attention.available(),
                                  reason="Triton is not installed (torch's CUDA wheels bring it; for the CPU: "
                                         "pip install triton)")

# Shapes that exercise the masks: a head count that is not a power of two, L below 16 (the dot's smallest tile) and
# not a power of two, head dims of 16, 12, 40 and 160 (padded to 16, 16, 64, 256), one token and several.
CASES = "[(2, 16, 3, 32, 2), (1, 5, 2, 36, 3), (2, 16, 4, 80, 2), (1, 7, 1, 320, 2)]"  # (B, L, S, D, heads)

CHECK = textwrap.dedent(f"""
    import torch
    from nuwaxl.models.frame_attention import frame_attention
    from nuwaxl.models.layers import TemporalAttention, temporal_attention_kernel

    torch.manual_seed(0)
    for b, frames, s, d, heads in {CASES}:
        q, k, v = (torch.randn(b, frames, s, d) for _ in range(3))
        dh = d // heads
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(t.unflatten(-1, (heads, dh)).permute(0, 2, 3, 1, 4) for t in (q, k, v)))  # (B, S, heads, L, dh)
        got = frame_attention(q, k, v, heads)
        torch.testing.assert_close(got, ref.permute(0, 3, 1, 2, 4).flatten(-2), rtol=1e-5, atol=1e-5)
        # through the layer, against the reference kernel (sdpa), with a non-zero output projection
        layer = TemporalAttention(d, heads).eval()
        layer.attn.to_out.weight.data.normal_(std=0.2)
        x = torch.randn(b * frames, s, d)
        with torch.no_grad():
            reference = layer(x, frames)
            with temporal_attention_kernel(layer, "triton"):
                torch.testing.assert_close(layer(x, frames), reference, rtol=1e-5, atol=1e-5)
    print("ok")
""")


NORM_CHECK = textwrap.dedent(f"""
    import torch
    from nuwaxl.models.frame_attention import frame_layer_norm
    from nuwaxl.models.layers import TemporalAttention, temporal_attention_kernel, temporal_norm_kernel

    torch.manual_seed(0)
    for b, frames, s, d, heads in {CASES}:
        x = torch.randn(b, frames, s, d) * 3 + 1
        w, bias, table = torch.randn(d), torch.randn(d), torch.randn(frames, d)
        ref = torch.nn.functional.layer_norm(x, (d,), w, bias, 1e-5) + table[:, None]
        torch.testing.assert_close(frame_layer_norm(x, w, bias, table, 1e-5), ref, rtol=1e-5, atol=1e-5)
        # through the layer, with non-zero LayerNorm parameters and output projection
        layer = TemporalAttention(d, heads).eval()
        layer.attn.to_out.weight.data.normal_(std=0.2)
        layer.norm.weight.data.normal_()
        layer.norm.bias.data.normal_()
        xs = torch.randn(b * frames, s, d)
        with torch.no_grad(), temporal_attention_kernel(layer, "math"):
            reference = layer(xs, frames)
            with temporal_norm_kernel(layer, "triton"):
                torch.testing.assert_close(layer(xs, frames), reference, rtol=1e-5, atol=1e-5)
    print("ok")
""")


@needs_triton
def test_frame_layer_norm_kernel_equals_layer_norm_plus_position_in_the_interpreter():
    """`TemporalAttention.norm_kernel = "triton"`: LayerNorm + frame position encoding in one kernel that writes
    row-major, the same function (an experiment against the frames-innermost store Inductor chose for it)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", NORM_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


@needs_triton
def test_frame_attention_kernel_equals_attention_over_frames_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_frame_attention_names_bad_inputs():
    q = torch.zeros(1, 16, 2, 30)
    with pytest.raises(ValueError, match="D=30 is not divisible by num_heads=4"):
        frame_attention.frame_attention(q, q, q, 4)
    with pytest.raises(ValueError, match="unit stride"):
        frame_attention.frame_attention(q.transpose(2, 3), q, q, 2)


@needs_triton
def test_frame_attention_on_cpu_tensors_says_what_to_use():
    run = subprocess.run([sys.executable, "-c", "import torch; from nuwaxl.models.frame_attention import "
                          "frame_attention; frame_attention(*(torch.zeros(1, 16, 2, 32),) * 3, 2)"],
                         env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "runs on CUDA tensors (got cpu)" in run.stderr, run.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible")
@torch.no_grad()
def test_frame_attention_on_cuda_in_eager_and_in_an_aotinductor_package(tmp_path):
    """fp16 on the GPU against the fp32 reference, at a paper-UNet shape (40-dim heads), eagerly and from a
    package compiled as `build` compiles (`engine.torch_backend.aoti_compile`, `load_package`)."""
    from nuwaxl.engine.torch_backend import aoti_compile, load_package
    from nuwaxl.models.layers import TemporalAttention, temporal_attention_kernel

    torch.manual_seed(0)
    dev = torch.device("cuda")
    layer = TemporalAttention(320, 8).to(dev).eval()
    layer.attn.to_out.weight.normal_(std=0.05)
    x = torch.randn(4 * 16, 64, 320, device=dev)
    reference = layer(x, 16)
    layer.half()

    class Frames(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, h):
            return self.layer(h, 16)

    with temporal_attention_kernel(layer, "triton"):
        eager = layer(x.half(), 16).float()
        program = torch.export.export(Frames(), (x.half(),))
        aoti_compile(program, tmp_path / "frames.pt2")
    package = load_package(tmp_path / "frames.pt2", dev)
    state = {**program.state_dict, **program.constants}
    package.load_constants({k: state[k] for k in package.get_constant_fqns()}, check_full_update=True,
                           user_managed=True)
    packaged = package(x.half())[0].float()
    for out in (eager, packaged):
        assert ((out - reference).norm() / reference.norm()).item() < 2e-3


def test_packages_attend_over_frames_with_triton_on_gpus_only(monkeypatch):
    """`build --backend torch` compiles the Triton kernel into CUDA packages (where Triton imports), "math"
    elsewhere, with a warning naming the cost when a GPU machine lacks Triton."""
    from nuwaxl.engine import torch_backend

    assert torch_backend.package_temporal_attention(torch.device("cpu")) == "math"
    monkeypatch.setattr(frame_attention, "available", lambda: True)
    assert torch_backend.package_temporal_attention(torch.device("cuda")) == "triton"
    monkeypatch.setattr(frame_attention, "available", lambda: False)
    with pytest.warns(UserWarning, match="Triton is not installed"):
        assert torch_backend.package_temporal_attention(torch.device("cuda")) == "math"
