"""Experiment: the temporal attention of each UNet level alone, as the Triton kernel (`models.frame_attention`)
against the "math" kernel's matrix products (eager, and compiled by Inductor as the packages compile them), at the
shapes a whole level-3 batch gives (GPU, paper preset by default). Shapes come from the model config.

    python benchmarks/frame_attention_bench.py --out frame-attention.json [--preset paper] [--rows 69]

Random inputs: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

import torch

from nuwaxl.models.layers import attend_over_frames


def attention_math(q, k, v, heads):
    """`TemporalAttention`'s "math" kernel, from the projections on."""
    return attend_over_frames(q, k, v, heads, "math")


def cuda_ms(fn, iters: int = 50) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    from nuwaxl.config import preset
    from nuwaxl.models.frame_attention import frame_attention

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--rows", type=int, default=69, help="UNet calls in the batch (69: a 1024-frame level 3)")
    ap.add_argument("--bandwidth", type=float, default=4.8e12, help="bytes/s for the memory floor (H200 HBM3e)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    config = preset(args.preset)
    u, frames = config.unet, config.frames_per_call
    layers = Counter(p.level for p in u.layer_plan() if p.attention)  # temporal attentions per level
    compiled = torch.compile(attention_math, dynamic=False)
    rows = []
    for level, count in sorted(layers.items()):
        tokens, dim = (config.latent_size // 2 ** level) ** 2, u.channels[level]
        q, k, v = (torch.randn(args.rows, frames, tokens, dim, device="cuda", dtype=torch.float16) for _ in range(3))
        ref = attention_math(q.float(), k.float(), v.float(), u.num_heads)
        got = frame_attention(q, k, v, u.num_heads).float()
        inputs = (q, k, v, u.num_heads)
        row = {"level": level, "layers": count, "shape_BLSD": list(q.shape), "heads": u.num_heads,
               "rel_err_vs_fp32": ((got - ref).norm() / ref.norm()).item(),
               "math_eager_ms": cuda_ms(lambda x=inputs: attention_math(*x)),
               "math_inductor_ms": cuda_ms(lambda x=inputs: compiled(*x)),
               "triton_ms": cuda_ms(lambda x=inputs: frame_attention(*x)),
               "memory_floor_ms": 4 * q.numel() * q.element_size() / args.bandwidth * 1e3}
        rows.append(row)
        print(json.dumps(row), flush=True)
    per_step = {k: round(sum(r[k] * r["layers"] for r in rows), 3)
                for k in ("math_eager_ms", "math_inductor_ms", "triton_ms", "memory_floor_ms")}
    record = {"experiment": "temporal attention kernels at one UNet step's shapes", "preset": args.preset,
              "rows": args.rows, "inputs": "random fp16", "per_step_ms": per_step, "levels": rows,
              "env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                      "triton": __import__("triton").__version__, "git_sha": os.environ.get("NUWAXL_GIT_SHA"),
                      "driver": os.environ.get("NUWAXL_DRIVER")}}
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps(per_step))


if __name__ == "__main__":
    main()
