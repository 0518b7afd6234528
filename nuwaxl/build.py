"""`trt-nuwaxl build`: checkpoint -> ONNX (+ parity) -> engines, into one self-describing directory.

This module resolves the weights and the I/O specs and writes the manifest; each network's stages belong to its
backend module (`build_network`, found through `engine.registry`; shared parts in `engine.stage`). Stages and
their outputs are described in `nuwaxl.engine.directory`. Every stage is cached by a key over what changes its
output, so a rebuild redoes only what changed; engines.json is written last.
"""

from __future__ import annotations

import copy
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nuwaxl.dtypes import torch_dtype
from nuwaxl.engine.directory import FORMAT, FORMAT_VERSION, MANIFEST
from nuwaxl.engine.registry import BACKEND_FOLDERS, BACKENDS, backend_module
from nuwaxl.engine.stage import BuildJob, stage_key
from nuwaxl.engine.torch_backend import resolve_device
from nuwaxl.errors import UserError, option
from nuwaxl.export.onnx_export import library_versions, write_manifest
from nuwaxl.files import write_text
from nuwaxl.iospec import ENGINE_PRECISIONS, NETWORKS, IOSpec, io_specs
from nuwaxl.models.checkpoint import NuwaModels
from nuwaxl.models.networks import networks
from nuwaxl.weights import WeightsSource


def parity_batches(spec: IOSpec, which: str) -> list[int]:
    if which == "none":
        return []
    pick = {"min": spec.batch_min, "opt": spec.batch_opt, "max": spec.batch_max}
    try:
        return sorted({pick[w] if w in pick else int(w) for w in which.split(",")})
    except ValueError:
        raise UserError(f"{option('parity', which)}: give a comma list of min, opt, max or batch sizes, "
                        "or 'none'") from None


def check_backend(backend: str, device: torch.device, precision: str) -> None:
    """The backend can build here (its library is importable, ...) before any export work or any folder is made."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    backend_module(backend).check_build(device, precision)


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
    out = Path(out)
    dev = resolve_device(device)
    check_backend(backend, dev, precision)
    source = WeightsSource.resolve(checkpoint=checkpoint, preset=preset_name)
    config = source.card().config
    if resolution:
        config = config.with_resolution(resolution)
    L = frames_per_call or config.frames_per_call
    module = backend_module(backend)
    specs = io_specs(config, precision, max_rows, L, module.TENSOR_ELEMENTS_MAX)
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
    models = source.load(init_device)
    weights = source.record()
    weights_id = weights["sha256"] or stage_key(preset=preset_name, seed=source.seed, torch=torch.__version__)
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
    job = BuildJob(out, precision, dev, weights_id, config, L, parity_sizes, force, log, opt_level,
                   tuple(targets) if targets else None)
    records = {}
    export_nets = networks(_cast_copy(models, dtype)) if dtype != torch.float32 else reference
    for name in only:
        t1 = time.perf_counter()
        bar.set_postfix(network=name)
        spec = specs[name]
        record = {"io_spec": spec.to_dict(), **module.build_network(job, name, export_nets[name], reference[name],
                                                                      spec)}
        record["files"] = {rel: (out / rel).stat().st_size for rel in module.files(out, name)}
        timings[f"{name}_s"] = time.perf_counter() - t1
        records[name] = record
        bar.update()
    bar.close()
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "backend": backend, "precision": precision,
                "max_rows": max_rows, "tensor_elements_max": module.TENSOR_ELEMENTS_MAX,
                "frames_per_call": L, "resolution": config.resolution,
                "model_config": config.to_dict(), "weights": weights, "cuda_graphs": module.CUDA_GRAPHS,
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
