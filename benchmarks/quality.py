"""Quality against length (the paper's claim, Table 1 and Table 2c): autoregressive over diffusion (AR) against
diffusion over diffusion (DoD) with the same trained MTD, and DoD depth 1 / 2 / 3, on held-out procedural stories.

    python benchmarks/quality.py --out quality.json --md quality.md          # on a GPU (minutes), or the CPU (slow)
Each row generates as many held-out stories as make 4096 frames (at least 4), so the Frechet distances of rows of
different lengths use about the same number of samples.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from nuwaxl.cli import bundled_checkpoint
from nuwaxl.runtime.pipeline import Pipeline
from nuwaxl.train.evaluate import evaluate_generation, load_probe

# Longest first (the claim is about length); DoD without a depth uses the least that reaches the length (3 at 1024
# and 256 frames, 1 at 16), so the depth rows add depth 1 and 2 where they reach, and depth 3 at 16 frames.
ROWS = [(m, n, None) for n in (1024, 256, 16) for m in ("dod", "ar")] + \
       [("dod", 226, 2), ("dod", 16, 2), ("dod", 16, 3)]


def markdown(rows: list[dict], meta: dict) -> str:
    head = ("| mode | depth | frames | stories | Avg-FD | Block-FD-16 | attribute acc. | location acc. | "
            "characters acc. | character recall (quarters 1-4) |\n" + "| --- " * 10 + "|\n")
    lines = [f"| {r['mode'].upper()} | {r['depth'] or ('-' if r['mode'] == 'ar' else 'min')} | {r['num_frames']} | "
             f"{r['videos']} | {r['avg_fd']:.1f} | {r['block_fd_16']:.1f} | {100 * r['attribute_accuracy']:.1f}% | "
             f"{100 * r['location_accuracy']:.1f}% | {100 * r['characters_accuracy']:.1f}% | "
             + " / ".join(f"{100 * q:.0f}%" for q in r["character_recall_by_quarter"]) + " |" for r in rows]
    return (f"# Quality against length, bundled `small` weights, held-out stories\n\n{meta['device']}, torch "
            f"{meta['torch']}, git {meta['git']}, {meta['steps']} DDIM steps. Lower FD is better. Metrics: "
            "`train/evaluate.py`.\n\n" + head + "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--md", default=None)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--device", default=None)
    ap.add_argument("--frames-budget", type=int, default=4096)
    ap.add_argument("--min-stories", type=int, default=4)
    ap.add_argument("--torch-mode", default="eager", help="eager, cudagraph, ...")
    args = ap.parse_args()
    pipe = Pipeline.from_pretrained(bundled_checkpoint(), device=args.device, mode=args.torch_mode)
    probe = load_probe()
    dev = pipe.nets.spec.device
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "git": os.environ.get("NUWAXL_GIT_SHA", "unknown"), "steps": args.steps,
            "torch_mode": args.torch_mode}
    rows = []
    for mode, n, depth in ROWS:
        stories = max(args.min_stories, args.frames_budget // n)
        t0 = time.perf_counter()
        rows.append(evaluate_generation(pipe, n, mode, depth, stories, args.steps, probe=probe, progress=False))
        rows[-1]["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(rows[-1]), flush=True)
        with open(args.out, "w") as f:  # after every row: a cut-off run keeps what it measured
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        if args.md:
            with open(args.md, "w") as f:
                f.write(markdown(rows, meta))


if __name__ == "__main__":
    main()
