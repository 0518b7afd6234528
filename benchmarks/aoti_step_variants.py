"""Experiment: which AOTInductor package of a network (`unet_step` by default) is fastest, per batch size (GPU, paper
preset by default).

Variants, named `<dyn|sN>-<nchw|nhwc>[-option...]`: a package compiled for a dynamic batch (2..max, the largest as the
size hint: what `build` made up to git 4962023) or for one static batch; 2-D convolution weights row-major (NCHW, what
`build` stored) or channels-last (NHWC, what the live torch modes use); options (`OPTIONS`): `fah` temporal
convolutions "frames-as-height" (`models.layers.temporal_conv_layout`; what `build` makes for the UNet since
f3b4aad), `fam` "frames-as-matmul" (the k frame-shifted copies side by side times one (k*C, C) matrix; what
`build` makes for the T-KLVAE since PACKAGING 6, results/temporal-conv-layouts-paper-h200-f9c5130.json),
`tmath` / `tsum` / `ttri` temporal attention as matrix products / as sums of products / in one Triton kernel
(`models.layers.TemporalAttention`, `models.frame_attention`),
`qkv` self-attention's query, key and value projections as one matrix product (`models.layers.fused_projections`),
`gelu` / `gres` the feed-forward's GELU / and the residual additions after the feed-forward and the output projection
in the matrix products' epilogues (`models.unet.SpaceTimeTransformer.EPILOGUES` "gelu" / "gelu-residual"),
`petab` the temporal attention's frame position encoding as a table computed before export (a constant of the
package, the same values) instead of the arange/exp/sin/cos ops Inductor fuses into the temporal LayerNorm's kernel,
`pe0` no frame position encoding at all (a different function: a diagnosis of that kernel's layout, not a candidate),
`tln` that LayerNorm plus the position table as one Triton kernel writing row-major (`TemporalAttention.norm_kernel`,
`models.frame_attention.frame_layer_norm`; with a temporal attention other than sdpa),
`pad8` convolutions with channel counts that are not multiples of 8 zero-padded to them (`models.layers.aligned_convs`),
`fp8` the
transformer blocks' linear layers in e4m3 (`models.fp8`, input ranges calibrated on the sample inputs at a few
timesteps), `tune` Inductor's max-autotune for matmuls (cuBLAS against Triton templates) and coordinate-descent
tuning of its Triton kernels, `mm1` 1x1 convolutions as matmuls, `nolo` / `nolof` / `nocp` Inductor's layout
optimisation / loop ordering after fusion / comprehensive padding off (diagnoses of the temporal LayerNorm's
frames-innermost store, results/EXPERIMENTS.md).
Packages are compiled in parallel processes (`--jobs`; `tune` ones alone, as they time kernels on the GPU), then each
one is timed alone in this process as a CUDA graph replay (the runtime's `capture_run`), beside the live module
(eager kernels, channels-last, CUDA graph), and its output compared with the live module's. `--cudnn-benchmark` times
each package a second time with cuDNN's algorithm search on (torch.backends.cudnn.benchmark: AOTInductor's
convolutions are ATen calls, which follow it); `--profile` adds each package's kernel profile per category
(`kernel_profile.py`) and the live module's FLOPs per operator (torch.utils.flop_counter), so time and work can be
set side by side.

    python benchmarks/aoti_step_variants.py --out step-variants.json [--preset paper] [--rows 1,69]
        [--variants s69-nhwc-fah,s69-nhwc-fah-fp8] [--cudnn-benchmark] [--profile]

Random weights (seed 0): speed does not depend on weight values.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from kernel_profile import kernel_profile

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


# variant option -> what it changes: the TemporalConv layout, FP8 linears, Inductor settings for the compilation
OPTIONS = {"fah": {"temporal": "frames-as-height"},
           "fam": {"temporal": "frames-as-matmul"},
           "tmath": {"attention": "math"},
           "tsum": {"attention": "fused"},
           "ttri": {"attention": "triton"},
           "fp8": {"fp8": True},
           "tune": {"inductor": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "ATEN,TRITON",
                                 "coordinate_descent_tuning": True}},
           "mm1": {"inductor": {"conv_1x1_as_mm": True}},
           "nolo": {"inductor": {"layout_optimization": False}},
           "nolof": {"inductor": {"loop_ordering_after_fusion": False}},
           "nocp": {"inductor": {"comprehensive_padding": False}},
           "pad8": {"pad": 8},
           "qkv": {"qkv": True},
           "gelu": {"epilogues": "gelu"},
           "gres": {"epilogues": "gelu-residual"},
           "petab": {"position": "table"},
           "tln": {"norm": "triton"},
           "pe0": {"position": "none"}}


def variant_options(name: str) -> tuple[str, str, dict]:
    """name -> (shape, layout, merged options)."""
    shape, layout, *opts = name.split("-")
    unknown = [o for o in opts if o not in OPTIONS]
    if unknown:
        raise SystemExit(f"unknown variant option {unknown[0]!r} in {name!r}; options: {', '.join(OPTIONS)}")
    merged = {"temporal": "volume", "attention": "sdpa", "fp8": False, "inductor": {}, "pad": 0, "qkv": False,
              "epilogues": "none", "position": "ops", "norm": "torch"}
    for o in opts:
        for k, v in OPTIONS[o].items():
            merged[k] = {**merged[k], **v} if k == "inductor" else v
    return shape, layout, merged


def calibrate_fp8(module, spec, config, batch: int) -> dict[str, float]:
    """The FP8 layers' input ranges over the sample inputs at a few timesteps (random weights: for speed only)."""
    from nuwaxl.models.fp8 import calibration

    x = feeds(spec, batch, config)
    names = [t.name for t in spec.inputs]
    with torch.no_grad(), calibration(module) as amax:
        for t in (999, 500, 1):
            module(*(torch.full_like(x[n], t) if n == "timesteps" else x[n] for n in names))
    return amax


