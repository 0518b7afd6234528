"""PyTorch engines: eager (the reference), torch.compile, CUDA graphs per batch size, and AOTInductor packages.

Eager, compile and CUDA-graph engines wrap live modules built from a checkpoint; an AOTInductor package (.pt2)
is a compiled engine file that runs without the model code.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import torch
from torch import nn

from nuwaxl.config import ModelConfig, preset
from nuwaxl.dtypes import precision_name, torch_dtype
from nuwaxl.engine.base import EngineNetworks, NetworkSpec
from nuwaxl.engine.registry import TORCH_MODES, TorchMode
from nuwaxl.errors import UserError, option
from nuwaxl.iospec import IOSpec

BIND_INPUTS = ("context", "cond", "mask")  # the UNet inputs fixed while a batch of calls is sampled


def _compile(fn):
    # One specialised graph per batch size (dynamic=False): the few sizes a plan uses are known, and static shapes
    # let Inductor pick the best kernels; a CUDA graph is captured around them in "compile-cudagraph".
    return torch.compile(fn, dynamic=False)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but no CUDA GPU is visible; use {option('device', 'cpu')}")
    return dev


def resolve_dtype(precision: str | None, device: torch.device) -> torch.dtype:
    """auto: fp16 on a GPU, fp32 on the CPU (where half precision is emulated and slow)."""
    if precision in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = torch_dtype(precision)
    if device.type == "cpu" and dtype != torch.float32:
        # Measured on 2 CPU cores, small preset, 31 frames: fp16 215 s, fp32 11 s (README "Using it").
        warnings.warn(f"precision {precision} on the CPU is about 19x slower than fp32 (no half-precision kernels); "
                      f"use {option('precision', 'fp32')} there", stacklevel=3)
    return dtype


class TorchEngine:
    """A live module; `compile` wraps it in torch.compile (recompiles per new batch size, then reuses).

    A module with `prepare` and `step` (the UNet) can also be bound to the inputs that stay fixed while a batch
    of calls is sampled: `bind` runs `prepare` once and returns eps(x_t, t), which runs only `step`.
    """

    spec = None  # live modules take any batch

    def __init__(self, module: nn.Module, spec: IOSpec, mode: TorchMode = "eager"):
        self.names = [t.name for t in spec.inputs]
        self.out_name = spec.outputs[0].name
        self.module = module
        compiled = mode in ("compile", "compile-cudagraph")
        self.fn = _compile(module) if compiled else module
        self.bindable = hasattr(module, "prepare") and hasattr(module, "step")
        if self.bindable:
            self.prepare_fn = _compile(module.prepare) if compiled else module.prepare
            self.step_fn = _compile(module.step) if compiled else module.step

    @torch.inference_mode()
    def run(self, feeds, stream=None):
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            return {self.out_name: self.fn(*(feeds[n] for n in self.names))}

    @torch.inference_mode()
    def bind(self, fixed: dict[str, torch.Tensor]):
        """eps(x_t, timesteps) with `fixed` (context, cond, mask) prepared once; None if the module cannot."""
        if not self.bindable:
            return None
        prepared = self.prepare_fn(*(fixed[n] for n in BIND_INPUTS))

        @torch.inference_mode()
        def denoise(x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return self.step_fn(x_t, timesteps, *prepared)

        return denoise

    def release(self) -> None:
        """Drop cached per-shape state (CUDA graphs and their memory pools); nothing for plain modules."""


def _capture(fn, args: list[torch.Tensor], pool=None) -> tuple[torch.cuda.CUDAGraph, object]:
    """Warm `fn` up on a side stream (compilation, cuDNN autotuning, allocator), then capture one call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn(*args)
    return graph, out


