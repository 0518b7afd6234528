"""`trt-nuwaxl build`: checkpoint -> ONNX (+ parity) -> engines, into one self-describing directory.

Stages and their outputs are described in `nuwaxl.engine.directory`. Every stage is cached by a key over what
changes its output, so a rebuild redoes only what changed; engines.json is written last.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nuwaxl.config import ModelConfig, preset
from nuwaxl.dtypes import torch_dtype
from nuwaxl.engine.directory import FORMAT, FORMAT_VERSION, MANIFEST
from nuwaxl.engine.registry import BACKEND_FOLDERS, BACKENDS, backend_module
from nuwaxl.engine.torch_backend import resolve_device
from nuwaxl.errors import UserError, option
from nuwaxl.export.onnx_export import (
    OPSET,
    dynamic_shapes,
    export_onnx,
    library_versions,
    measure_parity,
    onnx_sha256,
    sha256_file,
    write_manifest,
)
from nuwaxl.files import write_text
from nuwaxl.iospec import ENGINE_PRECISIONS, NETWORKS, IOSpec, io_specs
from nuwaxl.models.checkpoint import NuwaModels, bundled_checkpoint, load_checkpoint, read_config
from nuwaxl.models.networks import networks


class ParityError(RuntimeError):
    pass


def parity_batches(spec: IOSpec, which: str) -> list[int]:
    if which == "none":
        return []
    pick = {"min": spec.batch_min, "opt": spec.batch_opt, "max": spec.batch_max}
    try:
        return sorted({pick[w] if w in pick else int(w) for w in which.split(",")})
    except ValueError:
        raise UserError(f"{option('parity', which)}: give a comma list of min, opt, max or batch sizes, "
                        "or 'none'") from None


def _parity_text(result: dict) -> str:
    if not result["measured"]:
        return f"parity not measured ({option('parity', 'none')})"
    return f"parity {result['worst_rel_err']:.1e} (tolerance {result['tolerance']:.0e})"


def _stage_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _cached(manifest_path: Path, key: str, force: bool) -> dict | None:
    if force or not manifest_path.is_file():
        return None
    old = json.loads(manifest_path.read_text())
    return old if old.get("stage_key") == key else None


def _check_parity(name: str, parity: dict, where: Path) -> None:
    if parity.get("measured") and not parity["passed"]:
        raise ParityError(f"{name}: parity failed (worst relative error {parity['worst_rel_err']:.2e} > "
                          f"{parity['tolerance']:.0e}); details in {where}")


def check_backend(backend: str) -> None:
    """The backend's library is importable here (before any export work or any folder is made)."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend in ("onnxruntime", "tensorrt"):  # both parse the ONNX and ONNX Runtime checks its parity
        from nuwaxl.engine.onnxruntime_backend import status

        ort = status()
        if not ort["usable"]:
            raise UserError(f"{ort['why']}: the {backend} build checks its ONNX export with ONNX Runtime")
    if backend == "tensorrt":
        from nuwaxl.engine.tensorrt_backend import status

        trt = status()
        if not trt["can_build"]:
            raise UserError(f"cannot build TensorRT plans here: {trt['why_not_build']}")


