"""Atomic file output: write a hidden temporary file beside the target, rename it into place only on success.

A failed or interrupted run never leaves a half-written file under the final name, nor damages an old one. The
temporary file's name carries the writer's process id (`.NAME.PID.RANDOM.partial.SUFFIX`), so a later write of
the same output removes what a killed writer (SIGKILL, a power cut) left, and never touches a live writer's file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

LEGACY_GRACE_S = 600  # partial files without a process id (older versions): stale once untouched this long


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_partials(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that dead writers of `path` left behind; returns what was removed."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    removed = []
    for tmp in parent.glob(f".{path.name}.*.partial{path.suffix}"):
        middle = tmp.name[len(path.name) + 2: -len(f".partial{path.suffix}")]  # "PID.RANDOM" or "RANDOM"
        pid = middle.split(".")[0]
        if pid.isdigit():
            stale = int(pid) != os.getpid() and not _alive(int(pid))
        else:
            stale = time.time() - tmp.stat().st_mtime > LEGACY_GRACE_S
        if stale:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    path = Path(path)
    remove_stale_partials(path)
    # The name is chosen before the file exists and the file is made inside the `try`: a Ctrl-C or SIGTERM that
    # comes right after it was made (Python raises it at the next instruction) still reaches the `finally`. (No other
    # writer can hold this name: it carries our process id and 64 random bits.)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.partial{path.suffix}"
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # made 0600 above; finished outputs get the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
