"""Engines: the networks generation needs, behind one interface (`engine.base.Engine`, see `EngineNetworks`).

Backends: torch (eager, torch.compile, CUDA graphs, AOTInductor packages), ONNX Runtime and TensorRT; each
foreign library is imported by exactly one module.
"""
