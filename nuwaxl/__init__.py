"""trt-nuwaxl: NUWA-XL diffusion-over-diffusion long-video generation."""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import nuwaxl` stays light; `from nuwaxl import Pipeline` pulls in torch
    if name == "Pipeline":
        from nuwaxl.runtime.pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)