def build(out: str | Path, backend: str, precision: str = "fp16", max_rows: int = 16,
          checkpoint: str | None = None, preset_name: str | None = None, resolution: int | None = None,
          frames_per_call: int | None = None, device: str | None = None, opt_level: int = 3,
          targets: list[str] | None = None, parity: str = "min,opt,max", force: bool = False,
          progress: bool = True, log=print, only: tuple[str, ...] = NETWORKS, init_device: str = "cpu") -> dict:
    """Build engines from `checkpoint`, or a preset's random weights, or (neither given) the bundled trained
    weights. `max_rows` bounds the engines' batch axis (calls, x2 with guidance). `only` builds a subset (for
    benchmarks) and then writes no engines.json."""
    if precision not in ENGINE_PRECISIONS:
        raise UserError(f"precision {precision!r}: engines are built in {' or '.join(ENGINE_PRECISIONS)}")
    check_backend(backend)
    out = Path(out)
    dev = resolve_device(device)
    if backend == "torch" and precision == "fp16" and dev.type == "cpu":
        raise UserError(f"fp16 AOTInductor packages need a CUDA device; use {option('precision', 'fp32')} or "
                        f"{option('device', 'cuda')}")
    if checkpoint is None and preset_name is None:
        checkpoint = str(bundled_checkpoint())
    config = read_config(checkpoint) if checkpoint else preset(preset_name)
    if resolution:
        config = config.with_resolution(resolution)
    L = frames_per_call or config.frames_per_call
    specs = io_specs(config, precision, max_rows, L)
    parity_sizes = {name: parity_batches(specs[name], parity) for name in only}  # checked before any work
    for sub in BACKEND_FOLDERS[backend]:
        (out / sub).mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    if manifest_path.exists():  # an interrupted rebuild must not look complete
        manifest_path.unlink()
    timings: dict[str, float] = {}
    bar = tqdm(total=1 + len(only), desc=f"build {backend} {precision}", unit="stage", disable=not progress)

    t0 = time.perf_counter()
    # The weights every stage exports from. The directory records where they came from instead of copying them:
    # only the live torch modes read them again (a paper checkpoint is 5.25 GB; a preset's are regenerated).
    if checkpoint:
        models = load_checkpoint(checkpoint)
        path = Path(checkpoint).resolve()
        weights = {"source": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}
    else:
        models = NuwaModels.random(preset(preset_name), seed=0, device=init_device)
        weights = {"source": f"preset:{preset_name}", "seed": 0, "sha256": None}
    weights_id = weights["sha256"] or _stage_key(preset=preset_name, seed=0, torch=torch.__version__)
    stale = out / "checkpoint.safetensors"  # format v2 copied the checkpoint here
    if stale.is_file():
        stale.unlink()
    write_text(out / "tokenizer.json", models.tokenizer.json)
    models.config = config
    reference = {n: m.to(dev, torch.float32) for n, m in networks(models.float().to(dev)).items()}
    timings["checkpoint_s"] = time.perf_counter() - t0
    bar.update()

    dtype = torch_dtype(precision)
    versions = {**library_versions(), "python": platform.python_version()}
    records = {}
    export_nets = networks(_cast_copy(models, dtype)) if dtype != torch.float32 else reference
    for name in only:
        t1 = time.perf_counter()
        bar.set_postfix(network=name)
        spec = specs[name]
        module = export_nets[name]
        record = {"io_spec": spec.to_dict()}
        if backend in ("onnxruntime", "tensorrt"):
            record.update(_onnx_stage(name, module, reference[name], spec, precision, out, dev, weights_id,
                                      config, parity_sizes[name], force, log))
        if backend == "tensorrt":
            from nuwaxl.engine.tensorrt_backend import build_plan

            rec = build_plan(out / "onnx" / f"{name}.onnx", record["onnx_sha256"], spec, precision,
                             out / "tensorrt" / f"{name}.plan", opt_level, targets, out / "tensorrt" / "timing.cache",
                             force)
            log(f"{name}: TensorRT plan for {rec['targets']} " + ("reused (cache key matches)" if rec["reused"]
                                                                    else f"built in {rec['build_s']} s"))
            record["plan"] = f"tensorrt/{name}.plan"
        if backend == "torch":
            record.update(_aoti_stage(name, module, reference[name], spec, precision, out, dev, weights_id,
                                      config, parity_sizes[name], force, log))
        record["files"] = {rel: (out / rel).stat().st_size for rel in backend_module(backend).files(out, name)}
        timings[f"{name}_s"] = time.perf_counter() - t1
        records[name] = record
        bar.update()
    bar.close()
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "backend": backend, "precision": precision,
                "max_rows": max_rows, "frames_per_call": L, "resolution": config.resolution,
                "model_config": config.to_dict(), "weights": weights,
                "cuda_graphs": backend_module(backend).CUDA_GRAPHS,
                "sampling": models.sampling.to_dict(), "trained_on": models.trained_on.to_dict(),
                "device": str(dev), "device_type": dev.type, "gpu": _gpu_name(dev), "networks": records,
                "timings_s": {k: round(v, 2) for k, v in timings.items()}, "versions": versions,
                "created_unix": int(time.time())}
    if set(only) == set(NETWORKS):  # a partial build is not a usable engine directory
        write_manifest(manifest_path, manifest)
    return manifest


def _cast_copy(models: NuwaModels, dtype: torch.dtype) -> NuwaModels:
    """A copy of the bundle in another dtype (the fp32 reference stays untouched)."""
    return copy.deepcopy(models).to(dtype)


