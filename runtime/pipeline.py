"""The generation API, in the spirit of diffusers: `Pipeline.from_pretrained(path)(prompts, num_frames=...)`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from nuwaxl.config import ModelConfig
from nuwaxl.diffusion import NoiseSchedule
from nuwaxl.engine import torch_backend
from nuwaxl.engine.base import EngineNetworks
from nuwaxl.engine.directory import load_engines
from nuwaxl.errors import UserError
from nuwaxl.runtime.distributed import all_gather_rows, shard, world
from nuwaxl.runtime.executor import Executor, PromptBank, SamplingOptions
from nuwaxl.runtime.planner import Mode, Plan, call_prompts, frame_prompts, plan_ar, plan_dod
from nuwaxl.runtime.scheduler import Order, Scheduler, count_batches


@dataclass(frozen=True)
class Request:
    plan: Plan
    per_frame: list[str]  # one prompt per final frame
    options: SamplingOptions
    max_batch: int  # calls per batched model call
    order: Order = "level"  # "level": throughput; "depth": first frames first (low latency)


@dataclass
class VideoOutput:
    frames: np.ndarray  # (N, H, W, 3) uint8
    plan: Plan
    timings_s: dict[str, float] = field(default_factory=dict)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def plan(num_frames: int, frames_per_call: int, mode: Mode = "dod", depth: int | None = None, ar_context: int = 1,
         seed: int = 0) -> Plan:
    if mode == "dod":
        return plan_dod(num_frames, frames_per_call, depth, seed)
    if mode == "ar":
        return plan_ar(num_frames, frames_per_call, ar_context, seed)
    raise UserError(f"unknown mode {mode!r}; use 'dod' (diffusion over diffusion) or 'ar' (autoregressive)")


def prepare(config: ModelConfig, prompts: list[str] | str, num_frames: int, num_inference_steps: int = 25,
            seed: int = 0, mode: Mode = "dod", frames_per_call: int | None = None, depth: int | None = None,
            guidance_scale: float = 1.0, sampler: str = "ddim", eta: float = 0.0, ar_context: int = 1,
            max_batch: int | None = None, vae_batch: int = 4, order: Order = "level") -> Request:
    """Validate a request against a model config and plan its calls, before any model work."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise UserError("prompts must be strings")
    steps_max = config.diffusion.num_train_timesteps
    if not 1 <= num_inference_steps <= steps_max:
        raise UserError(f"num_inference_steps={num_inference_steps} must be between 1 and {steps_max}")
    if sampler not in ("ddim", "ddpm"):
        raise UserError(f"unknown sampler {sampler!r}; use 'ddim' or 'ddpm'")
    if guidance_scale < 1.0:
        raise UserError(f"guidance_scale={guidance_scale} must be >= 1 (1 disables guidance)")
    if max_batch is not None and max_batch < 1:
        raise UserError(f"max_batch={max_batch} must be at least 1 (or None for a whole level)")
    if vae_batch < 1:
        raise UserError(f"vae_batch={vae_batch} must be at least 1")
    if order not in ("level", "depth"):
        raise UserError(f"unknown order {order!r}; use 'level' (throughput) or 'depth' (first frames first)")
    per_frame = frame_prompts(prompts, num_frames)
    the_plan = plan(num_frames, frames_per_call or config.frames_per_call, mode, depth, ar_context, seed)
    cap = max_batch or max(len(level) for level in the_plan.levels)
    return Request(the_plan, per_frame, SamplingOptions(num_inference_steps, sampler, eta, guidance_scale, vae_batch),
                   cap, order)


