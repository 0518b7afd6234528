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
            rows.append({**s, "backend": backend_label(r["backend"]), "gpus": s.get("gpus", env.get("gpus", 1)),
                         "model": model_label(s),
                         "file": Path(path).name, "gpu": env.get("gpu", env.get("cpu")),
                         "driver": env.get("driver", "-").splitlines()[0],
                         "torch": env["torch"], "cuda": env.get("cuda", "-"), "git_sha": env["git_sha"]})
    return rows


def backend_label(backend) -> str:
    """speed.py's backend: a torch mode ("torch-compile-cudagraph") or, for built engines, their record."""
    if isinstance(backend, dict):
        return f"engines ({backend['backend']})"
    return backend.removeprefix("torch-")


def model_label(s: dict) -> str:
    """The weights and sampling a row ran: its preset, random or trained, steps, sampler and guidance."""
    sampling = s.get("sampling") or {"num_inference_steps": s["steps"], "sampler": s["sampler"],
                                     "guidance_scale": 1.0}  # records before sampling was written: no guidance
    weights = "trained" if s.get("weights", "random") != "random" else "random"
    guidance = sampling["guidance_scale"]
    return (f"{s['preset']} {weights}, {sampling['num_inference_steps']} {sampling['sampler']}"
            + (f", guidance {guidance:g}" if guidance != 1.0 else ""))


def fmt(s: dict) -> str:
    spread = f"{s['wall_s_min']:.2f}-{s['wall_s_max']:.2f}, " if s["repeats"] > 1 else ""
    return f"{s['wall_s_median']:.2f} s ({spread}n={s['repeats']})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_stem")
    ap.add_argument("results", nargs="+")
    args = ap.parse_args()
    rows = load(args.results)
    def key(s: dict) -> tuple:  # a DoD row and the AR row it is compared with
        return s["backend"], s["model"], s["resolution"], s["num_frames"]

    ar = {key(s): s for s in rows if s["mode"] == "ar" and s["gpus"] == 1}
    # measured in the same run (file) first: two runs of one backend at different commits each keep their own AR
    ar_same_run = {(s["file"], *key(s)): s for s in rows if s["mode"] == "ar" and s["gpus"] == 1}
    envs = sorted({f"{s['gpu']}, driver {s['driver']}, torch {s['torch']} (CUDA {s['cuda']})" for s in rows})
    trained = any(" trained," in s["model"] for s in rows)
    lines = ["# Long-video generation time", "", "; ".join(envs) + ". **Random weights** (speed does not depend on "
             "weight values)" + (", except rows marked trained: the bundled trained weights with their recommended "
                                 "sampling (guidance doubles the UNet's rows)" if trained else "") + ". Wall time end "
             "to end (prompt encoding, condition encoding, sampling, T-KLVAE decode, frames on the host), median over "
             "repeats after a warm-up (compilation and graph capture excluded). AR = autoregressive over diffusion "
             "(FDM*), always on one GPU with the same backend and model; DoD = NUWA-XL's diffusion over diffusion. "
             "Utilization = model FLOPs / wall / (790 TFLOP/s x GPUs).", "",
             "| model, sampling | px | frames | backend | GPUs | AR over Diffusion | NUWA-XL (DoD) | reduction | "
             "DoD first frame | DoD frames/s | DoD util. | git | paper FDM* / NUWA-XL |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    plot: dict[tuple, dict[int, float]] = {}
    for s in sorted((s for s in rows if s["mode"] == "dod"),
                    key=lambda s: (s["model"], s["resolution"], s["num_frames"], s["backend"], s["gpus"])):
        base = ar_same_run.get((s["file"], *key(s))) or ar.get(key(s))
        red = f"{1 - s['wall_s_median'] / base['wall_s_median']:.1%}" if base else "-"
        util = f"{s['utilization']:.0%}" if s.get("utilization") else "-"
        paper = (f"{PAPER[s['num_frames']][0]} s / {PAPER[s['num_frames']][1]} s"
                 if s["num_frames"] in PAPER and s["resolution"] == 128 else "-")
        first = f"{s['first_frame_s_median']:.2f} s" if s.get("first_frame_s_median") is not None else "-"
        lines.append(f"| {s['model']} | {s['resolution']} | {s['num_frames']} | {s['backend']} | {s['gpus']} | "
                     f"{fmt(base) if base else '-'} | {fmt(s)} | {red} | {first} | {s['frames_per_s']:.1f} | {util} | "
                     f"{s['git_sha']} | {paper} |")
        plot.setdefault((s["model"], s["resolution"], s["backend"], s["gpus"]), {})[s["num_frames"]] = \
            s["wall_s_median"]  # one point per frame count: the row of the file named last
    for (backend, model, res, n), s in sorted(ar.items()):
        plot.setdefault((model, res, backend, "AR"), {})[n] = s["wall_s_median"]
    Path(args.out_stem + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # more series than the default ten colours
    for (model, res, backend, gpus), points in sorted(plot.items(), key=str):
        pts = sorted(points.items())
        label = f"{'AR' if gpus == 'AR' else f'DoD x{gpus} GPU'}, {backend}, {res} px, {model}"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o--" if gpus == "AR" else "s-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("frames")
    ax.set_ylabel("wall time, s")
    ax.set_title("NUWA-XL (DoD) against AR over diffusion")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(args.out_stem + ".png", dpi=100)


if __name__ == "__main__":
    main()
