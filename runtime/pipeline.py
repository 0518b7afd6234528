"""The generation API, in the spirit of diffusers: `Pipeline.from_pretrained(path)(prompts, num_frames=...)`."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
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
from nuwaxl.runtime.distributed import agree_any, all_gather_rows, shard, world
from nuwaxl.runtime.executor import Decoded, Executor, PromptBank, SamplingOptions, uint8_frames
from nuwaxl.runtime.planner import Mode, Plan, call_prompts, frame_prompts, plan_ar, plan_dod
from nuwaxl.runtime.scheduler import Order, Scheduler, count_batches


@dataclass(frozen=True)
class Request:
    plan: Plan
    per_frame: list[str]  # one prompt per final frame
    options: SamplingOptions
    max_batch: int  # calls per batched model call
    order: Order = "level"  # "level": throughput; "depth": first frames first (low latency)
    memory_budget_gib: float | None = None  # cap on CUDA allocations; over it, batches are halved and retried


@dataclass
class VideoOutput:
    frames: np.ndarray  # (N, H, W, 3) uint8
    plan: Plan
    timings_s: dict[str, float] = field(default_factory=dict)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8 on the host."""
    return uint8_frames(pixels).cpu().numpy()


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
            max_batch: int | None = None, vae_batch: int = 4, order: Order = "level",
            memory_budget_gib: float | None = None) -> Request:
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
    if memory_budget_gib is not None and not memory_budget_gib > 0:
        raise UserError(f"memory_budget_gib={memory_budget_gib} must be a positive number of GiB")
    if vae_batch < 1:
        raise UserError(f"vae_batch={vae_batch} must be at least 1")
    if order not in ("level", "depth"):
        raise UserError(f"unknown order {order!r}; use 'level' (throughput) or 'depth' (first frames first)")
    per_frame = frame_prompts(prompts, num_frames)
    the_plan = plan(num_frames, frames_per_call or config.frames_per_call, mode, depth, ar_context, seed)
    cap = max_batch or max(len(level) for level in the_plan.levels)
    return Request(the_plan, per_frame, SamplingOptions(num_inference_steps, sampler, eta, guidance_scale, vae_batch),
                   cap, order, memory_budget_gib)


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
        if kwargs.get("guidance_scale") is None:  # the weights' recommendation (1 = off for random weights)
            kwargs["guidance_scale"] = self.nets.spec.sampling.guidance_scale
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
        """Execute a prepared request, yielding frames in temporal order as they become final.

        Batches are enqueued step by step (the host stays at most two steps ahead of the GPU); a batch's frames
        are handed out between the next batch's steps as soon as their decode has finished, so decoding overlaps
        denoising. On out-of-memory the failed batch is put back and the scheduler retries with half as many
        calls per batch (frames already made are kept).
        """
        timings = {} if timings is None else timings
        t0 = time.perf_counter()
        device = self.nets.spec.device
        with memory_budget(req.memory_budget_gib, device):
            bank = PromptBank(self.nets, req.per_frame)
            timings["encode_prompts_s"] = time.perf_counter() - t0
            scheduler = Scheduler(req.plan, req.max_batch, req.order)
            executor = Executor(self.nets, self.schedule, req.options, profile=timings if profile else None)
            steps = req.options.num_inference_steps
            bar = tqdm(total=count_batches(req.plan, req.max_batch, req.order) * steps, desc="denoising",
                       unit="step", disable=not progress or world()[0] != 0, leave=False)
            frames: dict[int, torch.Tensor] = {}  # position -> (3, H, W) pixels on the device, while needed
            producers: dict[int, Decoded] = {}  # position -> the batch that made it (its events, host copy)
            slots: dict[int, tuple[Decoded, int, int]] = {}  # position -> (batch, row, slot), until emitted
            emittable: list[int] = []  # final on the GPU, next to hand out, in temporal order
            rank, size = world()
            try:
                while (batch := scheduler.next_batch()) is not None:
                    bar.set_postfix(level=batch.level, calls=len(batch.calls))
                    try:  # between denoising steps, hand out frames of earlier batches as their decode ends
                        done = yield from self._drive(self._submit(executor, bank, req, batch, frames, producers,
                                                                   bar), emittable, slots, rank)
                    except torch.cuda.OutOfMemoryError as e:
                        failed = e
                    else:
                        failed = None
                    if agree_any(failed is not None):  # every rank retries together
                        self._shrink(scheduler, batch, failed, bar, steps)
                        continue
                    for b, call in enumerate(batch.calls):
                        for slot in call.gen_slots:
                            pos = call.positions[slot]
                            frames[pos], producers[pos], slots[pos] = done.pixels[b, slot], done, (done, b, slot)
                    emittable += scheduler.complete(batch)
                    keep = scheduler.needed_later()
                    for pos in [p for p in frames if p < scheduler.emitted and p not in keep]:
                        del frames[pos], producers[pos]
                if rank == 0:
                    yield from self._emit(emittable, slots, wait=True)
            finally:
                bar.close()
                timings["generate_s"] = time.perf_counter() - t0

    def _drive(self, steps, emittable: list[int], slots: dict, rank: int):
        """Advance a batch's `submit` generator; after each step, yield the frames that are now on the host."""
        while True:
            try:
                next(steps)
            except StopIteration as finished:
                return finished.value
            if rank == 0:
                yield from self._emit(emittable, slots, wait=False)

    def _submit(self, executor: Executor, bank: PromptBank, req: Request, batch, frames, producers, bar):
        """Enqueue one batch (a generator over its steps, returning the `Decoded` batch): this rank's shard of its
        calls, then (data parallel) an all-gather of the rows."""
        rank, size = world()
        part = shard(len(batch.calls), rank, size)
        mine = batch.calls[part.start: part.stop]
        gather = (lambda rows: all_gather_rows(rows, len(batch.calls))) if size > 1 else None
        if not mine:  # a rank with no share of a small batch still joins the all-gather
            bar.update(req.options.num_inference_steps)
            res = self.config.resolution
            empty = torch.empty(0, len(batch.calls[0].positions), 3, res, res, device=self.nets.spec.device,
                                dtype=self.nets.spec.dtype)
            return executor.finish(batch.calls, empty, gather)
        context = bank.context([call_prompts(c, req.per_frame) for c in mine])
        return (yield from executor.submit(mine, context, bank.empty, frames, producers,
                                           on_step=lambda i: bar.update(), gather=gather, all_calls=batch.calls))

    def _shrink(self, scheduler: Scheduler, batch, error: Exception | None, bar, steps: int) -> None:
        n = len(batch.calls)
        if n == 1:
            raise UserError("out of GPU memory with a single call per batch; lower --resolution, use fewer frames "
                            "per call, or raise --memory-budget") from error
        scheduler.requeue(batch, max_batch=n // 2)
        if self.nets.spec.device.type == "cuda":
            # Work already queued (earlier batches' decodes) may still use graph memory pools: let it finish
            # before the pools are freed and reused.
            torch.cuda.synchronize(self.nets.spec.device)
        self.nets.release()  # captured graphs hold memory pools sized for the failed batch
        torch.cuda.empty_cache()
        bar.total = bar.n + scheduler.remaining_batches() * steps
        warnings.warn(f"out of GPU memory running {n} calls of level {batch.level} in one batch; retrying with at "
                      f"most {n // 2} calls per batch (set max_batch / --max-batch to start there)", stacklevel=3)

    @staticmethod
    def _emit(emittable: list[int], slots: dict, wait: bool) -> Iterator[tuple[int, np.ndarray]]:
        """Hand out frames in temporal order: all of them (wait=True), or those already on the host."""
        while emittable:
            done, b, slot = slots[emittable[0]]
            if not wait and done.ready is not None and not done.ready.query():
                return
            pos = emittable.pop(0)
            del slots[pos]
            yield pos, done.host_frames()[b, slot].numpy()


@contextmanager
def memory_budget(gib: float | None, device: torch.device):
    """Cap this process's CUDA allocations at `gib` GiB (the allocator raises out-of-memory beyond it, and the
    pipeline then retries with smaller batches). No-op on the CPU or without a budget."""
    if gib is None or device.type != "cuda":
        yield
        return
    index = device.index if device.index is not None else torch.cuda.current_device()  # the API needs an index
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = gib * 2**30 / total
    if not 0 < fraction <= 1:
        raise UserError(f"memory budget {gib} GiB is outside (0, {total / 2**30:.1f}] GiB of this GPU")
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
