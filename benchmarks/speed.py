"""End-to-end speed scenarios: diffusion over diffusion (DoD) against autoregressive over diffusion (AR, FDM*),
on the same backend, sampler and step count. Random weights (speed does not depend on weight values), except the
set "trained": the bundled trained weights with their recommended sampling (guidance on), the user's default run.

    python benchmarks/speed.py --set table1-128 --backend compile-cudagraph --out r.json      # on a GPU
    torchrun --nproc-per-node 4 benchmarks/speed.py --set multi-128 --backend compile-cudagraph --out r4.json
    python benchmarks/speed.py --set cpu-smoke --out r.json                                   # anywhere
    python benchmarks/speed.py --set trained --backend compile-cudagraph --out t.json          # bundled weights
    pytest benchmarks/test_speed.py --benchmark-enable                                        # pytest-benchmark form

    python benchmarks/speed.py --set table1-128 --engines DIR --out r.json    # built engines (`trt-nuwaxl build`)

Per scenario: wall time (median and spread over repeats, warm-up excluded), GPU-seconds, frames/s, time to first
frame, peak memory, and utilization = model FLOPs (torch's FlopCounterMode on each network, on the meta device,
scaled by the calls and steps made: `unet_prepare` once per call, `unet_step` per step) / wall time /
(peak FLOP rate x GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from nuwaxl.iospec import io_specs
from nuwaxl.runtime.distributed import init_from_env, world
from nuwaxl.runtime.pipeline import Pipeline

PEAK_TFLOPS = {"H200": 790.0, "H100": 798.0}  # dense fp16/bf16 matmul TFLOP/s, measured on our GPUs (README "Speed")


@dataclass(frozen=True)
class Scenario:
    preset: str
    resolution: int
    num_frames: int
    mode: str  # dod | ar
    steps: int | None = 50  # None (and sampler None): what the weights recommend (`SamplingDefaults`)
    sampler: str | None = "ddim"
    frames_per_call: int = 16
    depth: int | None = None  # None: the least that reaches num_frames
    repeats: int = 3
    order: str = "level"  # DoD scheduling: level (throughput) or depth (latency)
    max_batch: int | None = None  # calls per batch; None: a whole level
    vae_batch: int | None = None  # calls per T-KLVAE encode/decode chunk; None: the runtime's default
    weights: str = "random"  # "random": the preset's random weights (seed 0); "bundled": the trained weights

    @property
    def name(self) -> str:
        extra = f"-{self.order}{self.max_batch or ''}" if self.order != "level" or self.max_batch else ""
        extra += f"-vae{self.vae_batch}" if self.vae_batch else ""
        steps = f"{self.steps}steps" if self.steps else "defaults"
        model = self.preset if self.weights == "random" else f"{self.weights}-{self.preset}"
        return f"{model}-{self.resolution}px-{self.num_frames}f-{self.mode}-{steps}{extra}"


def table1(resolution: int, steps: int = 50) -> list[Scenario]:
    return [Scenario("paper", resolution, n, mode, steps, repeats=3 if (mode, n) != ("ar", 1024) else 1)
            for n in (16, 256, 1024) for mode in ("ar", "dod")]


SETS = {
    "cpu-smoke": [Scenario("tiny", 32, n, mode, steps=2, repeats=2) for n in (16, 40) for mode in ("ar", "dod")],
    "table1-128": table1(128),
    "table1-256": [Scenario("paper", 256, n, mode, repeats=2 if (mode, n) != ("ar", 1024) else 1)
                   for n in (256, 1024) for mode in ("ar", "dod")],  # fewer repeats: one call's time limit
    "latency-128": [Scenario("paper", 128, 1024, "dod", order=o, max_batch=b, repeats=2)
                    for o, b in (("level", None), ("depth", 16), ("depth", 4))],  # repeats=2: warm-up + 2 + profile
    # The last level's T-KLVAE work: larger encode/decode chunks, or the level split in two batches so that the
    # first half's decode runs beside the second half's denoising.
    "level3-128": [Scenario("paper", 128, 1024, "dod", repeats=2, **kw)
                   for kw in ({}, {"vae_batch": 16}, {"vae_batch": 69}, {"max_batch": 35})],
    # Several GPUs (torchrun): DoD only. AR cannot use them (each window waits for the last), so its reference is
    # the one-GPU run of the same backend.
    "multi-128": [Scenario("paper", 128, n, "dod") for n in (256, 1024)],
    "multi-256": [Scenario("paper", 256, n, "dod") for n in (256, 1024)],
    # What a user of the bundled weights waits for: their preset and resolution, their recommended sampler, steps
    # and guidance (twice the UNet rows), the bundled example story.
    "trained": [Scenario("small", 64, n, mode, steps=None, sampler=None, weights="bundled",
                         repeats=3 if (mode, n) != ("ar", 1024) else 1) for n in (16, 1024) for mode in ("ar", "dod")],
}
STORY = ["a red caveman walks out of his stone house", "a blue dinosaur runs across the yard",
         "the sun sets behind the volcano", "they sit by the fire at night"]
WEIGHTS = ("random", "bundled")


def story_for(s: Scenario) -> list[str]:
    """The prompts a scenario generates: the bundled example story for the trained weights (words they know)."""
    if s.weights == "bundled":
        from nuwaxl.cli import bundled_story, read_story

        return read_story(bundled_story())
    return STORY


def pipeline_key(s: Scenario) -> tuple[str, str, int]:
    """Which pipeline a scenario runs on: its weights, preset and resolution."""
    return s.weights, s.preset, s.resolution


def engines_key(pipe: Pipeline) -> tuple[str, str, int]:
    """The `pipeline_key` of the scenarios built engines can run: engines carry their weights (trained or not)."""
    return "bundled" if pipe.nets.spec.trained_on.trained else "random", pipe.config.name, pipe.config.resolution


def pipeline_for(s: Scenario, device: str, torch_mode: str) -> Pipeline:
    """The live pipeline a scenario runs on: its preset's random weights, or the bundled trained weights."""
    if s.weights not in WEIGHTS:
        raise ValueError(f"unknown scenario weights {s.weights!r}; use one of {WEIGHTS}")
    if s.weights == "bundled":
        pipe = Pipeline.from_pretrained(device=device, torch_mode=torch_mode)
        if (pipe.config.name, pipe.config.resolution) != (s.preset, s.resolution):
            raise ValueError(f"the bundled weights are {pipe.config.name} at {pipe.config.resolution} px, not "
                             f"{s.preset} at {s.resolution} px: fix the scenario")
        return pipe
    return Pipeline.from_preset(s.preset, device=device, resolution=s.resolution, torch_mode=torch_mode)


