"""The backends and torch modes, named once. The CLI's choices, `build`, `doctor` and the engine directory read them
from here; nothing here imports a backend library, so the CLI can list them for free."""

import importlib
from types import ModuleType
from typing import Literal

# Each backend: its module (which alone imports the backend's library and provides `status()`, `load(directory,
# name, spec, device)` and `files(directory, name)`) and the folders it keeps inside an engine directory.
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