def _gpu_name(dev: torch.device) -> str | None:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else None


def _onnx_stage(name, module, reference, spec, precision, out, dev, weights_id, config: ModelConfig, parity, force,
                log) -> dict:
    from nuwaxl.engine.onnxruntime_backend import OrtEngine, status

    onnx_path, man_path = out / "onnx" / f"{name}.onnx", out / "onnx" / f"{name}.json"
    key = _stage_key(checkpoint=weights_id, spec=spec.to_dict(), precision=precision, opset=OPSET,
                     torch=torch.__version__, parity=parity)
    cached = _cached(man_path, key, force)
    if cached and onnx_path.is_file() and onnx_sha256(onnx_path) == cached["onnx_sha256"]:
        log(f"{name}: ONNX reused (same checkpoint, spec and precision)")
        return {"onnx": f"onnx/{name}.onnx", "onnx_sha256": cached["onnx_sha256"]}
    g = torch.Generator().manual_seed(1)
    from nuwaxl.export.onnx_export import sample_inputs

    sample = sample_inputs(spec, min(2, spec.batch_max), dev, next(module.parameters()).dtype,
                           config.text.vocab_size, g)
    facts = export_onnx(module, spec, onnx_path, sample)
    ort_dev = dev if (dev.type == "cuda" and status().get("cuda")) else torch.device("cpu")
    engine = OrtEngine(onnx_path, spec, ort_dev)
    ref = reference.to(ort_dev)

    result = measure_parity(engine.run, ref, spec, precision, parity, ort_dev, config.text.vocab_size)
    sha = onnx_sha256(onnx_path)
    manifest = {"network": name, "stage_key": key, "onnx_sha256": sha, "source_checkpoint_sha256": weights_id,
                "precision": precision, "io_spec": spec.to_dict(), **facts, "versions": library_versions(),
                "parity": {**result, "runtime": f"onnxruntime {status().get('version')} on {ort_dev.type}"}}
    write_manifest(man_path, manifest)
    reference.to(dev)
    _check_parity(name, result, man_path)
    log(f"{name}: ONNX exported in {facts['export_s']} s, {_parity_text(result)}")
    return {"onnx": f"onnx/{name}.onnx", "onnx_sha256": sha}


def _aoti_stage(name, module, reference, spec, precision, out, dev, weights_id, config, parity, force, log) -> dict:
    from nuwaxl.engine.torch_backend import AOTI_MIN_BATCH, AotiEngine, aoti_compile
    from nuwaxl.export.onnx_export import sample_inputs

    pt2, man_path = out / "torch" / f"{name}.pt2", out / "torch" / f"{name}.json"
    key = _stage_key(checkpoint=weights_id, spec=spec.to_dict(), precision=precision, torch=torch.__version__,
                     device=_gpu_name(dev) or platform.processor() or "cpu", parity=parity)
    cached = _cached(man_path, key, force)
    if cached and pt2.is_file():
        log(f"{name}: AOTInductor package reused")
        return {"package": f"torch/{name}.pt2"}
    names = [t.name for t in spec.inputs]
    dtype = next(module.parameters()).dtype
    sample = sample_inputs(spec, min(2, spec.batch_max), dev, dtype, config.text.vocab_size,
                           torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    lowest = max(spec.batch_min, AOTI_MIN_BATCH)
    dynamic = spec.batch_max > lowest  # a package for a single batch size (1 or 2 rows) is static
    batch = torch.export.Dim("batch", min=lowest, max=spec.batch_max) if dynamic else None
    with torch.no_grad():
        program = torch.export.export(module, tuple(sample[n] for n in names),
                                      dynamic_shapes=dynamic_shapes(module, spec, batch))
        aoti_compile(program, pt2)
    compile_s = round(time.perf_counter() - t0, 2)
    engine = AotiEngine(pt2, spec)
    result = measure_parity(engine.run, reference, spec, precision,
                            parity, dev, config.text.vocab_size)
    write_manifest(man_path, {"network": name, "stage_key": key, "source_checkpoint_sha256": weights_id,
                              "precision": precision, "io_spec": spec.to_dict(), "compile_s": compile_s,
                              "device": str(dev), "torch": torch.__version__, "parity": result})
    _check_parity(name, result, man_path)
    log(f"{name}: AOTInductor package compiled in {compile_s} s, {_parity_text(result)}")
    return {"package": f"torch/{name}.pt2"}
