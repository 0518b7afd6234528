"""A picture for README: frames of one held-out story as rendered (top row) and as generated from its captions
(the rows below: the weights with --mode, then with --baseline the FDM* weights run autoregressively) at the same
frame indices, so a reader sees what the long-range metrics (`train/evaluate.py`) measure.

    python benchmarks/story_strip.py --checkpoint dod.safetensors [--baseline fdm.safetensors] --frames 1024 \
        --out strip.png [--json scores.json]
It generates whole videos (every frame index is a real one of the story), then keeps `--columns` evenly spaced
frames. The story version is the one the weights were trained on; the scores of each video go to --json.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from PIL import Image, ImageDraw

from nuwaxl.models.checkpoint import bundled_checkpoint
from nuwaxl.runtime.pipeline import Pipeline
from nuwaxl.train.evaluate import evaluate_videos, heldout_stories, story_version_of


def strip(videos: list[np.ndarray], indices: list[int], scale: int = 2) -> Image.Image:
    """One row of frames per video (uint8 (N, H, W, 3)) at `indices`, each column labelled with its frame index."""
    h, w = videos[0].shape[1] * scale, videos[0].shape[2] * scale
    label, gap = 12, 2
    sheet = Image.new("RGB", (len(indices) * (w + gap), label + len(videos) * (h + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for col, i in enumerate(indices):
        x = col * (w + gap)
        draw.text((x + 2, 0), str(i), fill=(0, 0, 0))
        for row, video in enumerate(videos):
            frame = Image.fromarray(video[i]).resize((w, h), Image.NEAREST)
            sheet.paste(frame, (x, label + row * (h + gap)))
    return sheet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="default: the bundled weights")
    ap.add_argument("--frames", type=int, default=1024)
    ap.add_argument("--mode", choices=("dod", "ar"), default="dod")
    ap.add_argument("--baseline", default=None, help="FDM* weights for a third row (run autoregressively)")
    ap.add_argument("--story", type=int, default=0, help="index of the held-out story")
    ap.add_argument("--columns", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", required=True, help="PNG path")
    ap.add_argument("--json", default=None, help="also write this video's scores here")
    args = ap.parse_args()
    pipe = Pipeline.from_pretrained(args.checkpoint or bundled_checkpoint(), device=args.device)
    version = story_version_of(pipe)
    story = heldout_stories(args.story + 1, args.frames, pipe.config.resolution, version=version)[args.story]
    captions = [story.caption(i) for i in range(args.frames)]
    real = story.clip(range(args.frames))
    rows = [(pipe, args.mode, str(args.checkpoint))]
    if args.baseline:
        rows.append((Pipeline.from_pretrained(args.baseline, device=args.device), "ar", args.baseline))
    videos, scores = [real], []
    for p, mode, weights in rows:
        t0 = time.perf_counter()
        out = p(captions, num_frames=args.frames, mode=mode, seed=args.seed + story.index)
        videos.append(out.frames)
        scores.append({**evaluate_videos([out.frames], [captions], [real], version=version), "weights": weights,
                       "mode": mode, "generate_seconds": round(time.perf_counter() - t0, 1)})
    indices = np.linspace(0, args.frames - 1, args.columns).round().astype(int).tolist()
    strip(videos, indices).save(args.out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"story": args.story, "frames": args.frames, "indices": indices, "rows": scores}, f, indent=1)
    print(f"wrote {args.out}: rows real, " + ", ".join(f"{r['mode']} {r['weights']}" for r in scores))


if __name__ == "__main__":
    main()
