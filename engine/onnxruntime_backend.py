"""ONNX Runtime engines: the CUDA provider with I/O binding on a GPU (onnxruntime-gpu), the CPU provider otherwise.
The only module that imports onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nuwaxl.dtypes import TORCH_DTYPES
from nuwaxl.errors import UserError
from nuwaxl.iospec import IOSpec

try:
    import onnxruntime as ort
except ImportError:  # reported by `trt-nuwaxl doctor` and when an ORT engine is asked for
    ort = None

NP_DTYPES = {"float16": np.float16, "float32": np.float32, "int64": np.int64}


def status() -> dict:
    if ort is None:
        return {"usable": False, "why": "onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu)"}
    providers = ort.get_available_providers()
    cuda = "CUDAExecutionProvider" in providers
    return {"usable": True, "version": ort.__version__, "providers": providers, "cuda": cuda,
            "why_no_cuda": None if cuda else "this onnxruntime build has no CUDA provider: install onnxruntime-gpu"}


class OrtEngine:
    def __init__(self, onnx_path: str | Path, spec: IOSpec, device: torch.device):
        if ort is None:
            raise UserError("onnxruntime is not installed; pip install onnxruntime (CPU) or onnxruntime-gpu")
        if not Path(onnx_path).is_file():
            raise UserError(f"ONNX file missing: {onnx_path}; rebuild the engines with trt-nuwaxl build")
        self.spec, self.device = spec, device
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UserError("the installed onnxruntime has no CUDA provider; install onnxruntime-gpu "
                                "(in place of onnxruntime) or run on --device cpu")
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()  # use the CUDA / cuDNN libraries that torch ships (ORT >= 1.21)
            stream = torch.cuda.current_stream(device).cuda_stream  # run on torch's stream: ordered, no host sync
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0,
                                                    "user_compute_stream": str(stream)}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            raise UserError(f"ONNX Runtime cannot load {onnx_path} ({str(e)[:200]}); rebuild the engines") from None

    def run(self, feeds: dict[str, torch.Tensor], stream=None) -> dict[str, torch.Tensor]:
        batch = next(iter(feeds.values())).shape[0]
        self.spec.check_batch(batch)
        if self.device.type != "cuda":
            outs = self.session.run(None, {k: v.detach().cpu().numpy() for k, v in feeds.items()})
            return {t.name: torch.from_numpy(o) for t, o in zip(self.spec.outputs, outs, strict=True)}
        binding = self.session.io_binding()
        index = self.device.index or 0
        for t in self.spec.inputs:
            x = feeds[t.name].contiguous()
            binding.bind_input(t.name, "cuda", index, NP_DTYPES[t.dtype], tuple(x.shape), x.data_ptr())
        outputs = {}
        for t in self.spec.outputs:
            y = torch.empty(t.concrete(batch), dtype=TORCH_DTYPES[t.dtype], device=self.device)
            binding.bind_output(t.name, "cuda", index, NP_DTYPES[t.dtype], tuple(y.shape), y.data_ptr())
            outputs[t.name] = y
        self.session.run_with_iobinding(binding)
        return outputs
