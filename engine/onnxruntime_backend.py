"""ONNX Runtime engines: the CUDA provider with I/O binding on a GPU (onnxruntime-gpu), the CPU provider otherwise.
The only module that imports onnxruntime."""

from __future__ import annotations

import contextlib
import gc
import io
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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


# How this backend's engines run as CUDA graphs (engine.graphs.GraphedEngine); said by the manifest and `doctor`.
CUDA_GRAPHS = ("ONNX Runtime's enable_cuda_graph, one gpu_graph_id per batch shape with fixed I/O bindings; off for "
               "a session with a node on the CPU (the reason is kept in the engine's cuda_graphs)")

# The most elements one tensor may hold (registry protocol): the CUDA provider's cuDNN convolutions index with
# 32-bit integers (paper vae_encoder at 69 rows: CUDNN_STATUS_NOT_SUPPORTED on an H200); `io_specs` bounds the
# networks' rows by it and the runtime splits larger batches.
TENSOR_ELEMENTS_MAX = 2**31 - 1


def status() -> dict:
    if ort is None:
        return {"usable": False, "why": "onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu)"}
    providers = ort.get_available_providers()
    cuda = "CUDAExecutionProvider" in providers
    return {"usable": True, "version": ort.__version__, "providers": providers, "cuda": cuda,
            "why_no_cuda": None if cuda else "this onnxruntime build has no CUDA provider: install onnxruntime-gpu"}


def load(directory: Path, name: str, spec: IOSpec, device: torch.device) -> OrtEngine:
    """The engine directory's network `name` (registry protocol)."""
    return OrtEngine(directory / "onnx" / f"{name}.onnx", spec, device)


def files(directory: Path, name: str) -> list[str]:
    """The files of one network that generation opens (their sizes go into the manifest)."""
    data = f"onnx/{name}.onnx.data"
    return [f"onnx/{name}.onnx"] + ([data] if (directory / data).exists() else [])


def _run_options(graph_id: int) -> ort.RunOptions:
    opts = ort.RunOptions()
    # The host does not wait for the GPU after each run: ordering is by CUDA stream (see OrtEngine).
    opts.add_run_config_entry("disable_synchronize_execution_providers", "1")
    if graph_id:  # -1: a plain run in a session that captures CUDA graphs; k > 0: replay (or capture) graph k
        opts.add_run_config_entry("gpu_graph_id", str(graph_id))
    return opts


