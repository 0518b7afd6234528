"""Experiment: the MTD training step, eager against replayed as one CUDA graph (`TrainOptions.cuda_graphs`), and
with its forward and backward compiled by torch.compile inside the graph (`TrainOptions.compile`).

Quality is limited by MTD training compute (README "Training and quality"), and the `small` MTD is so small that an
eager step mostly waits on kernel launches. This times both ways on the same clips and noise (one seed) and, for
the eager step, sums the GPU's kernel time (torch.profiler) to show how much of the step the GPU is busy.

    python benchmarks/train_step.py --steps 120 --out train-step.json                  # random weights
    python benchmarks/train_step.py --init v2-dod-fp16.safetensors --configs eager,graph,graph-compile --out t.json

Step times come from the training log (`seconds` at each log line, where the host waits for the GPU); the first
log interval (warm-up steps, the capture, a compilation) is left out: give a compiled run enough steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nuwaxl.config import preset
from nuwaxl.models.checkpoint import NuwaModels, load_checkpoint
from nuwaxl.train.trainer import Corpus, Trainer, TrainOptions
from nuwaxl.train.videos import synthetic_corpus

sys.path.insert(0, str(Path(__file__).parent))
from speed import environment  # noqa: E402


def initial(args) -> NuwaModels:
    """The starting weights, a fresh copy for each run (the trainer updates its models in place)."""
    return load_checkpoint(args.init) if args.init else NuwaModels.random(preset(args.preset))


CONFIGS = {"eager": {"cuda_graphs": False}, "graph": {"cuda_graphs": True},
           "compile": {"cuda_graphs": False, "compile": True}, "graph-compile": {"cuda_graphs": True, "compile": True}}


def timed_run(videos, args, config: str, run: Path) -> tuple[Trainer, dict]:
    device = torch.device("cuda")
    models = initial(args).float().to(device)
    opts = TrainOptions("mtd", args.steps, batch=args.batch, lr=1e-4, seed=args.seed, log_every=args.log_every,
                        save_every=10**9, ar_fraction=args.ar_fraction, **CONFIGS[config])
    trainer = Trainer(run, models, Corpus(videos, models, device), opts, device, progress=False)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    a, b = log[0], log[-1]
    ms = 1000 * (b["seconds"] - a["seconds"]) / (b["step"] - a["step"])
    return trainer, {"config": config, **CONFIGS[config], "ms_per_step": round(ms, 2),
                     "steps_per_s": round(1000 / ms, 2), "clips_per_s": round(args.batch * 1000 / ms, 1),
                     "train_call_s": round(wall, 1), "losses": [r["loss"] for r in log]}


def eager_kernel_ms(trainer: Trainer, steps: int = 5) -> dict:
    """GPU kernel time of eager steps (summed) against their wall time."""
    from torch.profiler import ProfilerActivity, profile

    trainer.models.train()
    trainer._eager_step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(steps):
            trainer._eager_step()
        end.record()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1000 / steps
    return {"kernel_ms_per_step": round(busy, 2), "kernels_per_step": len(kernels) // steps,
            "wall_ms_per_step": round(start.elapsed_time(end) / steps, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--init", default=None, help="a checkpoint to start from (default: random weights)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--ar-fraction", type=float, default=0.2)
    ap.add_argument("--stories", type=int, default=4)
    ap.add_argument("--story-frames", type=int, default=3376)
    ap.add_argument("--story-version", type=int, default=2)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default="eager,graph", help=f"the first is the reference; of {', '.join(CONFIGS)}")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("train_step.py compares eager steps with CUDA-graph replays: it needs a CUDA GPU")
    videos = synthetic_corpus(0, args.stories, args.story_frames, initial(args).config.resolution, args.workers,
                              version=args.story_version)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs.split(","):
            trainer, row = timed_run(videos, args, config, Path(tmp) / config)
            if config == "eager":
                row.update(eager_kernel_ms(trainer))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
            del trainer
            torch.cuda.empty_cache()
    reference = rows[0]
    for row in rows[1:]:
        row["speedup"] = round(reference["ms_per_step"] / row["ms_per_step"], 2)
        row["logged_loss_worst_rel_diff"] = round(float(np.max(np.abs(
            np.array(row["losses"]) / np.array(reference["losses"]) - 1))), 4)
    result = {"experiment": "MTD training step: " + ", ".join(r["config"] for r in rows), "preset": args.preset,
              "weights": args.init or "random", "batch": args.batch, "steps": args.steps,
              "story_version": args.story_version, "stories": args.stories, "env": environment(torch.device("cuda")),
              "reference": reference["config"], "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps([{k: r.get(k) for k in ("config", "ms_per_step", "speedup", "logged_loss_worst_rel_diff")}
                      for r in rows]))


if __name__ == "__main__":
    main()