@contextlib.contextmanager
def position_encoding(module, config, how: str):
    """Inside the block, `TemporalAttention` adds its frame position encoding as `how` says: "ops" (computed in its
    forward, traced into the program), "table" (`models.layers.position_tables`: a constant of the program) or
    "none" (a table of zeros; not the same function)."""
    from nuwaxl.models.layers import position_tables

    if how == "ops":
        yield
        return
    with position_tables(module, config.frames_per_call) as found:
        for m in found if how == "none" else ():
            m.position_table.zero_()
        yield


def feeds(spec, batch, config):
    from nuwaxl.export.onnx_export import sample_inputs

    return sample_inputs(spec, batch, DEVICE, DTYPE, config.text.vocab_size,
                         torch.Generator().manual_seed(1))


def compile_variant(name: str, preset: str, rows: int, folder: Path, network: str) -> dict:
    """One package (name: see the module docstring); its constants saved beside it (torch.save keeps strides)."""
    from torch._inductor import config as inductor_config

    from nuwaxl.engine.torch_backend import aoti_compile, channels_last_convs
    from nuwaxl.export.onnx_export import dynamic_shapes
    from nuwaxl.models.fp8 import quantize_fp8
    from nuwaxl.models.layers import (
        aligned_convs,
        fused_projections,
        temporal_attention_kernel,
        temporal_conv_layout,
        temporal_norm_kernel,
    )
    from nuwaxl.models.unet import matmul_epilogues

    shape, layout, opts = variant_options(name)
    module, spec, config = models_and_spec(preset, rows, layout, network)
    batch = rows if shape == "dyn" else int(shape[1:])
    dim = torch.export.Dim("batch", min=2, max=rows) if shape == "dyn" else None
    x = feeds(spec, batch, config)
    t0 = time.perf_counter()
    if opts["fp8"]:
        quantize_fp8(module, calibrate_fp8(module, spec, config, min(batch, 4)))
    with torch.no_grad(), temporal_conv_layout(module, opts["temporal"]), inductor_config.patch(opts["inductor"]), \
            temporal_attention_kernel(module, opts["attention"]), temporal_norm_kernel(module, opts["norm"]), \
            fused_projections(module) if opts["qkv"] else contextlib.nullcontext(), \
            matmul_epilogues(module, opts["epilogues"]), position_encoding(module, config, opts["position"]):
        if layout == "nhwc":  # the (k, 1) convolutions made for "frames-as-height" too
            channels_last_convs(module)
        with aligned_convs(module, opts["pad"]) if opts["pad"] else contextlib.nullcontext():
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