class OrtEngine:
    """An ONNX Runtime session. On a GPU: the CUDA provider on the engine's own CUDA stream (ordered after the
    caller's stream and before it again, no host sync), I/O bound to torch tensors, and CUDA graphs through ONNX
    Runtime's own option (`enable_cuda_graph`, one graph per shape by `gpu_graph_id`, fixed I/O addresses).
    `cuda_graphs` says "on" or why not (ONNX Runtime captures only sessions whose every node runs on the GPU).

    ONNX Runtime's CUDA provider keeps its captured graphs (and its warm-up run counts) per calling thread, so on a
    GPU one thread of the engine's own runs the session, whichever thread calls: a server's merged steps, led by a
    different job's thread each time, replay the graphs captured once instead of capturing again in every thread
    (paper engines on an H200, 16 concurrent 16-frame requests through the server: 42.0 s before, against 7.9 s one at
    a time; 3.53 s after, against 7.14 s: benchmarks/results/serve-load-paper-16f-ort-h200-{a2ab2ef,d590817}.json).
    Single-threaded runs before / after (1024 frames; after: one run, another machine): AR 25.86 / 26.51 s, DoD
    12.93 / 12.73 s."""

    def __init__(self, onnx_path: str | Path, spec: IOSpec, device: torch.device, cuda_graphs: bool = True,
                 cuda_options: dict[str, str] | None = None):
        """`cuda_options`: more CUDA provider options (for example {"prefer_nhwc": "1"})."""
        if ort is None:
            raise UserError("onnxruntime is not installed; pip install onnxruntime (CPU) or onnxruntime-gpu")
        if not Path(onnx_path).is_file():
            raise UserError(f"ONNX file missing: {onnx_path}; rebuild the engines with trt-nuwaxl build")
        self.spec, self.device = spec, device
        self.graph_ids: dict[tuple, int] = {}
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.stream = None
        self.cuda_graphs = "off: CPU device"
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UserError("the installed onnxruntime has no CUDA provider; install onnxruntime-gpu "
                                "(in place of onnxruntime) or run on --device cpu")
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()  # use the CUDA / cuDNN libraries that torch ships (ORT >= 1.21)
            self.stream = torch.cuda.Stream(device)
            self.runner = ThreadPoolExecutor(1, thread_name_prefix="nuwaxl-onnxruntime")
            cuda = {"device_id": device.index or 0, "user_compute_stream": str(self.stream.cuda_stream),
                    **(cuda_options or {})}
            attempts = ([{**cuda, "enable_cuda_graph": "1"}] if cuda_graphs else []) + [cuda]
        else:
            attempts = [None]
        why = None
        for provider in attempts:
            providers = [("CUDAExecutionProvider", provider), "CPUExecutionProvider"] if provider else \
                ["CPUExecutionProvider"]
            try:
                self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
            except Exception as e:  # onnxruntime raises its own exception types
                why = str(e).strip().splitlines()[-1][:300]
                continue
            if provider:
                self.cuda_graphs = "on" if provider.get("enable_cuda_graph") else \
                    f"off: {why}" if why else "off: not asked for"
            break
        else:
            raise UserError(f"ONNX Runtime cannot load {onnx_path} ({why}); rebuild the engines")
        self.plain = _run_options(-1 if self.cuda_graphs == "on" else 0)
        if self.cuda_graphs == "on":
            self.capture = self._capture  # found by GraphedEngine

    def _bind(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]):
        binding = self.session.io_binding()
        index = self.device.index or 0
        for t in self.spec.inputs:
            x = feeds[t.name]
            binding.bind_input(t.name, "cuda", index, NP_DTYPES[t.dtype], tuple(x.shape), x.data_ptr())
        for t in self.spec.outputs:
            y = outputs[t.name]
            binding.bind_output(t.name, "cuda", index, NP_DTYPES[t.dtype], tuple(y.shape), y.data_ptr())
        return binding

    def _empty_outputs(self, batch: int) -> dict[str, torch.Tensor]:
        return {t.name: torch.empty(t.concrete(batch), dtype=TORCH_DTYPES[t.dtype], device=self.device)
                for t in self.spec.outputs}

    def _on_stream(self, binding, options, inputs: list[torch.Tensor]) -> None:
        """Run on the engine's stream, after the caller's work and before the caller's next."""
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        self.runner.submit(self.session.run_with_iobinding, binding, options).result()
        for x in inputs:  # read on the engine's stream: not reused by the allocator before it is done
            x.record_stream(self.stream)
        caller.wait_stream(self.stream)

    def run(self, feeds: dict[str, torch.Tensor], stream=None) -> dict[str, torch.Tensor]:
        batch = next(iter(feeds.values())).shape[0]
        self.spec.check_batch(batch)
        if self.device.type != "cuda":
            outs = self.session.run(None, {k: v.detach().cpu().numpy() for k, v in feeds.items()})
            return {t.name: torch.from_numpy(o) for t, o in zip(self.spec.outputs, outs, strict=True)}
        feeds = {t.name: feeds[t.name].contiguous() for t in self.spec.inputs}
        outputs = self._empty_outputs(batch)
        self._on_stream(self._bind(feeds, outputs), self.plain, list(feeds.values()))
        return outputs

    def _capture(self, static: dict[str, torch.Tensor]):
        """ONNX Runtime's CUDA graph for these static inputs' shape: its first runs warm up, the next captures."""
        batch = next(iter(static.values())).shape[0]
        self.spec.check_batch(batch)
        key = tuple(tuple(x.shape) for x in static.values())
        graph_id = self.graph_ids.setdefault(key, len(self.graph_ids) + 1)
        outputs = self._empty_outputs(batch)
        binding, options = self._bind(static, outputs), _run_options(graph_id)

        def replay() -> None:
            self._on_stream(binding, options, [])

        for _ in range(3):  # ONNX Runtime runs normally before it captures, then replays
            replay()
        return replay, outputs


def check_build(device: torch.device, precision: str) -> None:
    """Can this machine build this backend's engines? (registry protocol; before any work is done)"""
    st = status()
    if not st["usable"]:
        raise UserError(f"{st['why']}: the onnxruntime and tensorrt builds check their ONNX export with ONNX "
                        "Runtime")


# Networks whose attention this backend's graphs run as ONNX Runtime's fused `com.microsoft.MultiHeadAttention`
# (export.onnx_export.ort_attention): paper unet_step on an H200, 302.8 -> 286.2 ms per step at 69 rows and 15.4 ->
# 14.9 ms at one (benchmarks/results/ort-step-variants-h200-8f863e7.json). The other networks were not measured with
# it, and TensorRT builds keep the standard graph (its parser does not know the op).
FUSED_ATTENTION = ("unet_step",)


