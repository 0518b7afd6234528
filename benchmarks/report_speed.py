"""Render speed.py results (one or more JSON files) as a Markdown table laid out like the paper's Table 1, plus a
plot. Each DoD row is compared with the autoregressive row of the same backend, resolution and frame count on one
GPU (AR cannot use more: each window waits for the previous one).

    python benchmarks/report_speed.py OUT_STEM r1.json [r2.json ...]     # writes OUT_STEM.md and OUT_STEM.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PAPER = {16: (7, 7), 256: (114, 17), 1024: (453, 26)}  # Table 1, 128 px: FDM* s, NUWA-XL s (GPUs not stated)


def load(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        r = json.loads(Path(path).read_text())
        env = r["env"]
        for s in r["scenarios"]:
            rows.append({**s, "backend": r["backend"], "gpus": s.get("gpus", env.get("gpus", 1)),
                         "file": Path(path).name, "gpu": env.get("gpu", env.get("cpu")),
                         "driver": env.get("driver", "-").splitlines()[0],
                         "torch": env["torch"], "cuda": env.get("cuda", "-"), "git_sha": env["git_sha"]})
    return rows


def fmt(s: dict) -> str:
    spread = f"{s['wall_s_min']:.2f}-{s['wall_s_max']:.2f}, " if s["repeats"] > 1 else ""
    return f"{s['wall_s_median']:.2f} s ({spread}n={s['repeats']})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_stem")
    ap.add_argument("results", nargs="+")
    args = ap.parse_args()
    rows = load(args.results)
    ar = {(s["backend"], s["resolution"], s["num_frames"]): s for s in rows if s["mode"] == "ar" and s["gpus"] == 1}
    envs = sorted({f"{s['gpu']}, driver {s['driver']}, torch {s['torch']} (CUDA {s['cuda']})" for s in rows})
    lines = [f"# Long-video generation time, {rows[0]['preset']} preset, {rows[0]['steps']} DDIM steps, no guidance",
             "", "; ".join(envs) + ". **Random weights** (speed does not depend on weight values). Wall time end to "
             "end (prompt encoding, condition encoding, sampling, T-KLVAE decode, frames on the host), median over "
             "repeats after a warm-up (compilation and graph capture excluded). AR = autoregressive over diffusion "
             "(FDM*), always on one GPU with the same backend; DoD = NUWA-XL's diffusion over diffusion. Utilization "
             "= model FLOPs / wall / (790 TFLOP/s x GPUs).", "",
             "| px | frames | backend | GPUs | AR over Diffusion | NUWA-XL (DoD) | reduction | DoD first frame | "
             "DoD frames/s | DoD util. | git | paper FDM* / NUWA-XL |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    plot: dict[tuple, list] = {}
    for s in sorted((s for s in rows if s["mode"] == "dod"),
                    key=lambda s: (s["resolution"], s["num_frames"], s["backend"], s["gpus"])):
        base = ar.get((s["backend"], s["resolution"], s["num_frames"]))
        red = f"{1 - s['wall_s_median'] / base['wall_s_median']:.1%}" if base else "-"
        util = f"{s['utilization']:.0%}" if s.get("utilization") else "-"
        paper = (f"{PAPER[s['num_frames']][0]} s / {PAPER[s['num_frames']][1]} s"
                 if s["num_frames"] in PAPER and s["resolution"] == 128 else "-")
        first = f"{s['first_frame_s_median']:.2f} s" if s.get("first_frame_s_median") is not None else "-"
        lines.append(f"| {s['resolution']} | {s['num_frames']} | {s['backend'].removeprefix('torch-')} | {s['gpus']} | "
                     f"{fmt(base) if base else '-'} | {fmt(s)} | {red} | {first} | {s['frames_per_s']:.1f} | {util} | "
                     f"{s['git_sha']} | {paper} |")
        plot.setdefault((s["resolution"], s["backend"], s["gpus"]), []).append((s["num_frames"], s["wall_s_median"]))
    for (backend, res, n), s in sorted(ar.items()):
        plot.setdefault((res, backend, "AR"), []).append((n, s["wall_s_median"]))
    Path(args.out_stem + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (res, backend, gpus), pts in sorted(plot.items(), key=str):
        pts.sort()
        label = f"{'AR' if gpus == 'AR' else f'DoD x{gpus} GPU'}, {backend.removeprefix('torch-')}, {res} px"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o--" if gpus == "AR" else "s-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("frames")
    ax.set_ylabel("wall time, s")
    ax.set_title(f"{rows[0]['preset']} preset, {rows[0]['steps']} steps, random weights")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out_stem + ".png", dpi=100)


if __name__ == "__main__":
    main()
