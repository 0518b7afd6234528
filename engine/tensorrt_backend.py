"""TensorRT engines through `tensorrt` (10 or later) or `tensorrt_rtx`, whichever is installed.
The only module that imports either.

Builds are strongly typed: FP16 engines come from FP16 ONNX (TensorRT 11 and TensorRT-RTX have no FP16 builder
flag). A cache key hashes everything that changes the plan (ONNX, profile, precision, library and version, target
GPU, optimization level); a plan whose key differs is rebuilt, never silently reused, and a plan loaded under
another library version or GPU fails with a message that says to rebuild.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from pathlib import Path

import torch

from nuwaxl.dtypes import TORCH_DTYPES
from nuwaxl.engine.graphs import CAPTURE_ERROR_MODE
from nuwaxl.errors import UserError
from nuwaxl.files import write_bytes, write_text
from nuwaxl.iospec import IOSpec

# How this backend's engines run as CUDA graphs (engine.graphs.GraphedEngine); said by the manifest and `doctor`.
CUDA_GRAPHS = "execute_async_v3 captured on its own stream and execution context, one graph per batch shape"

# The most elements one tensor may hold (registry protocol): the plans are built from the ONNX stage, whose parity
# gate runs ONNX Runtime, so its limit holds here too.
TENSOR_ELEMENTS_MAX = 2**31 - 1


def _import():
    for name in ("tensorrt", "tensorrt_rtx"):
        try:
            return importlib.import_module(name), name
        except ImportError:
            continue
    return None, None


trt, LIB = _import()
# Compute capabilities TensorRT-RTX builds for (its ComputeCapability enum); Hopper (9.0) is not among them.
RTX_TARGETS = {"sm75": (7, 5), "sm80": (8, 0), "sm86": (8, 6), "sm89": (8, 9), "sm120": (12, 0), "sm121": (12, 1)}
DEFAULT_RTX_TARGET = "sm89"

def _gpu() -> tuple[str, tuple[int, int]] | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(), torch.cuda.get_device_capability()


def status() -> dict:
    """Can this machine build TensorRT plans, and run them? With the reason when not."""
    if trt is None:
        why = "neither tensorrt nor tensorrt_rtx is installed (pip install tensorrt-rtx)"
        return {"library": None, "can_build": False, "can_run": False, "why_not_build": why, "why_not_run": why}
    name, version = LIB, trt.__version__
    gpu = _gpu()
    out = {"library": name, "version": version, "can_build": True, "why_not_build": None}
    if name == "tensorrt" and gpu is None:
        out.update(can_build=False, why_not_build=f"{name} {version} needs a CUDA GPU to build engines")
    if gpu is None:
        out.update(can_run=False, why_not_run=f"no CUDA GPU is visible; {name} {version} needs one to run engines")
    elif name == "tensorrt_rtx" and gpu[1] not in RTX_TARGETS.values():
        supported = ", ".join(f"{a}.{b}" for a, b in RTX_TARGETS.values())
        out.update(can_run=False, why_not_run=f"TensorRT-RTX {version} does not support compute capability "
                                              f"{gpu[1][0]}.{gpu[1][1]} ({gpu[0]}); it runs on {supported}")
    else:
        out.update(can_run=True, why_not_run=None)
    return out


def build_targets(requested: list[str] | None) -> list[str]:
    """GPU architectures the plan is for: the local GPU for tensorrt; requested or local/default for RTX."""
    gpu = _gpu()
    if LIB == "tensorrt":
        if gpu is None:
            raise UserError(f"tensorrt {trt.__version__} needs a CUDA GPU to build; install tensorrt-rtx to build "
                            "plans on a machine without one")
        return [f"sm{gpu[1][0]}{gpu[1][1]}"]
    if requested:
        bad = [t for t in requested if t not in RTX_TARGETS]
        if bad:
            raise UserError(f"unknown compute capability {bad}; TensorRT-RTX builds for {', '.join(RTX_TARGETS)}")
        return list(requested)
    if gpu is not None and gpu[1] in RTX_TARGETS.values():
        return [f"sm{gpu[1][0]}{gpu[1][1]}"]
    return [DEFAULT_RTX_TARGET]


def cache_key(onnx_sha256: str, spec: IOSpec, precision: str, targets: list[str], opt_level: int) -> str:
    blob = json.dumps({"onnx": onnx_sha256, "profile": spec.profile(), "precision": precision, "library": LIB,
                       "version": trt.__version__, "targets": targets, "opt_level": opt_level}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class _Logger(trt.ILogger if trt is not None else object):
    def __init__(self):
        super().__init__()
        self.errors: list[str] = []

    def log(self, severity, msg):
        if severity <= trt.ILogger.Severity.ERROR:
            self.errors.append(msg)


def _polygraphy():
    """polygraphy's TensorRT loaders, for whichever TensorRT library is installed (polygraphy picks tensorrt or
    tensorrt_rtx by its USE_TENSORRT_RTX setting, read when its TensorRT modules are first imported)."""
    import polygraphy.config
    from polygraphy.logger import G_LOGGER

    polygraphy.config.USE_TENSORRT_RTX = LIB == "tensorrt_rtx"
    G_LOGGER.module_severity = G_LOGGER.ERROR  # our own log lines say what was built; polygraphy's are verbose
    from polygraphy.backend import trt as pg

    return pg


def _describe(network, profile) -> dict:
    """The plan's I/O and profile as TensorRT itself reports them (checked against the spec by tests)."""
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    return {"inputs": [{"name": t.name, "dtype": t.dtype.name, "shape": list(t.shape)} for t in inputs],
            "outputs": [{"name": t.name, "dtype": t.dtype.name, "shape": list(t.shape)} for t in outputs],
            "profile": {t.name: [list(s) for s in profile[t.name]] for t in inputs}}


