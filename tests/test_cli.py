"""`trt-nuwaxl generate` end to end, and every user-facing error it promises."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nuwaxl.cli import main
from nuwaxl.config import preset
from nuwaxl.errors import UserError
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
    "scrambled checkpoint": (lambda d: ["--checkpoint", str(scrambled(d))],
                             "has non-finite values (NaN or infinity) in"),
    "output folder missing": (lambda d: ["--out", str(d / "no" / "v.mp4")], "does not exist"),
    "output is a folder": (lambda d: ["--out", str((d / "x.mp4").mkdir() or d / "x.mp4")], "is a directory"),
    "output not mp4": (lambda d: ["--out", str(d / "v.avi")], "--out " + "{d}/v.avi must end in .mp4"),
    "sheet not png": (lambda d: ["--sheet", str(d / "t.jpg")], "--sheet {d}/t.jpg must end in .png"),
    "guidance nan": (lambda d: ["--guidance", "nan"], "--guidance nan must be a finite number >= 1"),
    "guidance inf": (lambda d: ["--guidance", "inf"], "--guidance inf must be a finite number >= 1"),
    "NUL in the story": (lambda d: ["--story", str(write(d / "s.txt", "a cat\nA\x00dog\n"))],
                         "prompt 2 contains the control character '\\x00'"),
    "million frames, no terminal": (lambda d: ["--frames", "1000000"], "1000000 frames is a large request: a "
                                    "depth-6 plan of 71,432 diffusion calls"),
}


def scrambled(d: Path) -> Path:
    """A checkpoint whose tensor bytes (not its header) were overwritten with random bytes."""
    path = save_checkpoint(NuwaModels.random(preset("tiny")), d / "scrambled.safetensors")
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:] = np.random.default_rng(0).integers(0, 256, len(data) - header, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("case", CASES)
def test_errors_name_value_and_fix(case, tmp_path, capsys, monkeypatch):
    make_args, message = CASES[case]
    extra = make_args(tmp_path)
    base = ["generate", "--preset", "tiny", "--steps", "1", "--quiet", "--out", str(tmp_path / "v.mp4")]
    if "--checkpoint" in extra:
        base = [a for a in base if a not in ("--preset", "tiny")]
    if "1000000" not in extra:  # a large request times one step before it refuses; everything else stops first
        monkeypatch.setattr(Executor, "submit", lambda *a, **k: pytest.fail("model work before the error"))
    assert main(base + extra) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("trt-nuwaxl: error: "), err
    assert message.format(d=tmp_path) in err, err
    assert not (tmp_path / "v.mp4").exists()


def test_a_million_frames_say_how_long_and_go_ahead_only_when_confirmed(tmp_path, capsys, monkeypatch):
    out = tmp_path / "v.mp4"
    args = ["generate", "--preset", "tiny", "--frames", "1000000", "--steps", "1", "--quiet", "--out", str(out)]
    assert main(args) == 2  # no terminal to ask on: stop, with the numbers
    assert "denoising alone would take up to" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt: asked.append(prompt) or "n")
    assert main(args) == 2
    assert "Continue? [y/N]" in asked[0] and "cancelled; nothing was generated" in capsys.readouterr().err
    monkeypatch.setattr(Executor, "submit", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("went ahead")))
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    with pytest.raises(RuntimeError, match="went ahead"):
        main(args)
    asked.clear()
    with pytest.raises(RuntimeError, match="went ahead"):
        main(args + ["--yes"])  # --yes: no question asked
    assert not asked and not out.exists()


def test_warnings_are_one_line_each(tmp_path, capsys):
    story = write(tmp_path / "s.txt", "Fred walks in the quarry\nan astronaut on the moon\n" + "fred " * 20_000)
    assert main(["generate", "--story", str(story), "--frames", "16", "--steps", "1", "--guidance", "1",
                 "--resolution", "96", "--quiet", "--sheet", "none", "--out", str(tmp_path / "v.mp4")]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if line.startswith("trt-nuwaxl: warning: ")]
    assert len(warned) == 3, err
    assert "longer than the 77 tokens" in warned[0]
    assert "not trained on: 'an', 'astronaut', 'moon', 'on'" in warned[1] and "trained at 64 px; at 96 px" in warned[2]
    assert "--resolution" in warned[2] and ".py:" not in err  # CLI words, no Python source locations


def test_half_precision_on_the_cpu_warns(tmp_path, capsys):
    assert main(["generate", *FAST, "--precision", "fp16", "--frames", "16", "--sheet", "none",
                 "--out", str(tmp_path / "v.mp4")]) == 0
    assert "trt-nuwaxl: warning: precision fp16 on the CPU is about 19x slower than fp32" in capsys.readouterr().err


def test_api_errors_speak_python_and_cli_errors_speak_flags(capsys):
    from nuwaxl.runtime.pipeline import Pipeline

    if torch.cuda.is_available():
        pytest.skip("checks the message shown when no GPU is present")
    with pytest.raises(UserError, match="no CUDA GPU is visible; use device='cpu'"):
        Pipeline.from_preset("tiny", device="cuda")
    with pytest.raises(UserError, match=r"checkpoint not found: nope.safetensors; give path a .safetensors file"):
        Pipeline.from_pretrained("nope.safetensors")
    assert main(["generate", "--checkpoint", "nope.safetensors"]) == 2
    assert "give --checkpoint PATH a .safetensors file" in capsys.readouterr().err


def test_help_shows_each_default_once():
    import io
    from contextlib import redirect_stdout

    for command in ("generate", "build", "eval", "train"):
        text = io.StringIO()
        with redirect_stdout(text), pytest.raises(SystemExit):
            main([command, "--help"])
        flat = " ".join(text.getvalue().split())
        assert "(default: None)" not in flat and not re.search(r"\(default: [^)]*\) \(default:", flat), command


def test_stale_partial_files_of_the_same_output_are_removed(tmp_path):
    import os
    import time

    dead = tmp_path / ".v.mp4.999999999.abcd1234.partial.mp4"  # a writer killed with SIGKILL
    live = tmp_path / f".v.mp4.{os.getppid()}.efgh5678.partial.mp4"  # another writer, still running
    legacy = tmp_path / ".v.mp4.k2j3h4g5.partial.mp4"  # an older version's, untouched for an hour
    other = tmp_path / ".w.mp4.999999999.abcd1234.partial.mp4"  # another output's: not ours to touch
    for f in (dead, live, legacy, other):
        f.write_bytes(b"half a video")
    os.utime(legacy, (time.time() - 3600, time.time() - 3600))
    assert main(["generate", *FAST, "--frames", "16", "--sheet", "none", "--out", str(tmp_path / "v.mp4")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "v.mp4"])


def _start_generate(tmp_path):
    out = tmp_path / "v.mp4"
    script = Path(sys.executable).parent / "trt-nuwaxl"
    # A shell starts background jobs (CI runners, `cmd &`) with SIGINT ignored, and Python keeps an ignored SIGINT:
    # give the child the disposition a terminal's foreground process has.
    proc = subprocess.Popen([str(script), "generate", "--preset", "tiny", "--frames", "3000", "--steps", "50",
                             "--quiet", "--out", str(out)], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not list(tmp_path.glob(".v.mp4.*.partial.mp4")):  # the video is being written
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.05)
    return proc, out


@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "trt-nuwaxl: interrupted; unfinished outputs "
                                                                 "were removed"),
                                             (signal.SIGTERM, 143, "trt-nuwaxl: terminated (SIGTERM); unfinished "
                                                                   "outputs were removed")])
def test_interrupted_run_exits_with_one_line_and_leaves_nothing(sig, code, said, tmp_path):
    proc, out = _start_generate(tmp_path)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == said and "Traceback" not in err, err  # one line, not a traceback
    assert len(lines) == 3 and lines[0].startswith("note: generating from random")
    assert lines[1].startswith("3000 frames, mode dod")
    assert list(tmp_path.iterdir()) == []  # neither the video nor a hidden partial file


def test_a_killed_run_leaves_a_partial_file_that_the_next_run_removes(tmp_path):
    proc, out = _start_generate(tmp_path)
    proc.kill()
    proc.wait(timeout=60)
    assert len(list(tmp_path.glob(".v.mp4.*.partial.mp4"))) == 1
    assert main(["generate", *FAST, "--frames", "16", "--sheet", "none", "--out", str(out)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]


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


def test_a_signal_right_after_the_partial_file_is_made_still_removes_it(tmp_path, monkeypatch):
    """The race a CI run hit: SIGTERM after the temporary file existed and before the block that removes it. Here
    the signal is sent right after the file is made (in a process with other threads, as the CLI's is, it may be
    delivered to any of them; Python raises it in the main thread at its next instruction)."""
    from nuwaxl import files

    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop

    real = os.open

    def open_then_signal(*args, **kwargs):
        fd = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return fd

    previous = signal.signal(signal.SIGTERM, stop)
    monkeypatch.setattr(os, "open", open_then_signal)
    try:
        with pytest.raises(Stop), files.atomic_output(tmp_path / "v.mp4"):
            time.sleep(5)  # the signal is raised by here at the latest (it interrupts the sleep)
    finally:
        monkeypatch.undo()
        signal.signal(signal.SIGTERM, previous)
    assert list(tmp_path.iterdir()) == []