def environment(device: torch.device) -> dict:
    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            return f"unavailable: {e}"

    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "git_sha": os.environ.get("NUWAXL_GIT_SHA") or run(["git", "rev-parse", "--verify", "HEAD"]) or "unknown"}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda, gpus=world()[1],
                   driver=run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
    else:
        env.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return env


def flops_per_item(config, frames_per_call: int) -> dict[str, float]:
    """FLOPs of one batch row of each network (one call of L frames; one prompt), counted by torch on the meta
    device (no memory, the same count for every backend)."""
    from torch.utils.flop_counter import FlopCounterMode

    from nuwaxl.models.checkpoint import NuwaModels
    from nuwaxl.models.networks import networks

    specs = io_specs(config, "fp32", 1, frames_per_call)
    out = {}
    with torch.device("meta"):
        nets = networks(NuwaModels(config))
        for name, module in nets.items():
            feeds = [torch.zeros(t.concrete(1), dtype=torch.int64 if t.dtype == "int64" else torch.float32)
                     for t in specs[name].inputs]
            with FlopCounterMode(display=False) as counter, torch.inference_mode():
                module(*feeds)
            out[name] = float(counter.get_total_flops())
    return out


def request_for(pipe: Pipeline, s: Scenario):
    vae = {"vae_batch": s.vae_batch} if s.vae_batch else {}
    return pipe.prepare(story_for(s), s.num_frames, num_inference_steps=s.steps, sampler=s.sampler, mode=s.mode,
                        frames_per_call=s.frames_per_call, depth=s.depth, order=s.order, max_batch=s.max_batch, **vae)


def counted_flops(pipe: Pipeline, s: Scenario, per_item: dict[str, float]) -> float:
    """Total FLOPs of a run: UNet rows x steps (x2 with guidance), its per-call preparation per row, VAE encodes
    and decodes per call, prompts encoded once each (and the empty prompt)."""
    request = request_for(pipe, s)
    calls = len(request.plan.calls)
    rows = request.call_steps // request.options.num_inference_steps  # calls, x2 with guidance
    prompts = len(set(story_for(s)))
    return (per_item["unet_step"] * request.call_steps + per_item["unet_prepare"] * rows +
            (per_item["vae_encoder"] + per_item["vae_decoder"]) * calls + per_item["text_encoder"] * (prompts + 1))


def run_once(pipe: Pipeline, s: Scenario) -> dict:
    cuda = pipe.nets.spec.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(pipe.nets.spec.device)) if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    if world()[1] > 1:  # every rank starts together
        torch.distributed.barrier()
    t0 = time.perf_counter()
    first = first_segment = None
    count = 0
    for pos, _frame in pipe.run(request_for(pipe, s), progress=False):  # rank 0 gets the frames
        if first is None:
            first = time.perf_counter() - t0  # frames are uint8 on the host: the GPU work for them is done
        if pos == min(s.num_frames, s.frames_per_call) - 1:
            first_segment = time.perf_counter() - t0
        count += 1
    sync()
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    assert count == (s.num_frames if world()[0] == 0 else 0)
    return {"wall_s": wall, "first_frame_s": first, "first_segment_s": first_segment, "peak_mem_gib": peak}


