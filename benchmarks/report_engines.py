"""Merge engine_latency.py JSON files into one results file and a Markdown table.

    python benchmarks/report_engines.py OUT_STEM run1.json run2.json ... [--git-sha SHA]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ORDER = ["eager", "cudagraph", "compile", "aoti", "onnxruntime"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_stem")
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--git-sha", default=None, help="commit the runs measured (when the device had no git)")
    args = ap.parse_args()
    runs = [json.loads(Path(r).read_text()) for r in args.runs]
    for r in runs:
        if args.git_sha:
            r["env"]["git_sha"] = args.git_sha
    Path(args.out_stem + ".json").write_text(json.dumps(runs, indent=2))
    rows = {}
    for r in runs:
        for s in r["scenarios"]:
            if "error" in s:
                continue
            rows[(r["preset"], s["backend"], s["batch"])] = (s, r)
    env = runs[0]["env"]
    lines = [f"# Per-call UNet latency by backend ({env['gpu']}, fp16, random weights)", "",
             "Random weights: speed does not depend on weight values. One UNet evaluation = one denoising step of "
             f"`batch` diffusion calls of {runs[0]['frames_per_call']} frames each; batch 69 is the level-3 batch of a "
             "1024-frame video (L=16, m=3). CUDA-event timing, median of 10-20 runs after 3 warm-ups. "
             "Parity: max|out - fp32 eager| / max|fp32 eager| on the same random inputs.", "",
             f"Environment: {env['gpu']}, driver {env['driver']}, torch {env['torch']} (CUDA {env['cuda']}), "
             f"Python {env['python']}, onnxruntime-gpu 1.31.1 for the onnxruntime rows, git {env['git_sha']}.", "",
             "| preset | backend | batch | median ms | p10-p90 ms | ms per call | parity vs fp32 "
             "| first call / build s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for preset in ("small", "paper"):
        for backend in ORDER:
            for batch in (1, 69):
                if (preset, backend, batch) not in rows:
                    continue
                s, _ = rows[(preset, backend, batch)]
                build = s.get("build_s", s["first_call_s"])
                lines.append(f"| {preset} | {backend} | {batch} | {s['median_ms']:.2f} | {s['p10_ms']:.2f}-"
                             f"{s['p90_ms']:.2f} | {s['per_call_ms']:.2f} | {s['rel_err_vs_fp32']:.1e} | {build} |")
    Path(args.out_stem + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
