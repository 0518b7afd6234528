"""Experiment: what FP8 (e4m3) transformer linears (`models.fp8`) do to the trained weights' videos. The bundled
weights are scored on held-out stories (`trt-nuwaxl eval`'s scores: Avg-FD, Block-FD-16, attribute accuracy) as
they are, then with the UNet's transformer linears in e4m3, their input ranges calibrated while generating the
bundled demo story (its prompts, not the held-out stories'), and the two compared against a stated tolerance.

    python benchmarks/fp8_quality.py --frames 226 --depth 2 --stories 4 --device cpu --out fp8-quality.json

On a CPU the e4m3 products run through torch's CPU `_scaled_mm`: weights and inputs are rounded to e4m3 as on a
GPU, the accumulation is fp32 (a Hopper GPU's fast-accumulation path may differ slightly). Speed is measured
separately (`aoti_step_variants.py`, variant option `fp8`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from nuwaxl.cli import bundled_story, read_story
from nuwaxl.models.checkpoint import bundled_checkpoint
from nuwaxl.models.fp8 import calibration, fp8_linears, quantize_fp8
from nuwaxl.runtime.pipeline import Pipeline
from nuwaxl.train.evaluate import evaluate_generation, load_probe

# What "within tolerance of fp16" means, as for the sampler steps (README "Samplers"): Avg-FD and Block-FD-16 at
# most 3% above the unquantized weights' and attribute accuracy at most 1 point below.
TOLERANCE = {"fd_rel": 0.03, "accuracy_points": 1.0}


def within(base: dict, other: dict) -> bool:
    return (other["avg_fd"] <= base["avg_fd"] * (1 + TOLERANCE["fd_rel"])
            and other["block_fd_16"] <= base["block_fd_16"] * (1 + TOLERANCE["fd_rel"])
            and 100 * (base["attribute_accuracy"] - other["attribute_accuracy"]) <= TOLERANCE["accuracy_points"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=226)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--stories", type=int, default=4)
    ap.add_argument("--calibration-frames", type=int, default=46, help="frames of the demo story generated to "
                    "calibrate the FP8 input ranges")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    probe = load_probe(None)
    pipe = Pipeline.from_pretrained(device=args.device)
    unet = pipe.nets.engines["unet_step"].module.unet
    rows = {}
    t0 = time.perf_counter()
    rows["unquantized"] = evaluate_generation(pipe, args.frames, "dod", args.depth, args.stories, probe=probe)
    rows["unquantized"]["wall_s"] = round(time.perf_counter() - t0, 1)

    prompts = read_story(bundled_story())
    with torch.no_grad(), calibration(unet) as amax:
        pipe(prompts, num_frames=args.calibration_frames, seed=0, progress=False)
    layers = quantize_fp8(unet, amax)
    t0 = time.perf_counter()
    rows["fp8"] = evaluate_generation(pipe, args.frames, "dod", args.depth, args.stories, probe=probe)
    rows["fp8"]["wall_s"] = round(time.perf_counter() - t0, 1)
    verdict = within(rows["unquantized"], rows["fp8"])
    record = {"what": "bundled trained weights scored unquantized and with the UNet's transformer linears in e4m3 "
                      "(models.fp8), input ranges calibrated on the bundled demo story "
                      f"({args.calibration_frames} frames, its {len(prompts)} prompts)",
              "weights": str(bundled_checkpoint()), "fp8_layers": layers, "fp8_layer_names": sorted(fp8_linears(unet)),
              "dtype": str(next(p for p in unet.parameters() if p.is_floating_point()).dtype),
              "device": str(pipe.nets.spec.device), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "git_sha": os.environ.get("NUWAXL_GIT_SHA"),
              "tolerance": TOLERANCE, "within_tolerance": verdict, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    scores = {k: {m: v.get(m) for m in ("avg_fd", "block_fd_16", "attribute_accuracy")} for k, v in rows.items()}
    print(json.dumps(scores | {"within_tolerance": verdict}))


if __name__ == "__main__":
    main()
