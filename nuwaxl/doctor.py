"""`trt-nuwaxl doctor`: what can run here, with versions, and for what cannot, why. Each backend module reports its
own rows (`doctor(gpu)`, the registry protocol), with how it runs as CUDA graphs."""

from __future__ import annotations

import platform

import torch

from nuwaxl.engine.registry import BACKENDS, backend_module


def report() -> dict:
    gpu = None
    if torch.cuda.is_available():
        cc = torch.cuda.get_device_capability()
        gpu = {"name": torch.cuda.get_device_name(), "compute_capability": f"{cc[0]}.{cc[1]}",
               "count": torch.cuda.device_count(), "cuda": torch.version.cuda}
    backends, versions = {}, {}
    for name in BACKENDS:
        module = backend_module(name)
        backends.update(module.doctor(gpu is not None))
        versions[name] = module.status()
    ort, trt = versions["onnxruntime"], versions["tensorrt"]
    return {"python": platform.python_version(), "torch": torch.__version__, "gpu": gpu,
            "onnxruntime": ort.get("version"), "onnxruntime_providers": ort.get("providers"),
            "tensorrt": {"library": trt["library"], "version": trt.get("version")}, "backends": backends}
