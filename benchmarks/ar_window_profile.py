"""Experiment: where an autoregressive window's time goes besides its denoising steps.

Each AR window is one call: condition encoding (T-KLVAE encoder), `unet_prepare`, the steps, the decode; the next
window waits for this one's decode. This runs AR videos through the pipeline, warm, once plain and once under
torch.profiler (which sees every CUDA kernel, CUDA-graph replays included), and reports per window: wall time,
GPU busy time (the union of kernel intervals), GPU idle time, kernel count, and GPU time by kernel name.

    python benchmarks/ar_window_profile.py --engines DIR | --preset paper --torch-mode cudagraph
        [--frames 91] [--steps 50] --out r.json

Random weights when run on a preset (speed does not depend on weight values).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
from speed import STORY

from nuwaxl.runtime.pipeline import Pipeline

GAP_US = 50  # idle gaps shorter than this are launch latency inside a stream of kernels


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (microseconds in, seconds out)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default=None)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--torch-mode", default="cudagraph")
    ap.add_argument("--frames", type=int, default=91, help="AR frames (16 per window, 1 shared): 91 = 6 windows")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    pipe = (Pipeline.from_engines(args.engines, device="cuda") if args.engines else
            Pipeline.from_preset(args.preset, device="cuda", precision="fp16", torch_mode=args.torch_mode))
    load_s = time.perf_counter() - t0

    def run() -> tuple[float, int]:
        req = pipe.prepare(STORY, args.frames, num_inference_steps=args.steps, sampler="ddim", mode="ar")
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in pipe.run(req, progress=False):
            pass
        torch.cuda.synchronize()
        return time.perf_counter() - start, len(req.plan.calls)

    run()  # warm-up: graphs captured, allocator warm
    wall, windows = run()
    # The pipeline's stage profile (device synchronised at each stage boundary): seconds per stage, whole video.
    stages: dict[str, float] = {}
    req = pipe.prepare(STORY, args.frames, num_inference_steps=args.steps, sampler="ddim", mode="ar")
    for _ in pipe.run(req, progress=False, timings=stages, profile=True):
        pass
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall_profiled, _ = run()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    intervals = [(e.time_range.start, e.time_range.end) for e in kernels]
    by_name = defaultdict(float)
    for e in kernels:
        by_name[e.name] += e.device_time / 1e6
    busy = busy_seconds(intervals)
    # GPU idle gaps between one kernel's end and the next one's start (over all streams), largest first, with the
    # kernels on either side: where the idle time sits (window boundaries, or every step).
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in kernels)
    gaps, end, before = [], spans[0][1], spans[0][2]
    for s0, e0, name in spans[1:]:
        if s0 - end > GAP_US:
            gaps.append((s0 - end, s0 - spans[0][0], before, name))
        if e0 > end:
            end, before = e0, name
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:25]
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "git_sha": os.environ.get("NUWAXL_GIT_SHA"), "driver": os.environ.get("NUWAXL_DRIVER")}
    record = {"experiment": "AR window profile", "source": args.engines or f"preset {args.preset}",
              "backend": pipe.nets.spec.backend, "cuda_graphs": pipe.nets.spec.cuda_graphs,
              "weights": "random (seed 0)" if not args.engines else "as built", "frames": args.frames,
              "steps": args.steps, "windows": windows, "load_s": round(load_s, 2), "wall_s": round(wall, 4),
              "wall_s_profiled": round(wall_profiled, 4),
              "per_window_ms": {"wall": round(1e3 * wall / windows, 3),
                                "gpu_busy": round(1e3 * busy / windows, 3),
                                "gpu_idle": round(1e3 * (wall_profiled - busy) / windows, 3),
                                "kernels": round(len(kernels) / windows, 1)},
              "per_step_ms_if_all_busy_were_steps": round(1e3 * busy / windows / args.steps, 4),
              "stage_profile_ms_per_window": {k: round(1e3 * v / windows, 3) for k, v in stages.items()},
              f"gaps_over_{GAP_US}us": {"count": len(gaps), "total_ms": round(sum(g[0] for g in gaps) / 1e3, 3),
                                       "largest": [{"us": round(g[0], 1), "at_ms": round(g[1] / 1e3, 2),
                                                    "after": g[2][:70], "before": g[3][:70]}
                                                   for g in sorted(gaps, reverse=True)[:30]]},
              "top_kernels_s_per_window": [[n[:120], round(t / windows, 5)] for n, t in top], "env": env}
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k != "top_kernels_s_per_window"})[:3000])


if __name__ == "__main__":
    main()
