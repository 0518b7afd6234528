"""AOTInductor packages (`trt-nuwaxl build --backend torch`) on the tiny preset, fp32 on the CPU.

Their C++ compile is most of this file's time (about two minutes on 2 cores), so it is a file of its own: with
pytest-xdist (`-n 2 --dist loadfile`, as CI runs) it compiles while another worker runs the other tests.
"""

import json
import re
import shutil
import zipfile

import pytest
import torch
from conftest import MAX_ROWS, assert_engines_match_pytorch, quiet
from safetensors.torch import load_file

from nuwaxl.build import build
from nuwaxl.engine.directory import load_engines
from nuwaxl.errors import UserError
from nuwaxl.iospec import NETWORKS
from nuwaxl.models.unet import MaskUNet3D


@pytest.fixture(scope="session")
def aoti_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "aoti"
    build(out, "torch", "fp32", MAX_ROWS, preset_name="tiny", device="cpu", progress=False, log=quiet)
    return out


def test_aoti_packages_have_parity(aoti_dir):
    for name in NETWORKS:
        parity = json.loads((aoti_dir / "torch" / f"{name}.json").read_text())["parity"]
        assert parity["passed"] and "1" in parity["batches"]
    # every package is measured: unet_step's dynamic one at 2 rows (1 and MAX_ROWS have static packages)
    step = json.loads((aoti_dir / "torch" / "unet_step.json").read_text())["parity"]
    assert sorted(step["batches"], key=int) == ["1", "2", str(MAX_ROWS)]


def test_generate_with_aoti_engines_matches_pytorch(aoti_dir, tmp_path, capsys):
    assert_engines_match_pytorch(aoti_dir, tmp_path, capsys)


def test_weights_are_stored_once_beside_code_only_packages(aoti_dir):
    """Each network's weights are in NET.safetensors, not compiled into its packages' .so (the paper UNet's .so
    was 2 GB and slow to load); the static packages use the same file."""
    manifest = json.loads((aoti_dir / "engines.json").read_text())
    for name in NETWORKS:
        weights = load_file(aoti_dir / "torch" / f"{name}.safetensors")
        largest = max(weights.values(), key=lambda t: t.numel()).contiguous().numpy().tobytes()
        packages = [rel.removeprefix("torch/") for rel in manifest["networks"][name]["files"] if rel.endswith(".pt2")]
        for package in packages:
            with zipfile.ZipFile(aoti_dir / "torch" / package) as z:
                code = b"".join(z.read(i) for i in z.namelist() if i.endswith(".so"))
            assert code and largest[:4096] not in code, (package, len(code))
        wanted = {k for p in packages for k in torch._inductor.aoti_load_package(str(aoti_dir / "torch" / p))
                  .get_constant_fqns()}
        assert set(weights) == wanted  # no more: unet_prepare's file does not repeat unet_step's weights
    files = {n: sorted(r for r in manifest["networks"][n]["files"] if r.endswith(".pt2")) for n in NETWORKS}
    assert files["unet_step"] == ["torch/unet_step.pt2", "torch/unet_step.rows1.pt2",
                                  f"torch/unet_step.rows{MAX_ROWS}.pt2"]
    assert files["vae_decoder"] == ["torch/vae_decoder.pt2", "torch/vae_decoder.rows1.pt2"]
    assert files["text_encoder"] == ["torch/text_encoder.pt2"]


def test_temporal_attention_is_compiled_as_matrix_products(aoti_dir):
    """Packages attend over frames with matrix products (`torch_backend.TEMPORAL_ATTENTION`, measured faster on an
    H200): their code calls fused attention only for the spatial and prompt attentions, two per transformer block."""
    from nuwaxl.config import preset
    from nuwaxl.models.unet import SpaceTimeTransformer

    manifest = json.loads((aoti_dir / "engines.json").read_text())
    blocks = sum(isinstance(m, SpaceTimeTransformer) for m in MaskUNet3D(preset("tiny").unet).modules())
    assert json.loads((aoti_dir / "torch" / "unet_step.json").read_text())["temporal_attention"] == "math"
    packages = [rel for rel in manifest["networks"]["unet_step"]["files"] if rel.endswith(".pt2")]
    assert len(packages) == 3
    for package in packages:
        with zipfile.ZipFile(aoti_dir / package) as z:
            code = "".join(z.read(n).decode() for n in z.namelist() if n.endswith("wrapper.cpp"))
        calls = re.findall(r"aoti_torch_\w+?__scaled_dot_product_\w+\(", code)  # the C shim's attention calls
        assert len(calls) == 2 * blocks, (package, calls[:3])


