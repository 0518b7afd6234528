"""What a user waits for in a new process: from process start to the first frame and to the last frame.

Each path runs in a fresh Python process (nothing cached in memory; on-disk caches such as Inductor's are whatever
the machine has, and are reported as the `run` index: run 1 and run 2 of the same path on the same machine).

    python benchmarks/cold_start.py --engines DIR --torch-modes cudagraph,compile-cudagraph --preset paper \
        --frames 1024 --runs 2 --out r.json

Random weights (speed does not depend on weight values). The child prints JSON lines with seconds since its
parent started it: `loaded` (weights or engines ready), `first_frame`, `last_frame`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

STORY = ["a red caveman walks out of his stone house", "a blue dinosaur runs across the yard",
         "the sun sets behind the volcano", "they sit by the fire at night"]


def child(args) -> None:
    t0 = args.t0
    import torch

    from nuwaxl.runtime.pipeline import Pipeline

    if args.engines:
        pipe = Pipeline.from_engines(args.engines, device="cuda")
    else:
        pipe = Pipeline.from_preset(args.preset, device="cuda", resolution=args.resolution, torch_mode=args.mode)
    print(json.dumps({"loaded": time.time() - t0}), flush=True)
    request = pipe.prepare(STORY, args.frames, num_inference_steps=args.steps, mode=args.gen_mode)
    first = None
    for _ in pipe.run(request, progress=False):
        if first is None:
            first = time.time() - t0
            print(json.dumps({"first_frame": first}), flush=True)
    torch.cuda.synchronize()
    print(json.dumps({"last_frame": time.time() - t0}), flush=True)
    from torch._dynamo.utils import counters

    from nuwaxl.engine.torch_backend import compile_cache

    compiled = {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")}
    print(json.dumps({"inductor_cache": compiled, "compile_cache": compile_cache.info}), flush=True)
    for i in range(args.warm_runs):  # the same video again in this process: the warm time of this path
        t1 = time.perf_counter()
        for _ in pipe.run(request, progress=False):
            pass
        torch.cuda.synchronize()
        print(json.dumps({f"warm_s_{i + 1}": time.perf_counter() - t1}), flush=True)


def measure(argv: list[str], timeout: float) -> dict:
    t0 = time.time()
    proc = subprocess.run([sys.executable, __file__, "--child", "--t0", repr(t0), *argv], capture_output=True,
                          text=True, timeout=timeout)
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            out.update(json.loads(line))
    out["returncode"] = proc.returncode
    if proc.returncode:
        out["stderr_tail"] = proc.stderr[-2000:]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--engines", default=None, help="an engine directory to time")
    ap.add_argument("--torch-modes", default="", help="comma list of torch modes to time (live modules)")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--frames", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--gen-mode", default="dod", help="dod or ar")
    ap.add_argument("--runs", type=int, default=2, help="new processes per path, one after another")
    ap.add_argument("--warm-runs", type=int, default=0, help="the same video again in each process (warm time)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.child:
        return child(args)
    common = ["--preset", args.preset, "--resolution", str(args.resolution), "--frames", str(args.frames),
              "--steps", str(args.steps), "--gen-mode", args.gen_mode, "--warm-runs", str(args.warm_runs)]
    paths = ([("engines", ["--engines", args.engines])] if args.engines else []) + \
        [(f"torch-{m}", ["--mode", m]) for m in args.torch_modes.split(",") if m]
    import torch
    from speed import environment

    env = environment(torch.device("cuda"))
    rows = []
    for name, extra in paths:
        for run in range(1, args.runs + 1):
            row = {"path": name, "run": run, **measure(common + extra, args.timeout)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:  # after every run: nothing lost
                Path(args.out).write_text(json.dumps({"env": env, "weights": "random (seed 0)", "frames": args.frames,
                                                      "steps": args.steps, "mode": args.gen_mode,
                                                      "preset": args.preset, "resolution": args.resolution,
                                                      "engines": args.engines, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
