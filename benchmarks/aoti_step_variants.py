"""Experiment: which AOTInductor package of a network (`unet_step` by default) is fastest, per batch size (GPU, paper
preset by default).

Variants, named `<dyn|sN>-<nchw|nhwc>[-fah]`: a package compiled for a dynamic batch (2..max, the largest as the
size hint: what `build` made up to git 4962023) or for one static batch; 2-D convolution weights row-major (NCHW, what
`build` stored) or channels-last (NHWC, what the live torch modes use); temporal convolutions as exported by default
(a Conv3d on (B, C, L, H, W)) or, with `-fah`, "frames-as-height" (`models.layers.temporal_conv_layout`).
Packages are compiled in parallel processes (`--jobs`), then each one is
timed alone in this process as a CUDA graph replay (the runtime's `capture_run`), beside the live module (eager
kernels, channels-last, CUDA graph), and its output compared with the live module's.

    python benchmarks/aoti_step_variants.py --out step-variants.json [--preset paper] [--rows 1,69]

Random weights (seed 0): speed does not depend on weight values.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

# fp16 on a GPU; fp32 on the CPU (a smoke run of this script with --preset tiny)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRECISION = "fp16" if DEVICE.type == "cuda" else "fp32"
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32


def models_and_spec(preset: str, rows: int, layout: str, network: str = "unet_step"):
    from nuwaxl.config import preset as preset_config
    from nuwaxl.engine.torch_backend import channels_last_convs
    from nuwaxl.iospec import io_specs
    from nuwaxl.models.checkpoint import NuwaModels
    from nuwaxl.models.networks import networks

    config = preset_config(preset)
    models = NuwaModels.random(config, seed=0, device=DEVICE.type).to(DTYPE).eval()
    if layout == "nhwc":
        channels_last_convs(models)
    return networks(models)[network], io_specs(config, PRECISION, rows)[network], config


TEMPORAL = {"": "volume", "fah": "frames-as-height"}  # variant suffix -> TemporalConv layout


def feeds(spec, batch, config):
    from nuwaxl.export.onnx_export import sample_inputs

    return sample_inputs(spec, batch, DEVICE, DTYPE, config.text.vocab_size,
                         torch.Generator().manual_seed(1))


def compile_variant(name: str, preset: str, rows: int, folder: Path, network: str) -> dict:
    """One package: name = <dyn|sN>-<nchw|nhwc>[-fah]; its constants saved beside it (torch.save keeps strides)."""
    from nuwaxl.engine.torch_backend import aoti_compile, channels_last_convs
    from nuwaxl.export.onnx_export import dynamic_shapes
    from nuwaxl.models.layers import temporal_conv_layout

    shape, layout, *temporal = name.split("-")
    module, spec, config = models_and_spec(preset, rows, layout, network)
    batch = rows if shape == "dyn" else int(shape[1:])
    dim = torch.export.Dim("batch", min=2, max=rows) if shape == "dyn" else None
    x = feeds(spec, batch, config)
    t0 = time.perf_counter()
    with torch.no_grad(), temporal_conv_layout(module, TEMPORAL["".join(temporal)]):
        if layout == "nhwc":  # the (k, 1) convolutions made for "frames-as-height" too
            channels_last_convs(module)
        program = torch.export.export(module, tuple(x[t.name] for t in spec.inputs),
                                      dynamic_shapes=dynamic_shapes(module, spec, dim) if dim else None)
        aoti_compile(program, folder / f"{name}.pt2")
    state = {**program.state_dict, **{k: v for k, v in program.constants.items() if isinstance(v, torch.Tensor)}}
    torch.save(state, folder / f"{name}.weights.pt")
    return {"variant": name, "compile_s": round(time.perf_counter() - t0, 1)}


def time_graph(run, static, iters: int = 20, capture=None) -> float:
    """Median milliseconds of one replay of `run(static)` captured as a CUDA graph (on the CPU: of one call);
    `capture`: the engine's own capture (ONNX Runtime's), in place of torch's."""
    from nuwaxl.engine.graphs import capture_run

    if DEVICE.type == "cpu":
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            run(static)
            times.append(1e3 * (time.perf_counter() - t0))
        return sorted(times)[1]

    replay, _ = capture(static) if capture is not None else capture_run(run, static)
    for _ in range(3):
        replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--network", default="unet_step", help="one of nuwaxl.iospec.NETWORKS")
    ap.add_argument("--rows", default="1,69", help="batch sizes to time; the largest is the dynamic package's max")
    ap.add_argument("--variants", default="dyn-nchw,s69-nchw,s69-nhwc,dyn-nhwc,s1-nchw,s1-nhwc")
    ap.add_argument("--folder", default="/tmp/step-variants")
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--out", required=True)
    ap.add_argument("--compile-one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    if args.compile_one:
        print(json.dumps(compile_variant(args.compile_one, args.preset, max(rows), folder, args.network)), flush=True)
        return

    variants = args.variants.split(",")
    t0 = time.perf_counter()
    compiled, pending = {}, list(variants)
    running: list[tuple[str, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            v = pending.pop(0)
            cmd = [sys.executable, __file__, "--compile-one", v, "--preset", args.preset, "--rows", args.rows,
                   "--network", args.network, "--folder", str(folder), "--out", "-"]
            running.append((v, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(folder / f"{v}.log", "w"),
                                                text=True)))
        time.sleep(2)
        for v, p in list(running):
            if p.poll() is not None:
                running.remove((v, p))
                out = p.stdout.read().strip().splitlines()
                compiled[v] = json.loads(out[-1]) if p.returncode == 0 and out else {"variant": v,
                                                                                     "error": p.returncode}
    compile_wall = round(time.perf_counter() - t0, 1)

    from nuwaxl.engine.torch_backend import load_package, named_outputs

    results = []
    ref_module, spec, config = models_and_spec(args.preset, max(rows), "nhwc", args.network)
    output = spec.outputs[0].name
    names = [t.name for t in spec.inputs]
    for batch in rows:
        x = feeds(spec, batch, config)
        with torch.inference_mode():
            ref = named_outputs(spec, ref_module(*(x[n] for n in names)))[output].float()
            live_ms = time_graph(lambda f: named_outputs(spec, ref_module(*(f[n] for n in names))), x)
        results.append({"variant": "live-eager-nhwc-graph", "batch": batch, "median_ms": round(live_ms, 2)})
        for v in variants:
            shape = v.split("-")[0]
            if "error" in compiled[v] or (shape != "dyn" and int(shape[1:]) != batch) or \
                    (shape == "dyn" and batch < 2):
                continue
            fn = load_package(folder / f"{v}.pt2", DEVICE)
            weights = torch.load(folder / f"{v}.weights.pt", map_location=DEVICE)
            fn.load_constants({k: weights[k] for k in fn.get_constant_fqns()}, check_full_update=True,
                              user_managed=True)

            def run(f, fn=fn):
                return named_outputs(spec, fn(*(f[n].contiguous() for n in names)))

            with torch.inference_mode():
                out = run(x)[output].float()
                err = ((out - ref).norm() / ref.norm()).item()
                ms = time_graph(run, x)
            results.append({"variant": v, "batch": batch, "median_ms": round(ms, 2), "rel_err_vs_live": err,
                            **{k: compiled[v][k] for k in ("compile_s",)}})
            print(json.dumps(results[-1]), flush=True)
            del fn, weights
            torch.cuda.empty_cache()
    env = {"gpu": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu", "torch": torch.__version__,
           "cuda": torch.version.cuda,
           "git_sha": os.environ.get("NUWAXL_GIT_SHA"), "driver": os.environ.get("NUWAXL_DRIVER")}
    record = {"experiment": f"AOTInductor {args.network} package variants", "preset": args.preset,
              "weights": "random (seed 0)", "precision": PRECISION, "env": env, "compile_wall_s": compile_wall,
              "compiled": compiled, "results": results}
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
