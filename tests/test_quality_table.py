"""The quality table's tools on tiny version-2 weights: benchmarks/quality.py's FDM* rows and v2 columns, and the
README strip of benchmarks/story_strip.py."""

import json
import sys

import numpy as np
import pytest

from benchmarks import quality
from benchmarks.story_strip import strip
from nuwaxl.cli import main as cli_main


def tiny_weights(tmp_path, name: str, ar_fraction: float, version: int = 2) -> str:
    out = tmp_path / f"{name}.safetensors"
    cli_main(["train", "--run", str(tmp_path / name), "--preset", "tiny", "--stories", "2", "--story-frames", "200",
              "--story-version", str(version), "--stage", "mtd", "--steps", "2", "--batch", "2", "--ar-fraction",
              str(ar_fraction), "--no-progress", "--export", str(out)])
    return str(out)


def run_quality(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["quality.py", *args])
    quality.main()


def test_fdm_rows_run_the_baseline_autoregressively_with_version_2_columns(tmp_path, monkeypatch):
    dod, fdm = tiny_weights(tmp_path, "dod", 0.2), tiny_weights(tmp_path, "fdm", 1.0)
    out, md = tmp_path / "q.json", tmp_path / "q.md"
    run_quality(monkeypatch, "--checkpoint", dod, "--baseline", fdm, "--rows", "ar:16,fdm:16", "--frames-budget",
                "16", "--min-stories", "1", "--steps", "2", "--device", "cpu", "--out", str(out), "--md", str(md))
    data = json.loads(out.read_text())
    ar, star = data["rows"]
    assert (ar["mode"], star["mode"]) == ("ar", "fdm") and data["meta"]["story_version"] == 2
    assert star["avg_fd"] != ar["avg_fd"]  # the FDM* row used the other weights (same prompts, seed and mode)
    assert {"motion_p95_px", "presence", "identity_stability", "coherence", "real_coherence"} <= star.keys()
    table = md.read_text()
    assert "| FDM* |" in table and "identity stability" in table and "fdm.safetensors" in table


def test_fdm_rows_need_a_baseline_of_the_same_story_version(tmp_path, monkeypatch):
    dod, v1 = tiny_weights(tmp_path, "dod", 0.2), tiny_weights(tmp_path, "v1", 1.0, version=1)
    common = ["--rows", "fdm:16", "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "q.json")]
    with pytest.raises(SystemExit, match="--baseline fdm.safetensors"):
        run_quality(monkeypatch, "--checkpoint", dod, *common)
    with pytest.raises(SystemExit, match="story version 1"):
        run_quality(monkeypatch, "--checkpoint", dod, "--baseline", v1, *common)


def test_strip_puts_each_video_in_a_row_at_the_chosen_frames():
    videos = [np.full((10, 8, 8, 3), v, np.uint8) for v in (0, 100, 200)]
    sheet = np.asarray(strip(videos, [0, 9], scale=2))
    assert sheet.shape == (12 + 3 * (16 + 2), 2 * (16 + 2), 3)
    for row, value in enumerate((0, 100, 200)):
        assert (sheet[12 + row * 18: 12 + row * 18 + 16, :16] == value).all()