class Pipeline:
    def __init__(self, nets: EngineNetworks):
        self.nets = nets
        self.schedule = NoiseSchedule.from_config(nets.spec.config.diffusion)

    @classmethod
    def from_pretrained(cls, path, device: str | None = None, precision: str | None = None,
                        resolution: int | None = None, mode: str = "eager") -> Pipeline:
        """Load a trt-nuwaxl .safetensors checkpoint (config and tokenizer are inside it) as live PyTorch modules;
        mode: eager, compile (torch.compile) or cudagraph (CUDA graphs per batch size)."""
        return cls(torch_backend.from_checkpoint(path, device=device, precision=precision, resolution=resolution,
                                                 mode=mode))

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, device: str | None = None, precision: str | None = None,
                    resolution: int | None = None, mode: str = "eager") -> Pipeline:
        """Random weights of a named preset (tiny, small, paper): for tests and speed measurements."""
        return cls(torch_backend.from_preset(name, seed=seed, device=device, precision=precision,
                                             resolution=resolution, mode=mode))

    @classmethod
    def from_engines(cls, directory, device: str | None = None, torch_mode: str = "aoti") -> Pipeline:
        """Engines built by `trt-nuwaxl build` (TensorRT, ONNX Runtime or AOTInductor)."""
        return cls(load_engines(directory, device=device, torch_mode=torch_mode))

    @property
    def config(self):
        return self.nets.spec.config

    def prepare(self, prompts: list[str] | str, num_frames: int, **kwargs) -> Request:
        fixed, asked = self.nets.spec.frames_per_call, kwargs.get("frames_per_call")
        if fixed is not None:  # built engines have L baked into their shapes
            if asked not in (None, fixed):
                raise UserError(f"these engines were built for L={fixed} frames per call, not {asked}; "
                                f"omit frames_per_call or rebuild with -L {asked}")
            kwargs["frames_per_call"] = fixed
        return prepare(self.config, prompts, num_frames, **kwargs)

    def iter_frames(self, prompts: list[str] | str, num_frames: int, progress: bool = True,
                    timings: dict | None = None, **kwargs) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (frame index, (H, W, 3) uint8) in temporal order, each as soon as it and all before it are final.

        Keyword arguments are those of `prepare`; they are checked before this returns.
        """
        return self.run(self.prepare(prompts, num_frames, **kwargs), progress, timings)

    def __call__(self, prompts: list[str] | str, num_frames: int, progress: bool = True, **kwargs) -> VideoOutput:
        request = self.prepare(prompts, num_frames, **kwargs)
        timings: dict[str, float] = {}
        out = None
        for pos, frame in self.run(request, progress, timings):
            if out is None:
                out = np.empty((num_frames, *frame.shape), dtype=np.uint8)
            out[pos] = frame
        return VideoOutput(out, request.plan, timings)

    def run(self, req: Request, progress: bool = True, timings: dict | None = None,
            profile: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """Execute a prepared request, yielding frames in temporal order as they become final."""
        timings = {} if timings is None else timings
        t0 = time.perf_counter()
        bank = PromptBank(self.nets, req.per_frame)
        timings["encode_prompts_s"] = time.perf_counter() - t0
        scheduler = Scheduler(req.plan, req.max_batch, req.order)
        executor = Executor(self.nets, self.schedule, req.options, profile=timings if profile else None)
        steps = req.options.num_inference_steps
        total = count_batches(req.plan, req.max_batch, req.order) * steps
        frames: dict[int, torch.Tensor] = {}  # position -> (3, H, W) pixels, kept while still needed
        bar = tqdm(total=total, desc="denoising", unit="step", disable=not progress or world()[0] != 0, leave=False)
        try:
            rank, size = world()
            while (batch := scheduler.next_batch()) is not None:
                bar.set_postfix(level=batch.level, calls=len(batch.calls))
                part = shard(len(batch.calls), rank, size)  # this rank's calls (all of them on one process)
                mine = batch.calls[part.start: part.stop]
                pixels = None
                if mine:  # a rank with no share of a small batch still joins the all-gather
                    context = bank.context([call_prompts(c, req.per_frame) for c in mine])
                    pixels = executor.run(mine, context, bank.empty, frames, on_step=lambda i: bar.update())
                elif size > 1:
                    bar.update(req.options.num_inference_steps)
                if size > 1:
                    res = self.config.resolution
                    local = pixels if pixels is not None else torch.empty(
                        0, len(batch.calls[0].positions), 3, res, res, device=self.nets.spec.device)
                    pixels = all_gather_rows(local, len(batch.calls))
                for b, call in enumerate(batch.calls):
                    for slot in call.gen_slots:
                        frames[call.positions[slot]] = pixels[b, slot]
                ready = scheduler.complete(batch)
                if rank == 0:  # one process emits (and writes) the video
                    for pos in ready:
                        yield pos, to_uint8(frames[pos])
                keep = scheduler.needed_later()
                for pos in [p for p in frames if p < scheduler.emitted and p not in keep]:
                    del frames[pos]
        finally:
            bar.close()
            timings["generate_s"] = time.perf_counter() - t0