def flop_counts(module, args) -> dict:
    """GFLOP per call of `module(*args)`, per ATen operator and in total (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        module(*args)
    per_op = {str(op): round(n / 1e9, 1) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"total_gflop": round(counter.get_total_flops() / 1e9, 1), "by_operator_gflop": per_op}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--network", default="unet_step", help="one of nuwaxl.iospec.NETWORKS")
    ap.add_argument("--rows", default="1,69", help="batch sizes to time; the largest is the dynamic package's max")
    ap.add_argument("--variants", default="dyn-nchw,s69-nchw,s69-nhwc,dyn-nhwc,s1-nchw,s1-nhwc")
    ap.add_argument("--folder", default="/tmp/step-variants")
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--compile-timeout", type=float, default=1200, help="seconds; a slower compilation is stopped")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="time each package again with torch.backends.cudnn.benchmark on")
    ap.add_argument("--profile", action="store_true", help="kernel profiles per category, and the FLOPs per operator")
    ap.add_argument("--top-kernels", type=int, default=15, help="how many of the slowest kernels a profile lists")
    ap.add_argument("--out", required=True)
    ap.add_argument("--reuse", action="store_true", help="time the packages already in --folder (from an earlier "
                    "run or a --compile-one) instead of compiling them again")
    ap.add_argument("--compile-one", metavar="VARIANT", help="only compile this variant into --folder")
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    if args.compile_one:
        record = compile_variant(args.compile_one, args.preset, max(rows), folder, args.network)
        (folder / f"{args.compile_one}.json").write_text(json.dumps(record))
        print(json.dumps(record), flush=True)
        return

    variants = args.variants.split(",")
    t0 = time.perf_counter()
    compiled, pending, started = {}, list(variants), {}
    if args.reuse:
        compiled = {v: json.loads((folder / f"{v}.json").read_text()) for v in variants
                    if (folder / f"{v}.json").is_file() and (folder / f"{v}.pt2").is_file()}
        pending = [v for v in variants if v not in compiled]
    running: list[tuple[str, subprocess.Popen]] = []
    tuning = {v for v in variants if variant_options(v)[2]["inductor"].get("max_autotune_gemm")}

    def startable():  # at most one autotuning compilation at a time: it times kernels on the GPU
        busy = any(r in tuning for r, _ in running)
        return next((v for v in pending if v not in tuning or not busy), None)

    while pending or running:
        while len(running) < args.jobs and (v := startable()) is not None:
            pending.remove(v)
            cmd = [sys.executable, __file__, "--compile-one", v, "--preset", args.preset, "--rows", args.rows,
                   "--network", args.network, "--folder", str(folder), "--out", "-"]
            started[v] = time.perf_counter()
            running.append((v, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(folder / f"{v}.log", "w"),
                                                text=True)))
        time.sleep(2)
        for v, p in list(running):
            if p.poll() is None and time.perf_counter() - started[v] > args.compile_timeout:
                p.kill()
                p.wait()
                running.remove((v, p))
                compiled[v] = {"variant": v, "error": f"compilation stopped after {args.compile_timeout:.0f} s"}
            elif p.poll() is not None:
                running.remove((v, p))
                out = p.stdout.read().strip().splitlines()
                compiled[v] = json.loads(out[-1]) if p.returncode == 0 and out else {"variant": v,
                                                                                     "error": p.returncode}
    compile_wall = round(time.perf_counter() - t0, 1)

    from nuwaxl.engine.torch_backend import load_package, named_outputs

    results, flops = [], {}
    ref_module, spec, config = models_and_spec(args.preset, max(rows), "nhwc", args.network)
    output = spec.outputs[0].name
    names = [t.name for t in spec.inputs]
    for batch in rows:
        x = feeds(spec, batch, config)
        with torch.inference_mode():
            ref = named_outputs(spec, ref_module(*(x[n] for n in names)))[output].float()
            live_ms = time_graph(lambda f: named_outputs(spec, ref_module(*(f[n] for n in names))), x)
        results.append({"variant": "live-eager-nhwc-graph", "batch": batch, "median_ms": round(live_ms, 2)})
        if args.profile:
            flops[batch] = flop_counts(ref_module, [x[n] for n in names])
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

            row = {"variant": v, "batch": batch, "compile_s": compiled[v]["compile_s"]}
            for bench in (False, True) if args.cudnn_benchmark else (False,):
                torch.backends.cudnn.benchmark = bench
                key = "cudnn_benchmark_" if bench else ""
                with torch.inference_mode():
                    out = run(x)[output].float()
                    row[f"{key}rel_err_vs_live"] = ((out - ref).norm() / ref.norm()).item()
                    row[f"{key}median_ms"] = round(time_graph(run, x), 2)
                    if args.profile and DEVICE.type == "cuda":
                        row[f"{key}profile"] = kernel_profile(run, x, top=args.top_kernels)
            torch.backends.cudnn.benchmark = False
            results.append(row)
            print(json.dumps(results[-1]), flush=True)
            del fn, weights
            torch.cuda.empty_cache()
    env = {"gpu": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu", "torch": torch.__version__,
           "cuda": torch.version.cuda,
           "git_sha": os.environ.get("NUWAXL_GIT_SHA"), "driver": os.environ.get("NUWAXL_DRIVER")}
    record = {"experiment": f"AOTInductor {args.network} package variants", "preset": args.preset,
              "weights": "random (seed 0)", "precision": PRECISION, "env": env, "compile_wall_s": compile_wall,
              "compiled": compiled, "results": results, "flops_per_call_by_operator": flops}
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
