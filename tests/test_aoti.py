"""AOTInductor packages (`trt-nuwaxl build --backend torch`) on the tiny preset, fp32 on the CPU.

Their C++ compile is most of this file's time (about two minutes on 2 cores), so it is a file of its own: with
pytest-xdist (`-n 2 --dist loadfile`, as CI runs) it compiles while another worker runs the other tests.
"""

import json

import pytest
from conftest import MAX_ROWS, assert_engines_match_pytorch, quiet

from nuwaxl.build import build
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