# Networks whose graph ONNX Runtime's own transformer optimizer rewrites in builds for CUDA, with its fusions for
# diffusion models of the named model type ("unet": GroupNorm + SiLU and residual adds as channels-last GroupNorm /
# SkipGroupNorm, NHWC convolutions, bias adds, transposes merged): exported from the fp32 reference, optimized, then
# converted to fp16 by its float16 tool (GroupNorm's gamma and beta stay fp32, as its kernels want). The fused ops have
# CUDA kernels only, so builds on the CPU keep the exported graph. Measured on an H200 (paper preset, random weights,
# 1024 frames, 50 steps; benchmarks/results/engines-ort-paper-1024f-h200-*.json): unet_step 302 -> 236 ms per step at
# 69 rows and 15.4 -> 10.5 ms at one; DoD 19.65 -> 15.58 s, then 15.16 s with the VAE networks fused too.
GRAPH_FUSIONS = {"unet_step": "unet", "vae_encoder": "vae", "vae_decoder": "vae"}
# Those graphs keep their convolutions channels-last, so their temporal convolutions are exported as (k, 1) 2-D
# convolutions over the channels-last hidden state (`models.layers.TemporalConv`, "frames-as-height"): ONNX Runtime
# then runs them as NhwcConv with no transposes around them, instead of a Conv3d between four transposes.
FUSED_TEMPORAL_CONV = "frames-as-height"


def build_network(job, name: str, module, reference, spec: IOSpec) -> dict:
    """The ONNX stage (registry protocol): export with a dynamic batch, then the parity gate on ONNX Runtime
    (CUDA where the build runs on a GPU and onnxruntime-gpu is installed). Reused when its cache key matches."""
    return onnx_stage(job, name, module, reference, spec, fused_attention=name in FUSED_ATTENTION,
                      fusions=GRAPH_FUSIONS.get(name))


def fuse_graph(src: Path, dst: Path, model_type: str, fp16: bool) -> dict:
    """ONNX Runtime's transformer optimizer (its Python fusions only, no session) on the fp32 graph `src`, then
    (fp16) its float16 conversion, inputs and outputs included; written to `dst` (weights beside it when large).
    Returns facts for the manifest."""
    import logging

    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from nuwaxl.export.onnx_export import EXTERNAL_DATA_BYTES

    t0 = time.perf_counter()
    # Its symbolic shape inference does not know every op of our graphs and says so (a warning, and "failed in shape
    # inference" printed on stdout); the float16 conversion then takes types from the graph, and the parity gate that
    # follows checks the result.
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    model = optimize_model(str(src), model_type=model_type, opt_level=0,
                           optimization_options=FusionOptions(model_type), use_gpu=True)
    fused = {op: n for op, n in model.get_fused_operator_statistics().items() if n}
    if fp16:
        with contextlib.redirect_stdout(io.StringIO()):
            model.convert_float_to_float16(keep_io_types=False)
        _drop_repeated_casts(model.model.graph)
    weights = sum(len(t.raw_data) for t in model.model.graph.initializer)
    dst.parent.mkdir(parents=True, exist_ok=True)
    model.save_model_to_file(str(dst), use_external_data_format=weights > EXTERNAL_DATA_BYTES,
                             all_tensors_to_one_file=True)
    return {"graph_optimizer": f"onnxruntime.transformers optimize_model(model_type={model_type!r}, opt_level=0)",
            "fused_ops": fused, "float16_conversion": "onnxruntime.transformers float16" if fp16 else None,
            "external_data": weights > EXTERNAL_DATA_BYTES, "optimize_s": round(time.perf_counter() - t0, 2)}


def export_fused(reference, spec: IOSpec, dst: Path, sample: dict, translations: dict | None, model_type: str,
                 fp16: bool) -> dict:
    """Export the fp32 `reference` (temporal convolutions as `FUSED_TEMPORAL_CONV`) to a temporary folder beside `dst`,
    then `fuse_graph` it into `dst`."""
    from nuwaxl.export.onnx_export import export_onnx
    from nuwaxl.models.layers import temporal_conv_layout

    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.stem}-fp32-") as tmp:
        fp32 = Path(tmp) / dst.name
        with temporal_conv_layout(reference, FUSED_TEMPORAL_CONV):
            facts = export_onnx(reference, spec, fp32, sample, translations)
        return facts | {"temporal_conv": FUSED_TEMPORAL_CONV} | fuse_graph(fp32, dst, model_type, fp16)


