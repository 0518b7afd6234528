"""The torch modes' compiled code: regional compilation, and the compile cache that carries it to a new process."""

import json
import os
import subprocess
import sys

import pytest
import torch

from nuwaxl.config import preset
from nuwaxl.engine.torch_backend import TorchEngine
from nuwaxl.iospec import io_specs
from nuwaxl.models.checkpoint import NuwaModels
from nuwaxl.models.networks import compile_regions, networks


def test_regional_compilation_compiles_each_repeated_block_not_the_network():
    cfg = preset("tiny")
    nets = networks(NuwaModels.random(cfg))
    specs = io_specs(cfg, "fp32", 1)
    engine = TorchEngine(nets["unet_step"], specs["unet_step"], compiled=True)
    blocks = [m for m in nets["unet_step"].modules() if isinstance(m, compile_regions())]
    assert len(blocks) >= 4 and all(m._compiled_call_impl is not None for m in blocks)
    assert engine.fn is nets["unet_step"] and nets["unet_step"]._compiled_call_impl is None
    assert torch._dynamo.config.recompile_limit >= 256  # every (block shape, batch) pair compiles, none falls back
    text = TorchEngine(nets["text_encoder"], specs["text_encoder"], compiled=True)  # no repeated blocks of ours
    assert text.fn is not nets["text_encoder"] and not any(
        m._compiled_call_impl is not None for m in nets["text_encoder"].modules())


CHILD = """
import json, torch
from torch._dynamo.utils import counters
from nuwaxl.config import preset
from nuwaxl.engine.torch_backend import TorchEngine, compile_cache
from nuwaxl.iospec import io_specs
from nuwaxl.models.checkpoint import NuwaModels
from nuwaxl.models.networks import networks
cfg = preset("tiny")
spec = io_specs(cfg, "fp32", 1)["text_encoder"]
engine = TorchEngine(networks(NuwaModels.random(cfg))["text_encoder"], spec, compiled=True)
ids = torch.arange(cfg.text.max_length).remainder(cfg.text.vocab_size)[None]
out = engine.run({"input_ids": ids})["embeddings"]
print(json.dumps({"inductor": dict(counters["inductor"]), "loaded": compile_cache.info.get("loaded_files"),
                  "sum": float(out.double().sum())}))
"""


@pytest.mark.slow
def test_compile_cache_carries_compiled_graphs_to_a_new_process(tmp_path):
    """Process 1 compiles and saves its artifacts; process 2, with an empty Inductor cache of its own, loads them
    and compiles nothing; a third run that only hit the cache writes no new file."""
    env = {**os.environ, "NUWAXL_COMPILE_CACHE": str(tmp_path / "cache")}

    def run(i):
        e = {**env, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor{i}")}
        done = subprocess.run([sys.executable, "-c", CHILD], env=e, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = run(1)
    files = list((tmp_path / "cache").rglob("*.bin"))
    assert first["inductor"].get("fxgraph_cache_miss", 0) > 0 and first["loaded"] == 0 and len(files) == 1
    second = run(2)
    assert second["loaded"] == 1 and second["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert second["inductor"]["fxgraph_cache_hit"] == first["inductor"]["fxgraph_cache_miss"]
    assert second["sum"] == first["sum"]
    assert list((tmp_path / "cache").rglob("*.bin")) == files
