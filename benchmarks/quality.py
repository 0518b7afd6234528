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

from nuwaxl.export.onnx_export import sha256_file
from nuwaxl.models.checkpoint import bundled_checkpoint
from nuwaxl.runtime.pipeline import Pipeline
from nuwaxl.train.evaluate import evaluate_generation, evaluate_reference, load_probe

# Longest first (the claim is about length); DoD without a depth uses the least that reaches the length (3 at 1024
# and 256 frames, 1 at 16), so the depth rows add depth 1 and 2 where they reach, and depth 3 at 16 frames.
ROWS = [(m, n, None) for n in (1024, 256, 16) for m in ("dod", "ar")] + \
       [("dod", 226, 2), ("dod", 16, 2), ("dod", 16, 3)]
# References: the probe on the real frames, and on their T-KLVAE reconstructions (what the latent can represent).
REFERENCE = [("real", 256, None), ("vae", 256, None)]


def parse_rows(text: str) -> list[tuple[str, int, int | None]]:
    """'dod:226:2,ar:1024,vae:256' -> [(mode, frames, depth)]."""
    rows = []
    for item in text.split(","):
        mode, frames, *depth = item.strip().split(":")
        if mode not in ("dod", "ar", "real", "vae") or len(depth) > 1:
            raise SystemExit(f"bad row {item!r}: use MODE:FRAMES[:DEPTH], MODE one of dod, ar, real, vae")
        rows.append((mode, int(frames), int(depth[0]) if depth else None))
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    head = ("| mode | depth | guidance | frames | stories | Avg-FD | Block-FD-16 | attribute acc. | location acc. | "
            "characters acc. | character recall (quarters 1-4) | Avg-FD (quarters 1-4) |\n" + "| --- " * 12 + "|\n")
    lines = [f"| {r['mode'].upper()} | {r['depth'] or ('min' if r['mode'] == 'dod' else '-')} | "
             f"{r.get('guidance_scale', '-')} | {r['num_frames']} | "
             f"{r['videos']} | {r['avg_fd']:.1f} | {r['block_fd_16']:.1f} | {100 * r['attribute_accuracy']:.1f}% | "
             f"{100 * r['location_accuracy']:.1f}% | {100 * r['characters_accuracy']:.1f}% | "
             + " / ".join(f"{100 * q:.0f}%" for q in r["character_recall_by_quarter"]) + " | "
             + " / ".join(f"{q:.0f}" for q in r["avg_fd_by_quarter"]) + " |" for r in rows]
    return (f"# Quality against length, bundled `small` weights, held-out stories\n\n{meta['device']}, torch "
            f"{meta['torch']}, git {meta['git']}, {meta['steps']} {meta['sampler']} steps. Lower FD is better. "
            "Metrics: "
            "`train/evaluate.py`. REAL and VAE rows: the probe on the stories' real frames and on their T-KLVAE "
            "reconstructions (references for generation).\n\n" + head + "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--md", default=None)
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: what the weights recommend)")
    ap.add_argument("--sampler", default=None, help="default: what the weights recommend")
    ap.add_argument("--device", default=None)
    ap.add_argument("--frames-budget", type=int, default=4096)
    ap.add_argument("--min-stories", type=int, default=4)
    ap.add_argument("--torch-mode", default="eager", help="eager, cudagraph, ...")
    ap.add_argument("--guidance", default=None, help="classifier-free guidance scales, comma-separated (each row "
                    "runs at each; default: what the weights recommend)")
    ap.add_argument("--rows", default=None, help="MODE:FRAMES[:DEPTH],... (default: the length table and the "
                    "reference rows)")
    ap.add_argument("--checkpoint", default=None, help="default: the bundled weights")
    args = ap.parse_args()
    checkpoint = args.checkpoint or bundled_checkpoint()
    pipe = Pipeline.from_pretrained(checkpoint, device=args.device, torch_mode=args.torch_mode)
    probe = load_probe()
    dev = pipe.nets.spec.device
    args.steps = args.steps or pipe.nets.spec.sampling.num_inference_steps
    args.sampler = args.sampler or pipe.nets.spec.sampling.sampler
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "git": os.environ.get("NUWAXL_GIT_SHA", "unknown"), "steps": args.steps,
            "sampler": args.sampler, "torch_mode": args.torch_mode, "checkpoint": str(checkpoint),
            "checkpoint_sha256": sha256_file(checkpoint),
            "recommended_guidance": pipe.nets.spec.sampling.guidance_scale}
    rows = []
    scales = ([float(x) for x in args.guidance.split(",")] if args.guidance
              else [pipe.nets.spec.sampling.guidance_scale])
    todo = [(m, n, d, g) for m, n, d in (parse_rows(args.rows) if args.rows else ROWS + REFERENCE)
            for g in ([None] if m in ("real", "vae") else scales)]
    for mode, n, depth, guidance in todo:
        stories = max(args.min_stories, args.frames_budget // n)
        t0 = time.perf_counter()
        if guidance is None:
            rows.append(evaluate_reference(pipe, n, stories, mode == "vae", probe))
        else:
            rows.append(evaluate_generation(pipe, n, mode, depth, stories, args.steps, probe=probe, progress=False,
                                            guidance_scale=guidance, sampler=args.sampler))
        rows[-1]["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(rows[-1]), flush=True)
        with open(args.out, "w") as f:  # after every row: a cut-off run keeps what it measured
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        if args.md:
            with open(args.md, "w") as f:
                f.write(markdown(rows, meta))


if __name__ == "__main__":
    main()
