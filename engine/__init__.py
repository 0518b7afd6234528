"""Engines: the networks generation needs, behind one small interface (`engine.base.Networks`).

Backends: `torch_eager` (PyTorch modules from a checkpoint). ONNX Runtime, TensorRT and compiled torch engines
built from exported ONNX are the engines issue's work.
"""
