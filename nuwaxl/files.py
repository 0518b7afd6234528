"""Atomic file output: write a hidden temporary file beside the target, rename it into place only on success.

A failed or interrupted run never leaves a half-written file under the final name, nor damages an old one. The
temporary file's name carries the writer's process id (`.NAME.PID.RANDOM.partial.SUFFIX`), so a later write of
the same output removes what a killed writer (SIGKILL, a power cut) left, and never touches a live writer's file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
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


# Signals whose Python handlers raise (Ctrl-C, the CLI's SIGTERM): held back while the temporary file is created,
# so that one arriving right then is raised inside the block that removes the file, not just before it.
INTERRUPTS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    path = Path(path)
    remove_stale_partials(path)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".",
                                   prefix=f".{path.name}.{os.getpid()}.", suffix=f".partial{path.suffix}")
        os.close(fd)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a signal held back is handled here, inside the try
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; finished outputs get the usual permissions
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