def build_plan(onnx_path: Path, onnx_sha256: str, spec: IOSpec, precision: str, plan_path: Path,
               opt_level: int = 3, targets: list[str] | None = None, timing_cache: Path | None = None,
               force: bool = False) -> dict:
    """Build (or reuse, when the cache key matches) a plan with polygraphy's loaders: a strongly typed network
    parsed from the ONNX, one optimization profile from the I/O spec, and (TensorRT) a timing cache shared by the
    directory's networks. Returns its engine.json record."""
    if trt is None:
        raise UserError(status()["why_not_build"])
    targets = build_targets(targets)
    key = cache_key(onnx_sha256, spec, precision, targets, opt_level)
    record_path = plan_path.with_suffix(".json")
    if not force and plan_path.is_file() and record_path.is_file():
        old = json.loads(record_path.read_text())
        if old.get("cache_key") == key:
            return {**old, "reused": True}
    pg = _polygraphy()
    builder, network, parser = pg.network_from_onnx_path(str(onnx_path), strongly_typed=True)
    profile = pg.Profile()
    for name, (lo, opt, hi) in spec.profile().items():
        profile.add(name, min=lo, opt=opt, max=hi)
    common = {"profiles": [profile], "builder_optimization_level": opt_level}
    if LIB == "tensorrt_rtx":  # RTX builds for named compute capabilities; it has no timing cache
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

        config = CreateConfigRTX(compute_capabilities=[RTX_TARGETS[t] for t in targets], **common)
        cache = None
    else:
        cache = str(timing_cache) if timing_cache is not None else None
        config = pg.CreateConfig(load_timing_cache=cache if cache and Path(cache).is_file() else None, **common)
    t0 = time.perf_counter()
    try:
        plan = pg.engine_bytes_from_network((builder, network, parser), config=config, save_timing_cache=cache)
    except Exception as e:  # polygraphy reports a failed build as PolygraphyException
        raise RuntimeError(f"TensorRT failed to build {onnx_path.name}: {str(e).strip()[-500:]}") from e
    write_bytes(plan_path, memoryview(plan))
    record = {"network": spec.network, "library": LIB, "version": trt.__version__, "precision": precision,
              "targets": targets, "opt_level": opt_level, "onnx_sha256": onnx_sha256, "cache_key": key,
              "plan_bytes": plan_path.stat().st_size, "build_s": round(time.perf_counter() - t0, 2),
              "built_with": "polygraphy " + _polygraphy_version(), **_describe(network, profile)}
    write_text(record_path, json.dumps(record, indent=2, sort_keys=True))
    return {**record, "reused": False}


def _polygraphy_version() -> str:
    import polygraphy

    return polygraphy.__version__


def load(directory: Path, name: str, spec: IOSpec, device: torch.device) -> TrtEngine:
    """The engine directory's network `name` (registry protocol)."""
    return TrtEngine(directory / "tensorrt" / f"{name}.plan", spec, device)


def files(directory: Path, name: str) -> list[str]:
    from nuwaxl.engine import onnxruntime_backend

    return onnxruntime_backend.files(directory, name) + [f"tensorrt/{name}.plan"]


