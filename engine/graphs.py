"""CUDA graphs for any engine, one mechanism for every backend: one graph per input shapes, replayed.

A lone 16-frame call spends most of its time launching kernels (paper UNet on an H200: 23.2 ms eager vs 11.7 ms
graphed, README "Speed"); a graph launches a whole network at once. `GraphedEngine` keeps static input and
output buffers per shape key, copies inputs in, replays, and hands out copies of the outputs. How one run is
captured is the backend's business (`Engine.capture`): by default the engine's `run` is recorded on a stream with
`torch.cuda.graph` (live PyTorch modules, AOTInductor packages, TensorRT's `execute_async_v3`, as TensorRT's
diffusion demo does); ONNX Runtime captures with its own CUDA-graph option instead.

`bind(fixed)` serves the UNet step: the prepared tensors are copied into the graph's inputs once per batch of
calls, not at every denoising step; only x_t and t are copied per step.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from nuwaxl.iospec import IOSpec

Replay = Callable[[], None]

# Captures record only the capturing thread's calls: with CUDA's default ("global") mode, another thread's event query
# or synchronisation during a capture invalidates it. A server runs jobs in several threads (runtime.batching): on an
# H200, 4 concurrent 1024-frame jobs failed with "operation failed due to a previous error during capture" before.
CAPTURE_ERROR_MODE = "thread_local"


def capture_run(run: Callable[[dict], dict], static: dict[str, torch.Tensor],
                warmup: int = 2) -> tuple[Replay, dict[str, torch.Tensor]]:
    """Record `run(static)` into a CUDA graph: warm-ups and the capture on one side stream (engines that keep
    per-stream state, such as TensorRT execution contexts, are then warm on the stream they are captured on)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):  # compilation, autotuning, lazy allocations happen here, not in the graph
            run(static)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side, capture_error_mode=CAPTURE_ERROR_MODE):
        out = run(static)
    torch.cuda.current_stream().wait_stream(side)
    return graph.replay, out


@dataclass
class _Graph:
    static: dict[str, torch.Tensor]
    replay: Replay
    outputs: dict[str, torch.Tensor]
    owner: object = None  # the bound run whose fixed inputs are in `static` now


class GraphedEngine:
    """Wraps an engine; same `run` interface, plus `bind`. Valid on one CUDA device."""

    def __init__(self, inner, spec: IOSpec):
        self.inner = inner
        self.spec = inner.spec
        self.names = [t.name for t in spec.inputs]
        self.graphs: dict[tuple, _Graph] = {}

    def _graph(self, feeds: dict[str, torch.Tensor]) -> _Graph:
        key = tuple((n, tuple(feeds[n].shape), feeds[n].dtype) for n in self.names)
        g = self.graphs.get(key)
        if g is None:
            static = {n: feeds[n].clone(memory_format=torch.contiguous_format) for n in self.names}
            capture = getattr(self.inner, "capture", None)
            replay, outputs = capture(static) if capture is not None else capture_run(self.inner.run, static)
            g = self.graphs[key] = _Graph(static, replay, outputs)
        return g

    def _replay(self, g: _Graph, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for n, x in feeds.items():
            g.static[n].copy_(x, non_blocking=True)
        g.replay()
        return {n: y.clone() for n, y in g.outputs.items()}

    @torch.inference_mode()
    def run(self, feeds, stream=None):
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            g = self._graph(feeds)
            g.owner = None  # every input copied: no bound denoiser's fixed inputs survive
            return self._replay(g, feeds)

    @torch.inference_mode()
    def bind(self, fixed: dict[str, torch.Tensor]) -> Callable[[dict], dict]:
        """run(varying) with `fixed` copied into the graph's inputs once; again only if another run or bind used
        the same graph in between."""
        token = object()

        @torch.inference_mode()
        def run(varying: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            g = self._graph({**fixed, **varying})
            feeds = varying if g.owner is token else {**fixed, **varying}
            g.owner = token
            return self._replay(g, feeds)

        return run

    def release(self) -> None:
        """Drop every graph and its memory (after an out-of-memory error, before retrying smaller batches)."""
        self.graphs.clear()

