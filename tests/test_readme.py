"""Every code block in README.md works as written.

- Python blocks run as written, in a fresh process from the repository root (they use the bundled weights on the
  CPU and are sized to take seconds).
- Shell blocks: every `trt-nuwaxl` line is parsed by the real argument parser (unknown flags and choices fail),
  and the files it reads (`--story`, `--checkpoint`, `--engines`, `--videos`, `--captions`) must exist in the
  repository or be made by an earlier line of the README; `python FILE` and `torchrun ... FILE` name files that
  exist. The two install commands are the ones CI runs (.ci/run) and the first-command check in the closing notes.
  GPU-only lines (`--device cuda`, torchrun, benchmarks) are not run here: CI has no GPU.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from nuwaxl.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)
READS = ("--story", "--checkpoint", "--engines", "--videos", "--captions")
MAKES = ("--out", "--run", "--export")


def test_ci_runs_the_readme_test_command():
    ci_command = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert len(ci_command) == 1
    assert f"```bash\n{ci_command[0]}\n```" in README


def shell_commands() -> list[list[str]]:
    """Every command of the README's bash blocks, comments dropped, `&&` chains split."""
    commands = []
    for lang, body in BLOCKS:
        if lang != "bash":
            continue
        for line in body.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line.split(" #")[0], posix=True, punctuation_chars=";&|")  # quotes respected
            lexer.whitespace_split = True
            parts: list[list[str]] = [[]]
            for token in lexer:
                if set(token) <= set(";&|"):  # ;, &&, ||, |, &
                    parts.append([])
                else:
                    parts[-1].append(token)
            for words in parts:
                while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes
                    words = words[1:]
                if words:
                    commands.append(words)
    return commands


def test_every_trt_nuwaxl_command_parses_and_its_inputs_exist():
    made: set[Path] = set()
    checked = 0
    for words in shell_commands():
        if words[0] != "trt-nuwaxl":
            continue
        args = words[1:]
        try:
            build_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"README command does not parse: {shlex.join(words)}")
        for flag, value in zip(args, args[1:], strict=False):
            if flag in MAKES:
                made.add((ROOT / value).resolve())
            if flag in READS:
                path = (ROOT / value).resolve()
                assert path.exists() or path in made, f"{shlex.join(words)}: {value} does not exist"
        checked += 1
    assert checked >= 12  # generate, build, doctor, info, train, eval lines


def test_scripts_the_readme_runs_exist():
    for words in shell_commands():
        scripts = [w for w in words if w.endswith(".py")] if words[0] in ("python", "python3", "torchrun") else []
        for script in scripts:
            assert (ROOT / script).is_file(), shlex.join(words)


@pytest.mark.slow
@pytest.mark.parametrize("code", [body for lang, body in BLOCKS if lang == "python"],
                         ids=lambda body: body.splitlines()[0][:40])
def test_python_blocks_run_as_written(code, tmp_path):
    (tmp_path / "block.py").write_text(code)
    proc = subprocess.run([sys.executable, str(tmp_path / "block.py")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_checkout_root_finds_the_subpackages_without_an_install():
    """From the repository's root, `nuwaxl` is this source folder (it shadows an installed copy); its subpackages,
    laid out beside it by pyproject's package-dir, are found all the same (python -S: no site-packages, so no
    editable-install finder to help)."""
    code = "import importlib.util as u; print([u.find_spec(f'nuwaxl.{p}').origin for p in ('runtime', 'engine')])"
    done = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert str(ROOT / "runtime" / "__init__.py") in done.stdout and str(ROOT / "engine") in done.stdout