class CudaGraphEngine(TorchEngine):
    """Captures one CUDA graph per input shape (a batch-size bucket) and replays it; the launch overhead of a
    lone 16-frame call is most of its time (paper UNet on an H200: 23.2 ms eager vs 11.7 ms graphed, README
    "Speed" and benchmarks/results/EXPERIMENTS.md).
    With compile=True the graphs are captured around torch.compile'd code ("compile-cudagraph")."""

    def __init__(self, module: nn.Module, spec: IOSpec, compile: bool = False):
        super().__init__(module, spec, "compile-cudagraph" if compile else "eager")
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict, torch.Tensor]] = {}
        self.bound: dict[tuple, tuple] = {}

    def release(self) -> None:
        self.graphs.clear()
        self.bound.clear()

    @torch.inference_mode()
    def _capture(self, feeds):
        static = {n: feeds[n].clone() for n in self.names}
        graph, out = _capture(self.fn, [static[n] for n in self.names])
        return graph, static, out

    @torch.inference_mode()
    def bind(self, fixed: dict[str, torch.Tensor]):
        """Two graphs per batch shape: `prepare` (replayed here, once per batch of calls) and `step` (replayed per
        denoising step), sharing one memory pool; `step` reads `prepare`'s outputs in place. A bound denoiser
        is valid until the next `bind` with the same shapes (the executor binds one batch at a time)."""
        if not self.bindable:
            return None
        key = tuple((n, tuple(fixed[n].shape), fixed[n].dtype) for n in BIND_INPUTS)
        if key not in self.bound:
            static = {n: fixed[n].clone() for n in BIND_INPUTS}
            prep_graph, prepared = _capture(self.prepare_fn, [static[n] for n in BIND_INPUTS])
            b, l = fixed["cond"].shape[:2]
            x = torch.zeros_like(fixed["cond"])
            t = torch.zeros(b, dtype=torch.int64, device=x.device)
            step_graph, out = _capture(self.step_fn, [x, t, *prepared], pool=prep_graph.pool())
            self.bound[key] = (static, prep_graph, x, t, step_graph, out)
        static, prep_graph, x_static, t_static, step_graph, out = self.bound[key]
        for n in BIND_INPUTS:
            static[n].copy_(fixed[n], non_blocking=True)
        prep_graph.replay()

        @torch.inference_mode()
        def denoise(x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            x_static.copy_(x_t, non_blocking=True)
            t_static.copy_(timesteps, non_blocking=True)
            step_graph.replay()
            return out.clone()

        return denoise

    @torch.inference_mode()
    def run(self, feeds, stream=None):
        key = tuple((n, tuple(feeds[n].shape)) for n in self.names)
        if key not in self.graphs:
            self.graphs[key] = self._capture(feeds)
        graph, static, out = self.graphs[key]
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            for n in self.names:
                static[n].copy_(feeds[n], non_blocking=True)
            graph.replay()
            return {self.out_name: out.clone()}


# AOTInductor packages are compiled for batch >= 2 and a lone call is padded to 2 rows: with torch 2.13 a
# package exported with a dynamic batch gave wrong UNet outputs at batch 1 (relative error 1.5, exact at 2 and 4).
AOTI_MIN_BATCH = 2


class AotiEngine:
    """An AOTInductor package: compiled ahead of time by `trt-nuwaxl build --backend torch`."""

    def __init__(self, package_path, spec: IOSpec):
        from pathlib import Path

        if not Path(package_path).is_file():
            raise UserError(f"AOTInductor package missing: {package_path}; rebuild with trt-nuwaxl build")
        self.spec = spec
        self.names = [t.name for t in spec.inputs]
        self.out_name = spec.outputs[0].name
        self.fn = torch._inductor.aoti_load_package(str(package_path))

    @torch.inference_mode()
    def run(self, feeds, stream=None):
        batch = next(iter(feeds.values())).shape[0]
        self.spec.check_batch(batch)
        pad = AOTI_MIN_BATCH - batch if batch < AOTI_MIN_BATCH <= self.spec.batch_max else 0
        args = [feeds[n] if not pad else torch.cat([feeds[n]] + [feeds[n][:1]] * pad) for n in self.names]
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            out = self.fn(*args)
        out = out[0] if isinstance(out, (list, tuple)) else out
        return {self.out_name: out[:batch]}


def channels_last_convs(module: nn.Module) -> nn.Module:
    """2-D convolution weights in channels-last (NHWC) layout, cuDNN's preferred one for fp16; same results."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    return module


def torch_networks(models, device: str | None = None, precision: str | None = None, resolution: int | None = None,
                   torch_mode: TorchMode = "eager") -> EngineNetworks:
    """Live-module engines over a NuwaModels bundle (from a checkpoint or a preset)."""
    from nuwaxl.iospec import io_specs
    from nuwaxl.models.networks import networks

    dev = resolve_device(device)
    mode = torch_mode
    if mode not in TORCH_MODES:
        raise UserError(f"unknown torch mode {mode!r}; use one of {', '.join(TORCH_MODES)}")
    if mode.endswith("cudagraph") and dev.type != "cuda":
        raise UserError(f"torch mode {mode!r} needs a CUDA device; use {option('device', 'cuda')} or "
                        f"{option('torch_mode', 'eager')}")
    dtype = resolve_dtype(precision, dev)
    config = models.config if resolution is None else models.config.with_resolution(resolution)
    models = models.to(device=dev, dtype=dtype).eval()
    if dev.type == "cuda":  # NHWC conv weights: a lone paper-UNet call 14.7 -> 9.7 ms under CUDA graphs, batch 69
        channels_last_convs(models)  # unchanged (benchmarks/results/EXPERIMENTS.md)
    specs = io_specs(config, precision_name(dtype), max_rows=1)  # names and dtypes only: live modules take any batch
    engines = {}
    for name, module in networks(models).items():
        engines[name] = (CudaGraphEngine(module, specs[name], compile=mode == "compile-cudagraph")
                         if mode.endswith("cudagraph") else TorchEngine(module, specs[name], mode))
    return EngineNetworks(engines, models.tokenizer, NetworkSpec(config, dev, dtype, None, f"torch-{mode}",
                                                                  models.sampling, models.trained_on))


def from_checkpoint(path, **kw) -> EngineNetworks:
    from nuwaxl.models.checkpoint import load_checkpoint

    return torch_networks(load_checkpoint(path), **kw)


def from_preset(name: str | ModelConfig, seed: int = 0, **kw) -> EngineNetworks:
    from nuwaxl.models.checkpoint import NuwaModels

    cfg = preset(name) if isinstance(name, str) else name
    return torch_networks(NuwaModels.random(cfg, seed=seed), **kw)