def stage_profile(pipe: Pipeline, s: Scenario) -> dict[str, float]:
    """One extra run with a device sync at every stage boundary: seconds per stage and level."""
    timings: dict[str, float] = {}
    for _ in pipe.run(request_for(pipe, s), progress=False, timings=timings, profile=True):
        pass
    return {k: round(v, 4) for k, v in timings.items()}


def median_or_none(values) -> float | None:
    values = [v for v in values if v is not None]  # ranks other than 0 see no frames
    return statistics.median(values) if values else None


def run_scenario(pipe: Pipeline, s: Scenario, per_item: dict[str, float], peak_tflops: float | None) -> dict:
    # Warm-up (compilation, graph capture, allocator) on the same shapes: every AR window has one shape.
    run_once(pipe, replace(s, num_frames=min(s.num_frames, 2 * s.frames_per_call)) if s.mode == "ar" else s)
    runs = [run_once(pipe, s) for _ in range(s.repeats)]
    walls = sorted(r["wall_s"] for r in runs)
    wall = statistics.median(walls)
    flops = counted_flops(pipe, s, per_item) if per_item else None
    request = request_for(pipe, s)
    plan = request.plan
    return {"scenario": s.name, **asdict(s), "sampling": asdict(request.options), "calls": len(plan.calls),
            "calls_per_level": [len(level) for level in plan.levels],
            "wall_s_median": wall, "wall_s_min": walls[0], "wall_s_max": walls[-1], "repeats": s.repeats,
            "gpus": world()[1], "gpu_seconds": wall * world()[1] if pipe.nets.spec.device.type == "cuda" else None,
            "frames_per_s": s.num_frames / wall,
            "first_frame_s_median": median_or_none(r["first_frame_s"] for r in runs),
            "first_segment_s_median": median_or_none(r["first_segment_s"] for r in runs),
            "peak_mem_gib": max((r["peak_mem_gib"] or 0) for r in runs) or None,
            "flops_counted": flops, "achieved_tflops": flops / wall / 1e12 if flops else None,
            "utilization": flops / wall / (peak_tflops * 1e12 * world()[1]) if flops and peak_tflops else None,
            "stage_profile_s": stage_profile(pipe, s)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", choices=SETS, default="cpu-smoke")
    ap.add_argument("--backend", default="eager",
                    help="torch mode: eager, compile, cudagraph or compile-cudagraph")
    ap.add_argument("--engines", default=None,
                    help="an engine directory (trt-nuwaxl build): run the scenarios of its preset and resolution on it")
    ap.add_argument("--steps", type=int, default=None, help="override the scenarios' step count (default 50)")
    ap.add_argument("--repeats", type=int, default=None, help="override the scenarios' timed repeats")
    ap.add_argument("--only", default=None, help="comma list of scenario names to run")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    scenarios = SETS[args.set]
    if args.steps:
        scenarios = [replace(s, steps=args.steps) for s in scenarios]
    if args.repeats:
        scenarios = [replace(s, repeats=args.repeats) for s in scenarios]
    if args.only:
        scenarios = [s for s in scenarios if s.name in args.only.split(",")]
    device = torch.device(init_from_env("cuda" if torch.cuda.is_available() else "cpu"))  # torchrun: one GPU each
    rank = world()[0]
    env = environment(device)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in env.get("gpu", "")), None)
    pipes = {}
    if args.engines:  # one directory: its preset, resolution and L
        t0 = time.perf_counter()
        pipe = Pipeline.from_engines(args.engines, device=str(device))
        spec = pipe.nets.spec
        scenarios = [replace(s, frames_per_call=spec.frames_per_call) for s in scenarios
                     if pipeline_key(s) == engines_key(pipe)]
        pipes[engines_key(pipe)] = pipe
        backend = {"engines": args.engines, "backend": spec.backend, "cuda_graphs": spec.cuda_graphs,
                   "load_s": round(time.perf_counter() - t0, 2)}
    else:
        backend = f"torch-{args.backend}"
    weights = sorted({"random (seed 0)" if s.weights == "random" else f"{s.weights} (trained)" for s in scenarios})
    results = {"set": args.set, "backend": backend, "weights": ", ".join(weights), "env": env,
               "peak_tflops_assumed": peak, "scenarios": []}
    for s in scenarios:
        key = pipeline_key(s)
        if key not in pipes:
            pipes[key] = pipeline_for(s, str(device), args.backend)
        pipe = pipes[key]
        per_item = flops_per_item(pipe.config, s.frames_per_call)
        row = run_scenario(pipe, s, per_item, peak)
        results["scenarios"].append(row)
        if rank == 0:
            print(json.dumps({k: row[k] for k in ("scenario", "gpus", "wall_s_median", "first_frame_s_median",
                                                  "first_segment_s_median", "frames_per_s", "peak_mem_gib",
                                                  "utilization")}), flush=True)
            Path(args.out).write_text(json.dumps(results, indent=2))  # after every scenario: nothing lost


if __name__ == "__main__":
    main()
