"""The video does not depend on how calls are batched: whole levels against one call per batch, per torch mode.

    python benchmarks/batching_check.py --modes eager cudagraph --out batching.json      # on a GPU
Random `paper` weights (seed 0), 256 frames at 128 px, few DDIM steps (few steps put the host furthest ahead of
the GPU, which is where cross-stream memory reuse would show).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from nuwaxl.runtime.pipeline import Pipeline

STORY = ["a red caveman walks out of his stone house", "a blue dinosaur runs across the yard"]


def compare(mode: str, steps: int, frames: int) -> dict:
    pipe = Pipeline.from_preset("paper", device="cuda", torch_mode=mode)
    kw = dict(num_frames=frames, frames_per_call=16, num_inference_steps=steps, seed=1, progress=False)
    whole = pipe(STORY, **kw).frames
    single = pipe(STORY, max_batch=1, **kw).frames
    d = np.abs(whole.astype(int) - single.astype(int))
    bad = np.flatnonzero(d.reshape(len(d), -1).max(1) > 1)
    return {"mode": mode, "steps": steps, "frames": frames, "max_abs_uint8": int(d.max()),
            "mean_abs_uint8": float(d.mean()), "frames_off_by_more_than_1": bad.tolist()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", nargs="+", default=["eager", "cudagraph"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--frames", type=int, default=256)
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = [compare(m, args.steps, args.frames) for m in args.modes]
    for r in rows:
        print(json.dumps(r))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
