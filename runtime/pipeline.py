"""The generation API, in the spirit of diffusers: `Pipeline.from_pretrained(path)(prompts, num_frames=...)`."""

from __future__ import annotations

import math
import time
import unicodedata
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from nuwaxl.config import (
    LARGE_VIDEO_FRAMES,
    SAMPLERS,
    ModelConfig,
    SamplingDefaults,
    TrainingRecord,
    check_guidance_scale,
)
from nuwaxl.diffusion import NoiseSchedule
from nuwaxl.engine import torch_backend
from nuwaxl.engine.base import EngineNetworks
from nuwaxl.engine.directory import load_engines
from nuwaxl.errors import Cancelled, UserError, option
from nuwaxl.runtime.distributed import agree_any, all_gather_rows, shard, world
from nuwaxl.runtime.executor import Decoded, Executor, PromptBank, SamplingOptions, uint8_frames
from nuwaxl.runtime.planner import Mode, Plan, call_prompts, frame_prompts, plan_ar, plan_dod
from nuwaxl.runtime.scheduler import Batch, Order, Scheduler
from nuwaxl.tokenizer import PromptTokenizer, words
from nuwaxl.weights import WeightsSource


@dataclass(frozen=True)
class Request:
    plan: Plan
    per_frame: list[str]  # one prompt per final frame
    options: SamplingOptions
    max_batch: int  # calls per batched model call
    order: Order = "level"  # "level": throughput; "depth": first frames first (low latency)
    memory_budget_gib: float | None = None  # cap on CUDA allocations; over it, batches are halved and retried

    @property
    def call_steps(self) -> int:
        """The request's denoising work in single-call UNet evaluations (calls x steps, x2 with guidance)."""
        guided = 2 if self.options.guidance_scale != 1.0 else 1
        return len(self.plan.calls) * self.options.num_inference_steps * guided


class LargeRequest(UserError):
    """A request over LARGE_VIDEO_FRAMES without `allow_large`: what it would take, for the user to confirm."""

    def __init__(self, message: str, request: Request):
        super().__init__(message)
        self.request = request


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


