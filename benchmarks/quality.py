"""Quality against length (the paper's claim, Table 1 and Table 2c): autoregressive over diffusion (AR) against
diffusion over diffusion (DoD) with the same trained MTD, DoD depth 1 / 2 / 3, and (with --baseline) the paper's
FDM* baseline, an MTD trained on short consecutive clips only (`train --ar-fraction 1`) and run autoregressively,
all on held-out procedural stories of the story version the weights were trained on.

    python benchmarks/quality.py --out quality.json --md quality.md          # on a GPU (minutes), or the CPU (slow)
    python benchmarks/quality.py --checkpoint dod.safetensors --baseline fdm.safetensors --out q.json --md q.md
Each row generates as many held-out stories as make 4096 frames (at least 4), so the Frechet distances of rows of
different lengths use about the same number of samples.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from nuwaxl.export.onnx_export import sha256_file
from nuwaxl.models.checkpoint import bundled_checkpoint
from nuwaxl.runtime.pipeline import Pipeline
from nuwaxl.train.evaluate import evaluate_generation, evaluate_reference, load_probe, story_version_of

# Longest first (the claim is about length); DoD without a depth uses the least that reaches the length (3 at 1024
# and 256 frames, 1 at 16), so the depth rows add depth 1 and 2 where they reach, and depth 3 at 16 frames.
ROWS = [(m, n, None) for n in (1024, 256, 16) for m in ("dod", "ar")] + \
       [("dod", 226, 2), ("dod", 16, 2), ("dod", 16, 3)]
# References: the probe on the real frames, and on their T-KLVAE reconstructions (what the latent can represent).
REFERENCE = [("real", 256, None), ("vae", 256, None)]
# The FDM* baseline (--baseline weights, run autoregressively) at the lengths of the AR rows.
BASELINE = [("fdm", n, None) for n in (1024, 256, 16)]
MODES = ("dod", "ar", "fdm", "real", "vae")


def parse_rows(text: str) -> list[tuple[str, int, int | None]]:
    """'dod:226:2,ar:1024,vae:256' -> [(mode, frames, depth)]."""
    rows = []
    for item in text.split(","):
        mode, frames, *depth = item.strip().split(":")
        if mode not in MODES or len(depth) > 1:
            raise SystemExit(f"bad row {item!r}: use MODE:FRAMES[:DEPTH], MODE one of {', '.join(MODES)}")
        rows.append((mode, int(frames), int(depth[0]) if depth else None))
    return rows


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown(rows: list[dict], meta: dict) -> str:
    v2 = meta.get("story_version") == 2
    cols = ["mode", "depth", "guidance", "frames", "stories", "Avg-FD", "Block-FD-16", "attribute acc.",
            "location acc.", "characters acc.", "character recall (quarters 1-4)", "Avg-FD (quarters 1-4)"]
    if v2:  # the motion, presence, identity and long-range state scores (train/evaluate.py), real frames beside
        cols += ["motion p95 px (real)", "presence", "identity stability", "coherence (real)",
                 "outfit / boulder / daylight"]
    head = "| " + " | ".join(cols) + " |\n" + "| --- " * len(cols) + "|\n"

    def line(r: dict) -> str:
        cells = [r["mode"].upper() + ("*" if r["mode"] == "fdm" else ""),
                 str(r["depth"] or ("min" if r["mode"] == "dod" else "-")), str(r.get("guidance_scale", "-")),
                 str(r["num_frames"]), str(r["videos"]), f"{r['avg_fd']:.1f}", f"{r['block_fd_16']:.1f}",
                 pct(r["attribute_accuracy"]), pct(r["location_accuracy"]), pct(r["characters_accuracy"]),
                 " / ".join(f"{100 * q:.0f}%" for q in r["character_recall_by_quarter"]),
                 " / ".join(f"{q:.0f}" for q in r["avg_fd_by_quarter"])]
        if v2:
            cells += [f"{r['motion_p95_px']:.2f} ({r['real_motion_p95_px']:.2f})", pct(r["presence"]),
                      pct(r["identity_stability"]), f"{pct(r['coherence'])} ({pct(r['real_coherence'])})",
                      " / ".join(pct(r[k]) for k in ("outfit_agreement", "boulder_persistence", "daylight_accuracy"))]
        return "| " + " | ".join(cells) + " |"

    weights = f"`{Path(meta['checkpoint']).name}`" + (f", FDM* `{Path(meta['baseline']).name}`"
                                                      if meta.get("baseline") else "")
    return (f"# Quality against length, {weights}, held-out stories of version {meta.get('story_version', 1)}\n\n"
            f"{meta['device']}, torch {meta['torch']}, git {meta['git']}, {meta['steps']} {meta['sampler']} steps. "
            "Lower FD is better. Metrics: `train/evaluate.py`. REAL and VAE rows: the probe on the stories' real "
            "frames and on their T-KLVAE reconstructions (references for generation). FDM*: the baseline trained on "
            "short clips only, run autoregressively.\n\n" + head + "\n".join(line(r) for r in rows) + "\n")


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
    ap.add_argument("--baseline", default=None, help="FDM* weights (train --ar-fraction 1) for the FDM rows "
                    "(default rows then include them)")
    args = ap.parse_args()
    checkpoint = args.checkpoint or bundled_checkpoint()
    pipe = Pipeline.from_pretrained(checkpoint, device=args.device, torch_mode=args.torch_mode)
    version = story_version_of(pipe)
    baseline = None
    if args.baseline:
        baseline = Pipeline.from_pretrained(args.baseline, device=args.device, torch_mode=args.torch_mode)
        if story_version_of(baseline) != version:
            raise SystemExit(f"--baseline was trained on story version {story_version_of(baseline)}, "
                             f"--checkpoint on {version}: compare weights trained on the same stories")
    probe = load_probe(version=version)
    dev = pipe.nets.spec.device
    args.steps = args.steps or pipe.nets.spec.sampling.num_inference_steps
    args.sampler = args.sampler or pipe.nets.spec.sampling.sampler
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "git": os.environ.get("NUWAXL_GIT_SHA", "unknown"), "steps": args.steps,
            "sampler": args.sampler, "torch_mode": args.torch_mode, "checkpoint": str(checkpoint),
            "checkpoint_sha256": sha256_file(checkpoint),
            "recommended_guidance": pipe.nets.spec.sampling.guidance_scale, "story_version": version,
            "baseline": args.baseline, "baseline_sha256": sha256_file(args.baseline) if args.baseline else None}
    rows = []
    scales = ([float(x) for x in args.guidance.split(",")] if args.guidance
              else [pipe.nets.spec.sampling.guidance_scale])
    default_rows = ROWS + (BASELINE if baseline else []) + REFERENCE
    todo = [(m, n, d, g) for m, n, d in (parse_rows(args.rows) if args.rows else default_rows)
            for g in ([None] if m in ("real", "vae") else scales)]
    if baseline is None and any(m == "fdm" for m, *_ in todo):
        raise SystemExit("FDM rows need the baseline's weights: --baseline fdm.safetensors")
    for mode, n, depth, guidance in todo:
        stories = max(args.min_stories, args.frames_budget // n)
        t0 = time.perf_counter()
        if guidance is None:
            rows.append(evaluate_reference(pipe, n, stories, mode == "vae", probe))
        else:  # FDM*: the baseline's MTD, autoregressive windows as its training clips
            rows.append(evaluate_generation(baseline if mode == "fdm" else pipe, n, "ar" if mode == "fdm" else mode,
                                            depth, stories, args.steps, probe=probe, progress=False,
                                            guidance_scale=guidance, sampler=args.sampler))
            rows[-1]["mode"] = mode
        rows[-1]["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(rows[-1]), flush=True)
        with open(args.out, "w") as f:  # after every row: a cut-off run keeps what it measured
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        if args.md:
            with open(args.md, "w") as f:
                f.write(markdown(rows, meta))


if __name__ == "__main__":
    main()
