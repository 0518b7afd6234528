"""The backends and torch modes, named once. The CLI's choices, `build`, `doctor` and the engine directory read them
from here; nothing here imports a backend library, so the CLI can list them for free."""

import importlib
from types import ModuleType
from typing import Literal

# Each backend: its module and the folders it keeps inside an engine directory. The module alone imports the
# backend's library and provides the protocol: `status()` (its library here), `doctor(gpu)` (its rows in
# `trt-nuwaxl doctor`), `check_build(device, precision)` and `build_network(job, name, module, reference, spec)`
# (its stages of `trt-nuwaxl build`, engine.stage.BuildJob), `files(directory, name)` and `load(directory, name,
# spec, device)` (an engine directory's files), `CUDA_GRAPHS` (how its engines are captured) and
# `TENSOR_ELEMENTS_MAX` (the most elements one tensor may hold, or None; bounds the networks' rows).
# Adding a backend is one module and one line here.
BACKEND_MODULES = {"tensorrt": ("nuwaxl.engine.tensorrt_backend", ("onnx", "tensorrt")),
                   "onnxruntime": ("nuwaxl.engine.onnxruntime_backend", ("onnx",)),
                   "torch": ("nuwaxl.engine.torch_backend", ("torch",))}
BACKENDS = tuple(BACKEND_MODULES)
BACKEND_FOLDERS = {name: folders for name, (_, folders) in BACKEND_MODULES.items()}


def backend_module(name: str) -> ModuleType:
    """Imports the backend's library: call it only when that backend is used."""
    return importlib.import_module(BACKEND_MODULES[name][0])

TorchMode = Literal["eager", "compile", "cudagraph", "compile-cudagraph"]
# Live PyTorch modules: eager, torch.compile, CUDA graphs per batch shape, CUDA graphs around compiled code.
TORCH_MODES: tuple[TorchMode, ...] = ("eager", "compile", "cudagraph", "compile-cudagraph")
# A torch engine directory runs its AOTInductor packages, or live modules from its checkpoint.
ENGINE_TORCH_MODES = ("aoti", *TORCH_MODES)