def prepare(config: ModelConfig, prompts: list[str] | str, num_frames: int,
            num_inference_steps: int = SamplingDefaults.num_inference_steps,
            seed: int = 0, mode: Mode = "dod", frames_per_call: int | None = None, depth: int | None = None,
            guidance_scale: float = SamplingDefaults.guidance_scale, sampler: str = SamplingDefaults.sampler,
            eta: float = 0.0, ar_context: int = 1,
            max_batch: int | None = None, vae_batch: int = 4, order: Order = "level",
            memory_budget_gib: float | None = None, allow_large: bool = False,
            tokenizer: PromptTokenizer | None = None, trained_on: TrainingRecord | None = None) -> Request:
    """Validate a request against a model config and plan its calls, before any model work.

    With the weights' `tokenizer` and `trained_on` record, also warn (one line each) where the request leaves what
    the weights know: words they were not trained on, prompts longer than the text encoder reads, another
    resolution. Over LARGE_VIDEO_FRAMES frames it raises `LargeRequest` unless `allow_large`.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise UserError("prompts must be strings")
    _check_text(prompts)
    steps_max = config.diffusion.num_train_timesteps
    if not 1 <= num_inference_steps <= steps_max:
        raise UserError(f"{option('num_inference_steps', num_inference_steps)} must be between 1 and {steps_max}")
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    check_guidance_scale(guidance_scale)
    if not (isinstance(eta, (int, float)) and 0.0 <= eta < math.inf):
        raise UserError(f"{option('eta', eta)} must be a finite number >= 0")
    if max_batch is not None and max_batch < 1:
        raise UserError(f"{option('max_batch', max_batch)} must be at least 1 (or unset for a whole level)")
    if memory_budget_gib is not None and not 0 < memory_budget_gib < math.inf:
        raise UserError(f"{option('memory_budget_gib', memory_budget_gib)} must be a positive number of GiB")
    if vae_batch < 1:
        raise UserError(f"vae_batch={vae_batch} must be at least 1")
    if order not in ("level", "depth"):
        raise UserError(f"unknown order {order!r}; use 'level' (throughput) or 'depth' (first frames first)")
    per_frame = frame_prompts(prompts, num_frames)
    the_plan = plan(num_frames, frames_per_call or config.frames_per_call, mode, depth, ar_context, seed)
    cap = max_batch or max(len(level) for level in the_plan.levels)
    request = Request(the_plan, per_frame, SamplingOptions(num_inference_steps, sampler, eta, guidance_scale,
                                                           vae_batch), cap, order, memory_budget_gib)
    if num_frames > LARGE_VIDEO_FRAMES and not allow_large:
        gib = frame_buffer_bytes(request, config) / 2**30
        raise LargeRequest(
            f"{num_frames} frames is a large request: a depth-{the_plan.depth} plan of {len(the_plan.calls):,} "
            f"diffusion calls ({request.call_steps:,} single-call UNet steps) whose largest batch alone holds up to "
            f"{gib:.1f} GiB of frames; ask for at most {LARGE_VIDEO_FRAMES} frames, bound memory with "
            f"{option('max_batch', cli_value='N')}, or confirm with {option('allow_large', True, None)}", request)
    if tokenizer is not None:
        _warn_long_prompts(prompts, tokenizer)
    if trained_on is not None and trained_on.trained:
        _warn_outside_training(prompts, config, trained_on)
        if mode == "dod" and trained_on.ar_fraction == 1.0:
            warnings.warn("these weights were trained on consecutive short clips only (the FDM* baseline): diffusion "
                          "over diffusion asks them for keyframes and in-betweens they never saw; use "
                          f"{option('mode', 'ar')}", stacklevel=3)
    return request


def frame_buffer_bytes(request: Request, config: ModelConfig, bytes_per_value: int = 4) -> int:
    """Memory the largest batch's frames take while it is decoded and handed out: pixels on the device
    (`bytes_per_value` each: 4 for fp32, the most a precision takes) plus their uint8 copy on the host. The frames
    alone: the models' activations come on top."""
    L, res = request.plan.frames_per_call, config.resolution
    calls = max(min(len(level), request.max_batch) for level in request.plan.levels)
    return calls * L * 3 * res * res * (bytes_per_value + 1)


def _check_text(prompts: list[str]) -> None:
    """Refuse control characters (a NUL byte, say): they are never meant, and the tokenizer would keep them."""
    for i, p in enumerate(prompts, 1):
        bad = next((c for c in p if unicodedata.category(c) == "Cc" and c != "\t"), None)
        if bad is not None:
            raise UserError(f"prompt {i} contains the control character {bad!r}; remove it (prompts are plain text)")


def _warn_long_prompts(prompts: list[str], tokenizer: PromptTokenizer) -> None:
    lengths = {p: tokenizer.count(p) for p in set(prompts)}
    long = [p for p, n in lengths.items() if n > tokenizer.max_length]
    if long:
        worst = max(long, key=lengths.get)
        warnings.warn(f"{len(long)} prompt(s) are longer than the {tokenizer.max_length} tokens the text encoder "
                      f"reads (the longest: {lengths[worst]:,} tokens, {len(worst):,} characters); the rest of each "
                      "is ignored", stacklevel=3)


def _warn_outside_training(prompts: list[str], config: ModelConfig, training: TrainingRecord) -> None:
    if training.words:
        known = set(training.words)
        unknown = sorted({w for p in set(prompts) for w in words(p)} - known)
        if unknown:
            shown = ", ".join(repr(w) for w in unknown[:6]) + (f" and {len(unknown) - 6} more" if len(unknown) > 6
                                                               else "")
            warnings.warn(f"the prompts use words these weights were not trained on: {shown}; the video will not "
                          f"follow them (the weights know {len(known)} words, e.g. "
                          f"{', '.join(training.words[:8])})", stacklevel=3)
    if training.resolution is not None and config.resolution != training.resolution:
        warnings.warn(f"these weights were trained at {training.resolution} px; at {config.resolution} px expect "
                      f"worse videos (omit {option('resolution')} to use {training.resolution})", stacklevel=3)


