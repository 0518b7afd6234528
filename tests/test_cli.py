"""`trt-nuwaxl generate` end to end, and every user-facing error it promises."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nuwaxl.cli import main
from nuwaxl.config import preset
from nuwaxl.models.checkpoint import NuwaModels, save_checkpoint
from nuwaxl.runtime.executor import Executor
from nuwaxl.runtime.video import read_mp4

FAST = ["--preset", "tiny", "-L", "8", "--steps", "2", "--quiet"]


def test_generate_writes_mp4_with_exactly_n_frames(tmp_path):
    out = tmp_path / "video.mp4"
    assert main(["generate", *FAST, "--frames", "45", "--out", str(out)]) == 0
    frames = read_mp4(out)
    assert frames.shape == (45, 32, 32, 3)
    assert (tmp_path / "video_tree.png").stat().st_size > 0
    assert not list(tmp_path.glob(".*partial*"))


def test_generate_from_checkpoint_ar_mode(tmp_path):
    ckpt = save_checkpoint(NuwaModels.random(preset("tiny"), seed=5), tmp_path / "tiny.safetensors")
    story = tmp_path / "story.txt"
    story.write_text("# comment\nfirst prompt\n\nsecond prompt\n")
    out = tmp_path / "ar.mp4"
    args = ["generate", "--checkpoint", str(ckpt), "--story", str(story), "--frames", "20", "-L", "8", "--steps", "2",
            "--mode", "ar", "--out", str(out), "--quiet"]
    assert main(args) == 0
    assert read_mp4(out).shape[0] == 20


@pytest.mark.parametrize("flags, shown", [([], "guidance 3,"), (["--guidance", "1"], "guidance 1,")])
def test_generate_uses_the_bundled_weights_and_their_guidance(flags, shown, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    assert main(["generate", "--frames", "16", "--steps", "1", "--quiet", "--sheet", "none", "--out", str(out),
                 *flags]) == 0
    err = capsys.readouterr().err
    assert shown in err and "random weights" not in err, err
    assert read_mp4(out).shape == (16, 64, 64, 3)


def test_console_script_runs(tmp_path):
    script = Path(sys.executable).parent / "trt-nuwaxl"
    out = tmp_path / "v.mp4"
    proc = subprocess.run([str(script), "generate", *FAST, "--frames", "16", "--out", str(out), "--sheet", "none"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stderr and read_mp4(out).shape[0] == 16


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


CASES = {
    "unreachable frame count": (
        lambda d: ["--frames", "300", "--depth", "2", "-L", "16"],
        "300 frames cannot be reached with L=16 and depth 2 (at most 226 frames); use --depth 3"),
    "empty story": (lambda d: ["--story", str(write(d / "s.txt", "# only a comment\n\n"))], "has no prompts"),
    "missing story": (lambda d: ["--story", str(d / "nope.txt")], "story file not found"),
    "story is a folder": (lambda d: ["--story", str(d)], "is a directory; pass a text file"),
    "story not text": (lambda d: ["--story", str((d / "b.txt").open("wb").write(b"\xff\xfe\x00") and d / "b.txt")],
                       "is not UTF-8 text"),
    "more prompts than frames": (lambda d: ["--story", str(write(d / "s.txt", "a\nb\nc\n")), "--frames", "2"],
                                 "3 prompts but only 2 frames"),
    "resolution": (lambda d: ["--resolution", "36"], "36 px is not divisible by the VAE factor 8; use a multiple of 8"),
    "missing checkpoint": (lambda d: ["--checkpoint", str(d / "none.safetensors")], "checkpoint not found"),
    "corrupt checkpoint": (lambda d: ["--checkpoint", str(write(d / "c.safetensors", "garbage"))],
                           "not a readable safetensors file"),
    "output folder missing": (lambda d: ["--out", str(d / "no" / "v.mp4")], "does not exist"),
    "output is a folder": (lambda d: ["--out", str((d / "x.mp4").mkdir() or d / "x.mp4")], "is a directory"),
    "output not mp4": (lambda d: ["--out", str(d / "v.avi")], "must end in .mp4"),
}


@pytest.mark.parametrize("case", CASES)
def test_errors_name_value_and_fix(case, tmp_path, capsys):
    make_args, message = CASES[case]
    extra = make_args(tmp_path)
    base = ["generate", "--preset", "tiny", "--steps", "1", "--quiet", "--out", str(tmp_path / "v.mp4")]
    if "--checkpoint" in extra:
        base = [a for a in base if a not in ("--preset", "tiny")]
    assert main(base + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("trt-nuwaxl: error: ") and message in err, err
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when no GPU is present")
def test_cuda_without_gpu(tmp_path, capsys):
    assert main(["generate", *FAST, "--device", "cuda", "--out", str(tmp_path / "v.mp4")]) == 2
    assert "no CUDA GPU is visible; use --device cpu" in capsys.readouterr().err


def test_argument_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--frames", "0"])
    assert e.value.code == 2 and "0 must be at least 1" in capsys.readouterr().err


def test_failed_run_leaves_nothing_half_written(tmp_path, monkeypatch):
    out = tmp_path / "video.mp4"
    out.write_bytes(b"previous result")
    calls = []
    finish = Executor.finish

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("simulated failure in the middle of generation")
        return finish(self, *args, **kwargs)

    monkeypatch.setattr(Executor, "finish", failing)
    with pytest.raises(RuntimeError, match="simulated failure"):
        main(["generate", *FAST, "--frames", "40", "--max-batch", "1", "--out", str(out)])
    assert out.read_bytes() == b"previous result"  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video.mp4"]  # no partial files left behind


def test_info_reports_paper_preset_parameter_count(capsys):
    import json

    assert main(["info", "--preset", "paper"]) == 0
    captured = capsys.readouterr()
    info = json.loads(captured.out)
    assert 0.95e9 < info["parameters"]["unet"] < 1.2e9 and info["latent_shape"] == [4, 16, 16]
    assert "unet 1076.0 M" in captured.err


def test_tree_sheet_shows_each_level(tmp_path):
    from nuwaxl.runtime.planner import plan_dod
    from nuwaxl.runtime.video import sheet_rows

    rows = sheet_rows(plan_dod(1024, 16, 3), max_per_row=16)
    assert [level for level, _ in rows] == [1, 2, 3]
    assert rows[0][1] == [0, 225, 450, 675, 900]  # keyframes inside the video
    assert len(rows[2][1]) == 16 and rows[2][1][0] == 1 and rows[2][1][-1] == 1023
