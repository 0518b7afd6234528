"""Render speed.py results as a Markdown table laid out like the paper's Table 1, plus a plot.

    python benchmarks/report_speed.py results.json OUT_STEM     # writes OUT_STEM.md and OUT_STEM.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PAPER = {16: (7, 7), 256: (114, 17), 1024: (453, 26)}  # Table 1, 128 px: FDM* s, NUWA-XL s (GPUs not stated)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("out_stem")
    args = ap.parse_args()
    r = json.loads(Path(args.results).read_text())
    rows = {(s["num_frames"], s["mode"]): s for s in r["scenarios"]}
    env = r["env"]
    res = r["scenarios"][0]["resolution"]
    steps = r["scenarios"][0]["steps"]
    lines = [f"# Long-video generation time, {r['scenarios'][0]['preset']} preset, {res} px, {steps} DDIM steps",
             "", f"{env.get('gpu', env.get('cpu'))} x{env.get('gpus', 1)}, driver {env.get('driver', '-')}, "
             f"torch {env['torch']} (CUDA {env.get('cuda', '-')}), backend {r['backend']} for both modes, "
             f"git {env['git_sha']}. **Random weights** (speed does not depend on weight values). Wall time end to "
             "end (prompt encoding, condition encoding, sampling, T-KLVAE decode, frames on the host), median "
             "over repeats after a warm-up.", "",
             "| frames | AR over Diffusion (FDM*) | NUWA-XL (DoD) | reduction | DoD time to first frame | "
             "DoD frames/s | DoD utilization | paper FDM* / NUWA-XL |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    xs, ar_t, dod_t = [], [], []
    for n in sorted({k[0] for k in rows}):
        ar, dod = rows.get((n, "ar")), rows.get((n, "dod"))
        if not (ar and dod):
            continue
        red = 1 - dod["wall_s_median"] / ar["wall_s_median"]
        util = f"{dod['utilization']:.0%}" if dod.get("utilization") else "-"
        paper = f"{PAPER[n][0]} s / {PAPER[n][1]} s" if n in PAPER and res == 128 else "-"

        def fmt(s):
            return f"{s['wall_s_median']:.2f} s ({s['wall_s_min']:.2f}-{s['wall_s_max']:.2f}, n={s['repeats']})"

        lines.append(f"| {n} | {fmt(ar)} | {fmt(dod)} | {red:.1%} | {dod['first_frame_s_median']:.2f} s | "
                     f"{dod['frames_per_s']:.1f} | {util} | {paper} |")
        xs.append(n)
        ar_t.append(ar["wall_s_median"])
        dod_t.append(dod["wall_s_median"])
    Path(args.out_stem + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ar_t, "o-", label="AR over diffusion (FDM*)")
    ax.plot(xs, dod_t, "s-", label="diffusion over diffusion (NUWA-XL)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("frames")
    ax.set_ylabel("wall time, s")
    ax.set_title(f"{env.get('gpu', 'CPU')}, {res} px, {steps} steps, random weights")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out_stem + ".png", dpi=100)


if __name__ == "__main__":
    main()