def test_feed_forward_gelu_is_compiled_into_the_matrix_product(aoti_dir):
    """The UNet packages compute each transformer block's feed-forward GELU in its first product's epilogue
    (`torch_backend.MATMUL_EPILOGUES`): one `_addmm_activation` call per block in every package, none in the
    T-KLVAE's; parity (above) holds."""
    from nuwaxl.config import preset
    from nuwaxl.engine.torch_backend import MATMUL_EPILOGUES
    from nuwaxl.models.unet import SpaceTimeTransformer

    manifest = json.loads((aoti_dir / "engines.json").read_text())
    blocks = sum(isinstance(m, SpaceTimeTransformer) for m in MaskUNet3D(preset("tiny").unet).modules())
    assert MATMUL_EPILOGUES == "gelu-residual"
    for name, expected in (("unet_step", blocks), ("vae_decoder", 0)):
        assert json.loads((aoti_dir / "torch" / f"{name}.json").read_text())["matmul_epilogues"] == MATMUL_EPILOGUES
        for package in [rel for rel in manifest["networks"][name]["files"] if rel.endswith(".pt2")]:
            with zipfile.ZipFile(aoti_dir / package) as z:
                code = "".join(z.read(n).decode() for n in z.namelist() if n.endswith("wrapper.cpp"))
            calls = re.findall(r"aoti_torch_\w+?__addmm_activation\(", code)
            assert len(calls) == expected, (package, calls[:3])


def test_frame_position_encoding_is_a_constant_of_the_packages(aoti_dir):
    """The UNet step packages add each temporal attention's frame position encoding from a table in the weights
    file (`models.layers.position_tables`, PACKAGING 10), the same values the live module computes."""
    from nuwaxl.config import preset
    from nuwaxl.models.layers import TemporalAttention, frame_position_encoding

    config = preset("tiny")
    layers = sum(isinstance(m, TemporalAttention) for m in MaskUNet3D(config.unet).modules())
    assert json.loads((aoti_dir / "torch" / "unet_step.json").read_text())["position_encoding"] == "table"
    tables = {k: v for k, v in load_file(aoti_dir / "torch" / "unet_step.safetensors").items()
              if k.endswith("position_table")}
    assert len(tables) == layers > 0
    for v in tables.values():
        assert torch.equal(v, frame_position_encoding(config.frames_per_call, v.shape[1], "cpu", v.dtype))


def test_temporal_convolutions_are_compiled_in_each_networks_layout(aoti_dir):
    """Packages run temporal convolutions in their network's layout (`torch_backend.TEMPORAL_CONV`, measured on an
    H200), not as the modules' Conv3d: the UNet's as (k, 1) 2-D convolutions on the channels-last hidden state, the
    T-KLVAE's as one matrix product over the frame-shifted copies; the weights file holds the weights each asks for
    (4-D convolution weights or a (k*C, C) matrix), and parity (above) holds."""
    from nuwaxl.engine.torch_backend import package_temporal_conv

    expected = {"frames-as-height": ("frames_conv.weight", 4), "frames-as-matmul": ("frames_matrix", 2)}
    layouts = {name: package_temporal_conv(name) for name in ("unet_step", "vae_encoder", "vae_decoder")}
    assert layouts == {"unet_step": "frames-as-height", "vae_encoder": "frames-as-matmul",
                       "vae_decoder": "frames-as-matmul"}
    for name, layout in layouts.items():
        assert json.loads((aoti_dir / "torch" / f"{name}.json").read_text())["temporal_conv"] == layout
        weights = load_file(aoti_dir / "torch" / f"{name}.safetensors")
        convs = {k: v for k, v in weights.items()
                 if k.endswith(("temporal.conv.weight", "frames_conv.weight", "frames_matrix"))}
        suffix, dim = expected[layout]
        assert convs and all(k.endswith(suffix) and v.dim() == dim for k, v in convs.items()), name


def test_each_row_count_runs_its_package(aoti_dir):
    """1 row and the largest batch go through their static packages, the rest through the dynamic one; lone
    calls of a network without a static one are padded to 2 rows."""
    engines = load_engines(aoti_dir, device="cpu").engines
    step = engines["unet_step"]
    assert sorted(step.static) == [1, MAX_ROWS] and not engines["text_encoder"].static
    seen = []

    def spy(name, fn):
        return lambda *args: seen.append((name, args[0].shape[0])) or fn(*args)

    step.fn = spy("dynamic", step.fn)
    step.static = {n: spy(f"rows{n}", fn) for n, fn in step.static.items()}
    for batch in (1, 2, MAX_ROWS):
        step.run({t.name: torch.zeros(t.concrete(batch), dtype=getattr(torch, t.dtype)) for t in step.spec.inputs})
    assert seen == [("rows1", 1), ("dynamic", 2), (f"rows{MAX_ROWS}", MAX_ROWS)]
    text = engines["text_encoder"]
    text.fn = spy("text", text.fn)
    text.run({"input_ids": torch.zeros(1, text.spec.inputs[0].shape[1], dtype=torch.int64)})
    assert seen[-1] == ("text", 2)


