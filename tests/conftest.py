"""Shared fixtures and helpers. Import the helpers with `from conftest import STORY, KW, frame_diff`."""

import os

import numpy as np
import pytest
import torch

from nuwaxl.runtime.pipeline import Pipeline

# CI runs two pytest-xdist workers on 2 cores: one thread each, or their torch thread pools fight over the cores
# (the bundled-weights eval test took 80 s instead of 17 s that way).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

MAX_ROWS = 4  # the engine fixtures' batch range: 1..4 rows


def quiet(msg: str) -> None:
    """A build log that says nothing."""


STORY = ["a red caveman walks", "a blue dinosaur jumps", "the sun sets"]
# A small request on the tiny preset: 40 frames with L=8 (depth 2: 1 global + 6 local calls), 4 steps.
KW = dict(num_frames=40, frames_per_call=8, num_inference_steps=4, seed=3, progress=False)


def frame_diff(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    """(max, mean) absolute difference of two uint8 videos, in uint8 levels."""
    d = np.abs(a.astype(int) - b.astype(int))
    return int(d.max()), float(d.mean())


@pytest.fixture(scope="session")
def tiny_pipe() -> Pipeline:
    return Pipeline.from_preset("tiny", seed=0, device="cpu")


def engine_weights(directory):
    """Eager PyTorch modules of the weights an engine directory was built from (as its manifest records them)."""
    from nuwaxl.engine.torch_backend import torch_networks
    from nuwaxl.weights import WeightsSource

    source = WeightsSource.resolve(engines=directory)
    return torch_networks(source.load(), device="cpu", precision="fp32", resolution=source.manifest["resolution"])


def assert_engines_match_pytorch(directory, tmp_path, capsys) -> None:
    """Same weights, seeds and sampler: engine frames equal the eager PyTorch frames up to fp32 rounding (compared
    before video encoding, which would amplify a one-level difference); `generate --engines` makes the video and
    notes that the engines hold random weights."""
    from nuwaxl.cli import main
    from nuwaxl.runtime.video import read_mp4

    kw = dict(num_frames=40, num_inference_steps=3, seed=2, sampler="ddpm", progress=False)
    reference = Pipeline(engine_weights(directory))(["a cat", "a dog"], **kw)
    engines = Pipeline.from_engines(directory, device="cpu")(["a cat", "a dog"], **kw)
    worst, mean = frame_diff(reference.frames, engines.frames)
    assert worst <= 2 and mean < 0.01, (worst, mean)
    out = tmp_path / "v.mp4"
    args = ["generate", "--engines", str(directory), "--frames", "40", "--steps", "2", "--quiet", "--out", str(out)]
    assert main(args) == 0
    assert read_mp4(out).shape == (40, 32, 32, 3)
    note = f"note: generating from random (untrained) weights (engines {directory}), so the video is noise-like"
    assert note in capsys.readouterr().err  # built from a preset: said at generation too
