"""Where one batched UNet step spends its GPU time: torch.profiler's CUDA kernel table, grouped by operator.

    python benchmarks/profile_unet.py --preset paper --batch 69 --out profile.txt     # random weights, fp16
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from nuwaxl.config import preset
from nuwaxl.export.onnx_export import sample_inputs
from nuwaxl.iospec import io_specs
from nuwaxl.models.checkpoint import NuwaModels
from nuwaxl.models.networks import networks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--batch", type=int, default=69)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = preset(args.preset)
    unet = networks(NuwaModels.random(cfg, seed=0, device="cuda").half())["unet"]
    spec = io_specs(cfg, "fp16", args.batch)["unet"]
    feeds = sample_inputs(spec, args.batch, torch.device("cuda"), torch.float16, cfg.text.vocab_size,
                          torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for _ in range(3):
            unet(*feeds.values())
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                unet(*feeds.values())
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    header = (f"# {args.preset} UNet, batch {args.batch} x {cfg.frames_per_call} frames, fp16, random weights, "
              f"3 steps profiled on {torch.cuda.get_device_name()} (torch {torch.__version__})\n")
    Path(args.out).write_text(header + table)
    print(header + table)


if __name__ == "__main__":
    main()
