"""The parity gate: an engine against the fp32 PyTorch reference, through polygraphy's Comparator.

Every engine of ours (ONNX Runtime, TensorRT, AOTInductor; `run(feeds) -> outputs by name`) and the reference
module become polygraphy runners (`EngineRunner`); the Comparator runs both on the same inputs, one iteration per
batch size, and compares each output with polygraphy's simple comparison at an absolute tolerance of
`TOLERANCE[precision] * max|reference output|`: the metric the manifests record is that scale-relative error.
The only module that imports polygraphy's comparator.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator, SimpleCompareFunc
from polygraphy.logger import G_LOGGER
from torch import nn

from nuwaxl.dtypes import TORCH_DTYPES, torch_dtype
from nuwaxl.iospec import IOSpec

# Parity tolerances: max |engine - torch fp32| relative to max |torch fp32| over an output, per precision.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
METRIC = "max|engine - torch_fp32| / max|torch_fp32|"


class EngineRunner(BaseRunner):
    """An engine (`run(feeds) -> outputs by name`) as a polygraphy runner: torch tensors in and out, on `device`
    (polygraphy's comparisons then run on the GPU too: the paper UNet's prepared tensors at 69 rows are billions
    of values, minutes of single-threaded numpy on the host). Floating inputs are cast to `float_dtype` (the
    reference runs in fp32); outputs are compared in fp32."""

    def __init__(self, run: Callable[[dict], dict], spec: IOSpec, device: torch.device, name: str,
                 float_dtype: torch.dtype | None = None):
        super().__init__(name=name, prefix="nuwaxl-engine")
        self.fn, self.spec, self.device, self.float_dtype = run, spec, device, float_dtype

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for t in self.spec.inputs:
            meta.add(t.name, TORCH_DTYPES[t.dtype], [-1, *t.shape[1:]])
        return meta

    def infer_impl(self, feed_dict):
        feeds = {}
        for t in self.spec.inputs:
            x = feed_dict[t.name].to(self.device)
            feeds[t.name] = x.to(self.float_dtype) if self.float_dtype and x.is_floating_point() else x
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.fn(feeds)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.inference_time = time.perf_counter() - start
        return OrderedDict((t.name, out[t.name].float().contiguous()) for t in self.spec.outputs)


def reference_runner(module: nn.Module, spec: IOSpec, device: torch.device) -> EngineRunner:
    """The fp32 PyTorch module (inputs in the spec's order, outputs a tensor or a tuple in the spec's order)."""
    def run(feeds):
        out = module(*(feeds[t.name] for t in spec.inputs))
        outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        return {t.name: y for t, y in zip(spec.outputs, outs, strict=True)}

    return EngineRunner(run, spec, device, "torch-fp32", torch.float32)


def measure_parity(engine_run: Callable[[dict], dict], reference: nn.Module, spec: IOSpec, precision: str,
                   batches: list[int], device: torch.device, feeds_for: Callable[[int], dict],
                   engine_name: str = "engine") -> dict:
    """Compare the engine with the fp32 reference at each batch size on `feeds_for(batch)` (torch tensors); each
    batch records its worst output. No batches: the result says parity was not measured."""
    tol = TOLERANCE[precision]
    metric = {"metric": METRIC, "tolerance": tol, "compared_with": "polygraphy Comparator"}
    if not batches:
        return {**metric, "measured": False, "passed": None, "worst_rel_err": None, "batches": {}}
    ref_runner = reference_runner(reference, spec, device)
    engine_runner = EngineRunner(engine_run, spec, device, engine_name, torch_dtype(precision))
    severity = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.ERROR  # one line per comparison is ours to print, not polygraphy's
    results = {}
    try:
        for b in sorted(set(batches)):
            data = [OrderedDict(feeds_for(b))]
            run = Comparator.run([ref_runner, engine_runner], data_loader=data)
            # atol from the reference's own scale, rtol 0: passes iff max|diff| <= tol * max|ref|
            scales = {name: float(y.abs().max()) for name, y in run[0][1][0].items()}
            compare = SimpleCompareFunc(check_error_stat="max", rtol={"": 0.0},
                                        atol={name: tol * s for name, s in scales.items()})
            accuracy = Comparator.compare_accuracy(run, compare_func=compare)
            per_output = next(iter(accuracy[0].values()))[0]  # (reference, engine) pair, first iteration
            errors = []
            for name, res in per_output.items():
                out = run[1][1][0][name]
                abs_err = float(res.max_absdiff)
                errors.append({"output": name, "max_abs_err": abs_err, "ref_max_abs": scales[name],
                               "rel_err": abs_err / scales[name] if scales[name] > 0 else abs_err,
                               "finite": bool(torch.isfinite(out).all()), "passed": bool(res)})
            worst = max(errors, key=lambda e: e["rel_err"])
            results[str(b)] = {**worst, "finite": all(e["finite"] for e in errors),
                               "passed": all(e["passed"] and e["finite"] for e in errors)}
    finally:
        G_LOGGER.module_severity = severity
    worst = max(r["rel_err"] for r in results.values())
    return {**metric, "measured": True, "worst_rel_err": worst, "batches": results,
            "passed": all(r["passed"] for r in results.values())}