class Pipeline:
    def __init__(self, nets: EngineNetworks):
        self.nets = nets
        self.schedule = NoiseSchedule.from_config(nets.spec.config.diffusion)

    @classmethod
    def from_source(cls, source, device: str | None = None, precision: str | None = None,
                    resolution: int | None = None, torch_mode: str | None = None) -> Pipeline:
        """Weights from a `nuwaxl.weights.WeightsSource`: engines run as built (AOTInductor packages by default,
        or live modules of the weights they were built from with another torch mode); a checkpoint or a preset as
        live PyTorch modules. device: auto (a GPU if present), cpu, cuda[:N]."""
        if source.kind == "engines":
            return cls(load_engines(source.name, device=device, torch_mode=torch_mode or "aoti",
                                    manifest=source.manifest))
        return cls(torch_backend.torch_networks(source.load(), device=device, precision=precision,
                                                resolution=resolution, torch_mode=torch_mode or "eager"))

    @classmethod
    def from_pretrained(cls, path=None, device: str | None = None, precision: str | None = None,
                        resolution: int | None = None, torch_mode: str = "eager") -> Pipeline:
        """Load a trt-nuwaxl .safetensors checkpoint (config and tokenizer are inside it) as live PyTorch modules;
        without a path, the bundled trained `small` weights. device: auto (a GPU if present), cpu, cuda[:N];
        torch_mode: eager, compile (torch.compile), cudagraph (CUDA graphs per batch size) or compile-cudagraph."""
        return cls.from_source(WeightsSource.resolve(checkpoint=path and str(path)), device=device,
                               precision=precision, resolution=resolution, torch_mode=torch_mode)

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, device: str | None = None, precision: str | None = None,
                    resolution: int | None = None, torch_mode: str = "eager") -> Pipeline:
        """Random weights of a named preset (tiny, small, paper): noise-like videos, for tests and speed runs."""
        return cls.from_source(WeightsSource.resolve(preset=name, seed=seed), device=device, precision=precision,
                               resolution=resolution, torch_mode=torch_mode)

    @classmethod
    def from_engines(cls, directory, device: str | None = None, torch_mode: str = "aoti") -> Pipeline:
        """Engines built by `trt-nuwaxl build` (TensorRT, ONNX Runtime or AOTInductor)."""
        return cls.from_source(WeightsSource.resolve(engines=str(directory)), device=device, torch_mode=torch_mode)

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
        recommended = self.nets.spec.sampling.to_dict()  # what the weights recommend (random weights: the defaults)
        for name, value in recommended.items():
            if kwargs.get(name) is None:
                kwargs[name] = value
        return prepare(self.config, prompts, num_frames, tokenizer=self.nets.tokenizer,
                       trained_on=self.nets.spec.trained_on, **kwargs)

    @torch.inference_mode()
    def seconds_per_call_step(self, request: Request) -> float:
        """One call's denoising step timed here (after one warm-up step), with guidance if the request uses it:
        multiplied by `request.call_steps` it bounds the denoising time (batching only makes GPUs faster)."""
        spec, L = self.nets.spec, request.plan.frames_per_call
        rows = 2 if request.options.guidance_scale != 1.0 else 1
        empty = self.nets.encode_prompts([""])
        context = empty.expand(rows, L, *empty.shape[1:]).contiguous()
        cond = torch.zeros(rows, L, *spec.latent_shape, device=spec.device, dtype=spec.dtype)
        mask = torch.zeros(rows, L, 1, *spec.latent_shape[1:], device=spec.device, dtype=spec.dtype)
        eps = self.nets.denoiser(context, cond, mask)
        t = torch.full((rows,), 500, device=spec.device, dtype=torch.int64)
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            eps(torch.randn_like(cond), t)
            if spec.device.type == "cuda":
                torch.cuda.synchronize(spec.device)
            times.append(time.perf_counter() - t0)
        return times[-1]

    def iter_frames(self, prompts: list[str] | str, num_frames: int, progress: bool = True,
                    timings: dict | None = None, cancel: Callable[[], bool] | None = None,
                    finished: dict[int, torch.Tensor] | None = None,
                    on_level: Callable[[int, dict[int, torch.Tensor]], None] | None = None,
                    **kwargs) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (frame index, (H, W, 3) uint8) in temporal order, each as soon as it and all before it are final.

        Keyword arguments are those of `prepare`; they are checked before this returns. `finished`, `on_level`: as
        `run`'s (resuming a generation from its last finished level).
        """
        return self.run(self.prepare(prompts, num_frames, **kwargs), progress, timings, cancel=cancel,
                        finished=finished, on_level=on_level)

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
            profile: bool = False, cancel: Callable[[], bool] | None = None,
            finished: dict[int, torch.Tensor] | None = None,
            on_level: Callable[[int, dict[int, torch.Tensor]], None] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Execute a prepared request, yielding frames in temporal order as they become final. `cancel`: asked
        after every denoising step; when it says True, the run stops there and raises `Cancelled`.

        Resuming: `on_level(level, frames)` is told each level (but the last) once all its calls are final, with
        the (3, H, W) pixels of the frames it made (on the device); `finished` gives such frames back (those of
        levels 1..k, as `on_level` gave them): those levels are not run again, and since the next levels are
        conditioned on the very same pixels and every call draws its noise from its own seed, the video is the
        one an uninterrupted run makes.

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
            # Work is calls x steps: a level of 69 calls weighs 69 lone calls, so the bar's estimate holds.
            bar = tqdm(total=len(req.plan.calls) * steps, desc="denoising", unit="call-step",
                       disable=not progress or world()[0] != 0, leave=False)
            frames: dict[int, torch.Tensor] = {}  # position -> (3, H, W) pixels on the device, while needed
            producers: dict[int, Decoded] = {}  # position -> the batch that made it (its events, host copy)
            slots: dict[int, tuple[Decoded, int, int]] = {}  # position -> (batch, row, slot), until emitted
            emittable: list[int] = []  # final on the GPU, next to hand out, in temporal order
            rank, size = world()
            for level in self._resume(scheduler, finished or {}):
                for b, call in enumerate(level.calls):
                    for slot in call.gen_slots:
                        pos = call.positions[slot]
                        frames[pos], producers[pos], slots[pos] = level.pixels[b, slot], level, (level, b, slot)
                emittable += scheduler.complete(Batch(level.calls[0].level, level.calls))
                bar.update(len(level.calls) * steps)
            made: dict[int, dict[int, torch.Tensor]] = {}  # level -> its frames so far (for on_level)
            try:
                while (batch := scheduler.next_batch()) is not None:
                    bar.set_postfix(level=batch.level, calls=len(batch.calls))
                    progress_before = bar.n
                    try:  # between denoising steps, hand out frames of earlier batches as their decode ends
                        done = yield from self._drive(self._submit(executor, bank, req, batch, frames, producers,
                                                                   bar), emittable, slots, rank, cancel)
                    except torch.cuda.OutOfMemoryError as e:
                        failed = e
                    else:
                        failed = None
                    if agree_any(failed is not None):  # every rank retries together
                        bar.n = progress_before  # the batch's steps are done again
                        self._shrink(scheduler, batch, failed)
                        continue
                    for b, call in enumerate(batch.calls):
                        for slot in call.gen_slots:
                            pos = call.positions[slot]
                            frames[pos], producers[pos], slots[pos] = done.pixels[b, slot], done, (done, b, slot)
                    emittable += scheduler.complete(batch)
                    if on_level is not None:
                        self._report_levels(req.plan, scheduler, done, made, on_level)
                    keep = scheduler.needed_later()
                    for pos in [p for p in frames if p < scheduler.emitted and p not in keep]:
                        del frames[pos], producers[pos]
                if rank == 0:
                    yield from self._emit(emittable, slots, wait=True)
            finally:
                bar.close()
                timings["generate_s"] = time.perf_counter() - t0

    def _resume(self, scheduler: Scheduler, finished: dict[int, torch.Tensor]) -> list[Decoded]:
        """The levels whose every frame is in `finished`, lowest first and only while unbroken, taken out of the
        scheduler's work; each as one `Decoded` batch of its calls (condition slots left zero: never read)."""
        spec, out = self.nets.spec, []
        for calls in scheduler.plan.levels[:-1]:
            if not all(c.positions[i] in finished for c in calls for i in c.gen_slots):
                break
            pixels = torch.zeros(len(calls), len(calls[0].positions), *next(iter(finished.values())).shape,
                                 device=spec.device, dtype=spec.dtype)
            for b, c in enumerate(calls):
                for i in c.gen_slots:
                    pixels[b, i] = finished[c.positions[i]].to(spec.device, spec.dtype)
            scheduler.skip(calls)
            out.append(Decoded(calls, pixels, None, torch.tensor(True), spec.dtype, uint8_frames(pixels).cpu()))
        return out

    @staticmethod
    def _report_levels(plan, scheduler: Scheduler, done: Decoded, made: dict, on_level) -> None:
        """Collect a finished batch's frames by level; tell `on_level` of each level (but the last) now final."""
        for b, call in enumerate(done.calls):
            if call.level < plan.depth:  # the last level is never resumed: not kept
                made.setdefault(call.level, {}).update({call.positions[i]: done.pixels[b, i] for i in call.gen_slots})
        for level in sorted(made):
            if level < plan.depth and scheduler.level_done(level):
                if done.ready is not None:  # decodes run in order on one stream: this batch's event covers the level's
                    done.ready.synchronize()
                on_level(level, made.pop(level))

    def _drive(self, steps, emittable: list[int], slots: dict, rank: int, cancel: Callable[[], bool] | None):
        """Advance a batch's `submit` generator; after each step, yield the frames that are now on the host."""
        while True:
            try:
                next(steps)
            except StopIteration as finished:
                return finished.value
            if cancel is not None and cancel():
                raise Cancelled("cancelled by the caller")
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
            bar.update(req.options.num_inference_steps * len(batch.calls))
            res = self.config.resolution
            empty = torch.empty(0, len(batch.calls[0].positions), 3, res, res, device=self.nets.spec.device,
                                dtype=self.nets.spec.dtype)
            return executor.finish(batch.calls, empty, gather)
        context = bank.context([call_prompts(c, req.per_frame) for c in mine])
        return (yield from executor.submit(mine, context, bank.empty, frames, producers,
                                           on_step=lambda i: bar.update(len(batch.calls)), gather=gather,
                                           all_calls=batch.calls))

    def _shrink(self, scheduler: Scheduler, batch, error: Exception | None) -> None:
        n = len(batch.calls)
        if n == 1:
            raise UserError(f"out of GPU memory with a single call per batch; lower {option('resolution')}, use fewer "
                            f"frames per call ({option('frames_per_call')}), or raise "
                            f"{option('memory_budget_gib')}") from error
        scheduler.requeue(batch, max_batch=n // 2)
        if self.nets.spec.device.type == "cuda":
            # Work already queued (earlier batches' decodes) may still use graph memory pools: let it finish
            # before the pools are freed and reused.
            torch.cuda.synchronize(self.nets.spec.device)
        self.nets.release()  # captured graphs hold memory pools sized for the failed batch
        torch.cuda.empty_cache()
        warnings.warn(f"out of GPU memory running {n} calls of level {batch.level} in one batch; retrying with at "
                      f"most {n // 2} calls per batch (set {option('max_batch', n // 2)} to start there)",
                      stacklevel=3)

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
        raise UserError(f"{option('memory_budget_gib', gib)} is outside (0, {total / 2**30:.1f}] GiB of this GPU")
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
