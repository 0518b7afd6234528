"""trt-nuwaxl: NUWA-XL diffusion-over-diffusion long-video generation."""

from pathlib import Path as _Path

__version__ = "0.1.0"

# In a source checkout the subpackages (models, export, engine, runtime, train) sit beside this folder, mapped by
# pyproject.toml's package-dir; an install puts them inside it. So that `python -m nuwaxl.cli` and scripts run from
# the checkout's root (where this folder shadows an installed copy) find them, look there too.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "runtime" / "pipeline.py").is_file():
    __path__.append(str(_checkout))


def __getattr__(name):  # lazy: `import nuwaxl` stays light; `from nuwaxl import Pipeline` pulls in torch
    if name == "Pipeline":
        from nuwaxl.runtime.pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)
