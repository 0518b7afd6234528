"""The video is the same on any number of GPUs: run under torchrun (or alone) and save rank 0's frames.

    torchrun --nproc-per-node 4 benchmarks/multi_gpu_check.py --out f4.npy && python benchmarks/multi_gpu_check.py \
        --out f1.npy && python benchmarks/multi_gpu_check.py --compare f1.npy f4.npy
Random `paper` weights (seed 0), 256 frames at 128 px, 10 DDIM steps.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from nuwaxl.runtime.distributed import init_from_env, world
from nuwaxl.runtime.pipeline import Pipeline

STORY = ["a red caveman walks out of his stone house", "a blue dinosaur runs across the yard"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--mode", default="cudagraph")
    ap.add_argument("--compare", nargs=2)
    args = ap.parse_args()
    if args.compare:
        a, b = (np.load(p) for p in args.compare)
        d = np.abs(a.astype(int) - b.astype(int))
        print(json.dumps({"frames": len(a), "identical": bool((d == 0).all()), "max_abs_uint8": int(d.max()),
                          "mean_abs_uint8": float(d.mean()), "files": args.compare}))
        return
    device = init_from_env("cuda")
    pipe = Pipeline.from_preset("paper", device=device, torch_mode=args.mode)
    out = pipe(STORY, num_frames=256, num_inference_steps=10, seed=5, progress=False)
    if world()[0] == 0:
        np.save(args.out, out.frames)
    if world()[1] > 1:
        torch.distributed.barrier()


if __name__ == "__main__":
    main()