class TrtEngine:
    """A deserialized plan; one execution context, with its own device memory, per CUDA stream."""

    def __init__(self, plan_path: Path, spec: IOSpec, device: torch.device):
        record_path = plan_path.with_suffix(".json")
        if not plan_path.is_file() or not record_path.is_file():
            raise UserError(f"TensorRT plan {plan_path} or its record is missing; rebuild with trt-nuwaxl build")
        record = json.loads(record_path.read_text())
        if trt is None:
            raise UserError(f"{plan_path} needs {record['library']} {record['version']}, which is not installed")
        if (record["library"], record["version"]) != (LIB, trt.__version__):
            raise UserError(f"{plan_path} was built with {record['library']} {record['version']} but "
                            f"{LIB} {trt.__version__} is installed; rebuild with trt-nuwaxl build --force")
        st = status()
        if not st["can_run"]:
            raise UserError(f"cannot run TensorRT engines here: {st['why_not_run']}")
        gpu = _gpu()
        here = f"sm{gpu[1][0]}{gpu[1][1]}"
        if here not in record["targets"]:
            raise UserError(f"{plan_path} was built for {record['targets']} but this GPU ({gpu[0]}) is {here}; "
                            "rebuild with trt-nuwaxl build --force on this machine")
        self.spec, self.device = spec, device
        self.logger = _Logger()
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise UserError(f"could not load {plan_path} ({self.logger.errors[-1:]}); rebuild with "
                            "trt-nuwaxl build --force")
        self.contexts: dict[int, object] = {}

    def _context(self, stream: torch.cuda.Stream):
        ctx = self.contexts.get(stream.cuda_stream)
        if ctx is None:  # one context per stream: a context shared by two streams races on its scratch memory
            ctx = self.contexts[stream.cuda_stream] = self.engine.create_execution_context()
        return ctx

    def _set(self, ctx, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Shapes and addresses of inputs and (new) outputs on a context."""
        batch = next(iter(feeds.values())).shape[0]
        self.spec.check_batch(batch)
        for t in self.spec.inputs:
            x = feeds[t.name]
            ctx.set_input_shape(t.name, tuple(x.shape))
            ctx.set_tensor_address(t.name, x.data_ptr())
        outputs = {}
        for t in self.spec.outputs:
            y = torch.empty(t.concrete(batch), dtype=TORCH_DTYPES[t.dtype], device=self.device)
            ctx.set_tensor_address(t.name, y.data_ptr())
            outputs[t.name] = y
        return outputs

    def _enqueue(self, ctx, stream: torch.cuda.Stream) -> None:
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.spec.network} failed: {self.logger.errors[-3:]}")

    def run(self, feeds: dict[str, torch.Tensor], stream: torch.cuda.Stream | None = None) -> dict:
        stream = stream or torch.cuda.current_stream(self.device)
        ctx = self._context(stream)
        outputs = self._set(ctx, {k: v.contiguous() for k, v in feeds.items()})
        self._enqueue(ctx, stream)
        return outputs

    def capture(self, static: dict[str, torch.Tensor]):
        """A CUDA graph of `execute_async_v3` for these static inputs, as TensorRT documents it: a context of its
        own with fixed shapes and addresses, enqueued once before the capture, then captured on its stream."""
        ctx = self.engine.create_execution_context()
        outputs = self._set(ctx, static)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._enqueue(ctx, stream)  # lazy initialisation happens outside the graph
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream, capture_error_mode=CAPTURE_ERROR_MODE):
                self._enqueue(ctx, stream)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.contexts[("graph", id(graph))] = ctx  # kept alive with the graph
        return graph.replay, outputs


def check_build(device: torch.device, precision: str) -> None:
    """Can this machine build plans? (registry protocol; the ONNX stage's requirements first)"""
    from nuwaxl.engine import onnxruntime_backend

    onnxruntime_backend.check_build(device, precision)
    st = status()
    if not st["can_build"]:
        raise UserError(f"cannot build TensorRT plans here: {st['why_not_build']}")


def build_network(job, name: str, module, reference, spec: IOSpec) -> dict:
    """The ONNX stage, then a plan from that ONNX (registry protocol)."""
    from nuwaxl.engine import onnxruntime_backend

    record = onnxruntime_backend.onnx_stage(job, name, module, reference, spec, fused_attention=False)
    rec = build_plan(job.out / "onnx" / f"{name}.onnx", record["onnx_sha256"], spec, job.precision,
                     job.out / "tensorrt" / f"{name}.plan", job.opt_level,
                     list(job.targets) if job.targets else None, job.out / "tensorrt" / "timing.cache", job.force)
    job.log(f"{name}: TensorRT plan for {rec['targets']} " + ("reused (cache key matches)" if rec["reused"]
                                                            else f"built in {rec['build_s']} s"))
    return {**record, "plan": f"tensorrt/{name}.plan"}


def doctor(gpu: bool) -> dict[str, dict]:
    """This backend's rows in `trt-nuwaxl doctor` (registry protocol)."""
    st = status()
    return {"tensorrt-build": {"usable": st["can_build"], "why": st["why_not_build"],
                               "cuda_graphs": "n/a: builds plans"},
            "tensorrt-run": {"usable": st["can_run"], "why": st["why_not_run"], "cuda_graphs": CUDA_GRAPHS}}
