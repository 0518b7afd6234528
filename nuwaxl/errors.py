"""User-facing errors: each names the bad value and the fix; the CLI prints them without a traceback.

The same checks serve the Python API and the command line, so a fix is written with `option(name, value)`, which
reads `num_inference_steps=0` to a Python caller and `--steps 0` on the command line (the CLI switches the
wording with `speaking_to_cli`). One table maps the API's parameter names to the CLI's flags.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator


class UserError(ValueError):
    """A problem with what the user asked for (input, path, file), as opposed to a bug."""


# API parameter -> CLI flag, where the flag is not simply --name-with-dashes.
CLI_FLAGS = {
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance",
    "memory_budget_gib": "--memory-budget",
    "num_frames": "--frames",
    "path": "--checkpoint",
    "allow_large": "--yes",
    "cuda_graphs": "--no-cuda-graphs",
}

_cli = contextvars.ContextVar("nuwaxl_cli", default=False)


class Cancelled(Exception):
    """A generation stopped because its caller asked (`Pipeline.run(cancel=...)` said so between two steps)."""


@contextlib.contextmanager
def speaking_to_cli() -> Iterator[None]:
    """Within this block, `option` writes command-line flags."""
    token = _cli.set(True)
    try:
        yield
    finally:
        _cli.reset(token)


def option(name: str, value: object = ..., cli_value: object = ...) -> str:
    """How the user sets parameter `name` (to `value`): `name=value` in Python, `--flag value` on the command line.
    `cli_value` overrides the value as the command line spells it (a flag that takes no value: None)."""
    if _cli.get():
        flag = CLI_FLAGS.get(name, "--" + name.replace("_", "-"))
        shown = value if cli_value is ... else cli_value
        return flag if shown in (..., None) else f"{flag} {shown}"
    return name if value is ... else f"{name}={value!r}"
