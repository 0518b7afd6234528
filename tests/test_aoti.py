"""AOTInductor packages (`trt-nuwaxl build --backend torch`) on the tiny preset, fp32 on the CPU.

Their C++ compile is most of this file's time (about two minutes on 2 cores), so it is a file of its own: with
pytest-xdist (`-n 2 --dist loadfile`, as CI runs) it compiles while another worker runs the other tests.
"""

import json
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


@pytest.fixture(scope="session")
def aoti_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "aoti"
    build(out, "torch", "fp32", MAX_ROWS, preset_name="tiny", device="cpu", progress=False, log=quiet)
    return out


def test_aoti_packages_have_parity(aoti_dir):
    for name in NETWORKS:
        parity = json.loads((aoti_dir / "torch" / f"{name}.json").read_text())["parity"]
        assert parity["passed"] and "1" in parity["batches"]  # batch 1 goes through the padding path


def test_generate_with_aoti_engines_matches_pytorch(aoti_dir, tmp_path, capsys):
    assert_engines_match_pytorch(aoti_dir, tmp_path, capsys)


def test_weights_are_stored_once_beside_code_only_packages(aoti_dir):
    """Each network's weights are in NET.safetensors, not compiled into its packages' .so (the paper UNet's .so
    was 2 GB and slow to load); the single-row package of unet_step uses the same file."""
    for name in NETWORKS:
        weights = load_file(aoti_dir / "torch" / f"{name}.safetensors")
        largest = max(weights.values(), key=lambda t: t.numel()).contiguous().numpy().tobytes()
        packages = [f"{name}.pt2"] + ([f"{name}.row1.pt2"] if name == "unet_step" else [])
        for package in packages:
            with zipfile.ZipFile(aoti_dir / "torch" / package) as z:
                code = b"".join(z.read(i) for i in z.namelist() if i.endswith(".so"))
            assert code and largest[:4096] not in code, (package, len(code))
        wanted = {k for p in packages for k in torch._inductor.aoti_load_package(str(aoti_dir / "torch" / p))
                  .get_constant_fqns()}
        assert set(weights) == wanted  # no more: unet_prepare's file does not repeat unet_step's weights
    manifest = json.loads((aoti_dir / "engines.json").read_text())
    assert "torch/unet_step.row1.pt2" in manifest["networks"]["unet_step"]["files"]


def test_a_lone_call_runs_the_single_row_package(aoti_dir):
    engines = load_engines(aoti_dir, device="cpu").engines
    step = engines["unet_step"]
    assert step.single_row is not None and engines["unet_prepare"].single_row is None
    seen = []
    real = step.single_row
    step.single_row = lambda *args: seen.append(args[0].shape[0]) or real(*args)
    feeds = {t.name: torch.zeros(t.concrete(1), dtype=getattr(torch, t.dtype)) for t in step.spec.inputs}
    step.run(feeds)
    assert seen == [1]


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