def test_weights_keep_their_memory_layout(tmp_path):
    """On a GPU the packages are compiled for channels-last 2-D convolution weights; the weights file keeps
    that layout (a row-major copy would be read with the wrong strides)."""
    from nuwaxl.engine.torch_backend import read_weights, write_weights

    conv = torch.randn(8, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    weights = {"conv": conv, "bias": torch.randn(8), "t": torch.randn(2, 3)[:, :2].t()}
    with pytest.raises(UserError, match="neither row-major nor channels-last"):
        write_weights(weights, tmp_path / "w.safetensors")
    del weights["t"]
    write_weights(weights, tmp_path / "w.safetensors")
    back = read_weights(tmp_path / "w.safetensors", torch.device("cpu"))
    assert back["conv"].stride() == conv.stride() and torch.equal(back["conv"], conv)
    assert back["bias"].is_contiguous() and torch.equal(back["bias"], weights["bias"])


def test_a_package_without_its_weights_file_asks_for_a_rebuild(aoti_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(aoti_dir, old)
    manifest = json.loads((old / "engines.json").read_text())
    for name, record in manifest["networks"].items():  # as a directory built before the weights moved out
        for rel in [r for r in record["files"] if not r.endswith(f"{name}.pt2")]:
            (old / rel).unlink()
            del record["files"][rel]
    (old / "engines.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="weights missing.*rebuild with trt-nuwaxl build --backend torch --force"):
        load_engines(old, device="cpu")


def test_the_gpu_loader_checks_the_compute_capability(aoti_dir, monkeypatch):
    """On a GPU, packages are opened by torch's C++ loader directly (torch's Python loader spends 40-54 s compiling
    CPU ISA probes first); the check that remains is the one that matters there. Exercised here with a CPU
    package, which the C++ loader runs on the CPU."""
    from nuwaxl.engine import torch_backend

    package = aoti_dir / "torch" / "vae_decoder.pt2"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch_backend, "package_metadata", lambda path: {"AOTI_COMPUTE_CAPABILITY": "80"})
    with pytest.raises(UserError, match="compiled for CUDA compute capability 80, this GPU has 90; rebuild"):
        torch_backend.load_package(package, torch.device("cuda", 0))
    monkeypatch.setattr(torch_backend, "package_metadata", lambda path: {"AOTI_COMPUTE_CAPABILITY": "90"})
    assert torch_backend.load_package(package, torch.device("cuda")).get_constant_fqns()


def test_the_gpu_loader_runs_packages_without_importing_inductor(aoti_dir):
    """The GPU path opens packages with torch's C++ loader and calls it as torch's AOTICompiledModel does, without
    importing Dynamo or Inductor (seconds of a cold start). Exercised with a CPU package in a new
    process: same outputs as torch's loader, and those modules never imported."""
    import subprocess
    import sys

    script = f"""
import sys, torch
from pathlib import Path
from nuwaxl.engine import torch_backend
torch.cuda.get_device_capability = lambda device=None: (9, 0)
torch_backend.package_metadata = lambda path: {{}}
fn = torch_backend.load_package(Path({str(aoti_dir / "torch" / "vae_decoder.pt2")!r}), torch.device("cuda"))
weights = torch_backend.read_weights(Path({str(aoti_dir / "torch" / "vae_decoder.safetensors")!r}),
                                     torch.device("cpu"))
fn.load_constants({{k: weights[k] for k in fn.get_constant_fqns()}}, check_full_update=True, user_managed=True)
x = torch.randn(2, *[d for d in torch.load({str(aoti_dir / "x.pt")!r}).shape[1:]])
out = fn(x)
print(sorted(m for m in ("torch._inductor", "torch._dynamo") if m in sys.modules))
torch.save((x, out), {str(aoti_dir / "y.pt")!r})
"""
    spec = load_engines(aoti_dir, device="cpu").engines["vae_decoder"].spec
    torch.save(torch.zeros(spec.inputs[0].concrete(1)), aoti_dir / "x.pt")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    x, out = torch.load(aoti_dir / "y.pt")
    ref = torch._inductor.aoti_load_package(str(aoti_dir / "torch" / "vae_decoder.pt2"))
    ref.load_constants(read_weights_for(aoti_dir, "vae_decoder"), check_full_update=True)
    assert torch.allclose(out[0], ref(x), atol=1e-5)


def read_weights_for(aoti_dir, name):
    from nuwaxl.engine.torch_backend import read_weights

    return read_weights(aoti_dir / "torch" / f"{name}.safetensors", torch.device("cpu"))
