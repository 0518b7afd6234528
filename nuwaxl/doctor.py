"""`trt-nuwaxl doctor`: what can run here, with versions, and for what cannot, why."""

from __future__ import annotations

import platform
import shutil

import torch


def report() -> dict:
    from nuwaxl.engine import onnxruntime_backend, tensorrt_backend

    gpu = None
    if torch.cuda.is_available():
        cc = torch.cuda.get_device_capability()
        gpu = {"name": torch.cuda.get_device_name(), "compute_capability": f"{cc[0]}.{cc[1]}",
               "count": torch.cuda.device_count(), "cuda": torch.version.cuda}
    no_gpu = "no CUDA GPU is visible"
    ort = onnxruntime_backend.status()
    trt = tensorrt_backend.status()
    compiler = shutil.which("g++") or shutil.which("c++")
    backends = {
        "torch-eager": {"usable": True, "why": None},
        "torch-compile": {"usable": gpu is not None or compiler is not None,
                          "why": None if gpu or compiler else "no GPU and no C++ compiler for Inductor's CPU code"},
        "torch-cudagraph": {"usable": gpu is not None, "why": None if gpu else no_gpu},
        "torch-aoti": {"usable": gpu is not None or compiler is not None,
                       "why": None if gpu or compiler else "no GPU and no C++ compiler for AOTInductor"},
        "onnxruntime-cpu": {"usable": ort["usable"], "why": None if ort["usable"] else ort["why"]},
        "onnxruntime-cuda": {"usable": bool(ort.get("cuda")) and gpu is not None,
                             "why": (ort.get("why") or ort.get("why_no_cuda")) if not ort.get("cuda")
                             else (None if gpu else no_gpu)},
        "tensorrt-build": {"usable": trt["can_build"], "why": trt["why_not_build"]},
        "tensorrt-run": {"usable": trt["can_run"], "why": trt["why_not_run"]},
    }
    from nuwaxl.engine import torch_backend

    graphs = {"torch-cudagraph": "torch.cuda.graph around live modules (the *-cudagraph torch modes)",
              "torch-aoti": torch_backend.CUDA_GRAPHS, "onnxruntime-cuda": onnxruntime_backend.CUDA_GRAPHS,
              "tensorrt-run": tensorrt_backend.CUDA_GRAPHS}
    for name, item in backends.items():
        item["cuda_graphs"] = graphs.get(name, "no: runs on the CPU" if name.endswith("-cpu") else
                                         "n/a: builds plans" if name.endswith("-build") else
                                         "no: torch mode without graphs")
    return {"python": platform.python_version(), "torch": torch.__version__, "gpu": gpu,
            "onnxruntime": ort.get("version"), "onnxruntime_providers": ort.get("providers"),
            "tensorrt": {"library": trt["library"], "version": trt.get("version")}, "backends": backends}
