"""Per-call latency and parity of each backend for one network, at batch 1 and at a full level's batch.

Random weights (speed does not depend on weight values). Every backend runs fp16 and is compared with an fp32
eager PyTorch reference on the same fresh random inputs (relative error: max|out - ref| / max|ref|).
AOTInductor and ONNX Runtime engines are produced by the project's own `build()` (with its own parity manifests);
the live torch modes run the module as `generate --torch-mode MODE` does (channels-last convolution weights,
regional compilation, one CUDA graph per batch size).

    python benchmarks/engine_latency.py --preset paper --network unet_step --backends eager,compile-cudagraph,aoti \
        --batches 1,69 --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from nuwaxl.config import preset
from nuwaxl.engine.graphs import GraphedEngine
from nuwaxl.engine.registry import TORCH_MODES
from nuwaxl.engine.torch_backend import AotiEngine, TorchEngine, channels_last_convs, package_paths
from nuwaxl.export.onnx_export import sample_inputs
from nuwaxl.iospec import NETWORKS, io_specs
from nuwaxl.models.checkpoint import NuwaModels
from nuwaxl.models.networks import networks


def environment() -> dict:
    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
        except Exception as e:  # recorded, not hidden
            return f"unavailable: {e}"

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(),
           "driver": run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
           "git_sha": os.environ.get("NUWAXL_GIT_SHA") or run(["git", "rev-parse", "--verify", "HEAD"]) or "unknown"}
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        env["onnxruntime"] = None
    return env


def cuda_time(fn, iters: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return {"median_ms": pick(0.5), "p10_ms": pick(0.1), "p90_ms": pick(0.9), "iters": iters}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--network", default="unet_step", choices=NETWORKS)
    ap.add_argument("--backends", default="eager,cudagraph,compile,aoti,onnxruntime")
    ap.add_argument("--batches", default="1,69")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--workdir", default="/tmp/nuwaxl-bench")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    cfg = preset(args.preset)
    dev = torch.device("cuda")
    spec = io_specs(cfg, "fp16", max(batches))[args.network]
    t0 = time.perf_counter()
    ref_models = NuwaModels.random(cfg, seed=0, device="cuda").float()  # the same weights build() makes
    reference = networks(ref_models)[args.network]
    half = channels_last_convs(networks(NuwaModels.random(cfg, seed=0, device="cuda").half())[args.network])
    setup_s = time.perf_counter() - t0
    results = {"preset": args.preset, "network": args.network, "precision": "fp16", "weights": "random (seed 0)",
               "frames_per_call": cfg.frames_per_call, "resolution": cfg.resolution, "env": environment(),
               "setup_s": round(setup_s, 1), "scenarios": []}

    def engine_for(backend):
        if backend in TORCH_MODES:  # a live module, as generate --torch-mode runs it
            engine = TorchEngine(half, spec, compiled=backend.startswith("compile"))
            return (GraphedEngine(engine, spec) if backend.endswith("cudagraph") else engine), {}
        from nuwaxl.build import build

        if backend == "onnxruntime":
            from nuwaxl.engine.onnxruntime_backend import status

            if not status().get("cuda"):
                raise RuntimeError(f"no CUDA provider in this onnxruntime: {status()}")
        out = Path(args.workdir) / f"{args.preset}-{backend}"
        t1 = time.perf_counter()
        build(out, "torch" if backend == "aoti" else backend, "fp16", max(batches), preset_name=args.preset,
              device="cuda", parity=args.batches, only=(args.network,), init_device="cuda", progress=False)
        info = {"build_s": round(time.perf_counter() - t1, 1)}
        if backend == "aoti":
            info["build_manifest"] = json.loads((out / "torch" / f"{args.network}.json").read_text())["parity"]
            return AotiEngine(package_paths(out, args.network, spec), spec, dev), info
        from nuwaxl.engine.onnxruntime_backend import OrtEngine

        man = json.loads((out / "onnx" / f"{args.network}.json").read_text())
        info.update(build_manifest=man["parity"], export_s=man["export_s"])
        return OrtEngine(out / "onnx" / f"{args.network}.onnx", spec, dev), info

    for backend in args.backends.split(","):
        try:
            engine, info = engine_for(backend)
        except Exception as e:  # a backend that cannot run here is recorded with its reason
            results["scenarios"].append({"backend": backend, "error": f"{type(e).__name__}: {str(e)[:500]}"})
            print(backend, "ERROR", e, flush=True)
            continue
        for b in batches:
            feeds = sample_inputs(spec, b, dev, torch.float16, cfg.text.vocab_size, torch.Generator().manual_seed(b))
            torch.cuda.reset_peak_memory_stats()
            t1 = time.perf_counter()
            call = lambda e=engine, f=feeds: e.run(f)[spec.outputs[0].name]  # noqa: E731
            out = call()
            torch.cuda.synchronize()
            first_s = time.perf_counter() - t1
            with torch.inference_mode():
                ref = reference(*(x.float() if x.is_floating_point() else x for x in feeds.values()))
            rel = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            timing = cuda_time(call, args.iters, warmup=3)
            row = {"backend": backend, "batch": b, "first_call_s": round(first_s, 2), "rel_err_vs_fp32": rel,
                   "finite": bool(torch.isfinite(out).all()), **timing,
                   "per_call_ms": timing["median_ms"] / b, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                   **info}
            results["scenarios"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "build_manifest"}), flush=True)
        del engine
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