def _drop_repeated_casts(graph) -> None:
    """ONNX Runtime 1.31's float16 tool gives a value read by two fp32-only inputs (one `scales` constant of several
    Resize nodes) one Cast per reader, each with the same node and output name: a graph ONNX Runtime refuses ("two
    nodes with same node name", then "Duplicate definition of name"). Keep the first of such identical Casts."""
    made: dict[str, object] = {}
    keep = []
    for node in graph.node:
        first = made.get(node.output[0]) if node.op_type == "Cast" else None
        if first is not None and first.input == node.input and first.attribute == node.attribute:
            continue  # (not `remove`: that drops the first equal node, which earlier readers need)
        made.update((out, node) for out in node.output if out)
        keep.append(node)
    if len(keep) < len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def onnx_stage(job, name: str, module, reference, spec: IOSpec, fused_attention: bool,
               fusions: str | None = None) -> dict:
    """Export (`fused_attention`: attention as ONNX Runtime's contrib op, for graphs only it runs; `fusions`: the
    model type of ONNX Runtime's graph optimizer, applied where the build runs on CUDA), parity gate, manifest;
    reused when its cache key matches."""
    from nuwaxl.engine.stage import cached, check_parity, parity_text, stage_key
    from nuwaxl.export.onnx_export import (
        OPSET,
        export_onnx,
        library_versions,
        onnx_sha256,
        ort_attention,
        write_manifest,
    )

    onnx_path, man_path = job.out / "onnx" / f"{name}.onnx", job.out / "onnx" / f"{name}.json"
    attention = "com.microsoft.MultiHeadAttention" if fused_attention else "onnx"
    dev = job.device if (job.device.type == "cuda" and status().get("cuda")) else torch.device("cpu")
    fusions = fusions if dev.type == "cuda" else None
    key = stage_key(checkpoint=job.weights_id, spec=spec.to_dict(), precision=job.precision, opset=OPSET,
                    attention=attention, torch=torch.__version__, parity=job.parity[name],
                    **({"fusions": [fusions, status()["version"], FUSED_TEMPORAL_CONV]} if fusions else {}))
    old = cached(man_path, key, job.force)
    if old and onnx_path.is_file() and onnx_sha256(onnx_path) == old["onnx_sha256"]:
        job.log(f"{name}: ONNX reused (same checkpoint, spec and precision)")
        return {"onnx": f"onnx/{name}.onnx", "onnx_sha256": old["onnx_sha256"]}
    translations = ort_attention() if fused_attention else None
    if fusions is None:
        sample = job.sample(spec, min(2, spec.batch_max), next(module.parameters()).dtype)
        facts = export_onnx(module, spec, onnx_path, sample, translations)
    else:  # ONNX Runtime's optimizer fuses fp32 graphs, then converts them (see GRAPH_FUSIONS)
        facts = export_fused(reference.to(job.device), spec, onnx_path,
                             job.sample(spec, min(2, spec.batch_max), torch.float32), translations, fusions,
                             fp16=job.precision == "fp16")
        job.log(f"{name}: ONNX Runtime's {fusions} fusions: {facts['fused_ops']}")
    if dev.type == "cuda":  # ONNX Runtime's arena and torch's cache share the GPU: give it torch's spare blocks
        gc.collect()  # (and the arenas of sessions no longer referenced)
        torch.cuda.empty_cache()
    engine = OrtEngine(onnx_path, spec, dev)
    result = job.measure_parity(name, engine.run, reference.to(dev), spec, dev, f"onnxruntime-{dev.type}")
    reference.to(job.device)
    sha = onnx_sha256(onnx_path)
    write_manifest(man_path, {"network": name, "stage_key": key, "onnx_sha256": sha, "attention": attention,
                              "source_checkpoint_sha256": job.weights_id, "precision": job.precision,
                              "io_spec": spec.to_dict(), **facts, "versions": library_versions(),
                              "parity": {**result, "runtime": f"onnxruntime {status().get('version')} on {dev.type}"}})
    check_parity(name, result, man_path)
    job.log(f"{name}: ONNX exported in {facts['export_s']} s, {parity_text(result)}")
    return {"onnx": f"onnx/{name}.onnx", "onnx_sha256": sha}


def doctor(gpu: bool) -> dict[str, dict]:
    """This backend's rows in `trt-nuwaxl doctor` (registry protocol)."""
    st = status()
    why_cuda = (st.get("why") or st.get("why_no_cuda")) if not st.get("cuda") else \
        (None if gpu else "no CUDA GPU is visible")
    return {"onnxruntime-cpu": {"usable": st["usable"], "why": st.get("why"), "cuda_graphs": "no: runs on the CPU"},
            "onnxruntime-cuda": {"usable": bool(st.get("cuda")) and gpu, "why": why_cuda,
                                 "cuda_graphs": CUDA_GRAPHS}}
