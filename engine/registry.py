"""The backends and torch modes, named once. The CLI's choices, `build`, `doctor` and the engine directory read them
from here; nothing here imports a backend library, so the CLI can list them for free."""

from typing import Literal

BACKENDS = ("tensorrt", "onnxruntime", "torch")
# Where each backend keeps its files inside an engine directory.
BACKEND_FOLDERS = {"tensorrt": ("onnx", "tensorrt"), "onnxruntime": ("onnx",), "torch": ("torch",)}

TorchMode = Literal["eager", "compile", "cudagraph", "compile-cudagraph"]
# Live PyTorch modules: eager, torch.compile, CUDA graphs per batch shape, CUDA graphs around compiled code.
TORCH_MODES: tuple[TorchMode, ...] = ("eager", "compile", "cudagraph", "compile-cudagraph")
# A torch engine directory runs its AOTInductor packages, or live modules from its checkpoint.
ENGINE_TORCH_MODES = ("aoti", *TORCH_MODES)
