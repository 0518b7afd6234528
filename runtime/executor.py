"""Runs one scheduled batch of diffusion calls on an engine: conditions -> batched sampling -> decode.

All calls of a batch share the timestep sequence, so each denoising step is one batched model call
(doubled along batch for classifier-free guidance). Each call draws its noise from its own generator seeded by
`Call.seed`, which makes the video independent of batch composition and of the device.

On CUDA, `submit` enqueues work step by step (a generator: the caller hands out ready frames between steps) and
keeps the host at most `HOST_AHEAD` steps ahead of the GPU, so the launch queue never fills and blocks it.
Conditions and sampling run on a compute stream; the T-KLVAE decode (in chunks) and the copy of uint8 frames to
pinned host memory on a second, higher-priority stream, ordered by events: the next batch's denoising overlaps this
one's decode, and the host waits for a batch only when it hands out its frames (`Decoded.host_frames`). Latents and
frames stay on the GPU between levels.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Generator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from nuwaxl.diffusion import NoiseSchedule, SamplerName, needs_noise, run_to_end, sample_steps
from nuwaxl.engine.base import EngineNetworks
from nuwaxl.errors import option
from nuwaxl.runtime.planner import Call


@dataclass(frozen=True)
class SamplingOptions:
    num_inference_steps: int = 25
    sampler: SamplerName = "ddim"
    eta: float = 0.0
    guidance_scale: float = 1.0  # 1 = no classifier-free guidance
    vae_batch: int = 4  # calls per T-KLVAE encode/decode chunk: decoding a whole level at once can run out of memory


class PromptBank:
    """Encodes each distinct prompt once; gathers (B, L, l_p, d_p) contexts for batches of calls."""

    def __init__(self, nets: EngineNetworks, prompts: list[str]):
        self.index = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        self.embeddings = nets.encode_prompts(list(self.index))  # (P, l_p, d_p)
        self.empty = nets.encode_prompts([""])  # unconditional context for guidance

    def context(self, prompts_per_call: list[list[str]]) -> torch.Tensor:
        idx = torch.tensor([[self.index[p] for p in ps] for ps in prompts_per_call])
        return self.embeddings[to_device(idx, self.embeddings.device)]  # (B, L, l_p, d_p)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without a host sync: a copy from pageable memory waits for the stream to drain."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class Lanes:
    """The runtime's two CUDA streams: `compute` (condition encoding, sampling) and `vae` (decoding, copies to
    the host), ordered by events. On the CPU everything runs in order and these are no-ops."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.compute = torch.cuda.Stream(device) if self.cuda else None
        # Decodes are short and gate frames handed to the user: their kernels go ahead of the denoising ones.
        self.vae = torch.cuda.Stream(device, priority=-1) if self.cuda else None

    def on(self, stream):
        return torch.cuda.stream(stream) if self.cuda else nullcontext()

    def record(self, stream) -> torch.cuda.Event | None:
        return stream.record_event() if self.cuda else None

    def wait(self, stream, event: torch.cuda.Event | None, *tensors: torch.Tensor) -> None:
        """`stream` waits for `event`; `tensors` made on another stream are kept alive until `stream` is done."""
        if self.cuda and event is not None:
            stream.wait_event(event)
            for t in tensors:
                t.record_stream(stream)


@dataclass
class Decoded:
    """One batch's frames: (B, L, 3, H, W) pixels in [-1, 1] on the device, final once `ready` has fired."""

    calls: tuple[Call, ...]
    pixels: torch.Tensor
    ready: torch.cuda.Event | None
    finite: torch.Tensor  # 0-d bool on the device: checked when frames reach the host, not per batch
    dtype: torch.dtype
    _host: torch.Tensor | None = field(default=None, repr=False)  # (B, L, H, W, 3) uint8, pinned

    def host_frames(self) -> torch.Tensor:
        """(B, L, H, W, 3) uint8 on the host; waits for this batch's decode only."""
        if self.ready is not None:
            self.ready.synchronize()
        if not bool(self.finite):  # fp16 overflow shows up as NaN -> black frames
            where = (f"non-finite output in level {self.calls[0].level} (calls {[c.index for c in self.calls][:8]}) "
                     f"at {str(self.dtype).removeprefix('torch.')}")
            if self.dtype == torch.float32:  # more precision cannot help: the weights themselves misbehave
                raise FloatingPointError(f"{where}: the model gives NaN or infinity even in full precision, so the "
                                         "weights are damaged or diverged in training; use other weights")
            raise FloatingPointError(f"{where}: half precision overflowed; rerun with {option('precision', 'fp32')}")
        if self._host is None:  # CPU device
            self._host = uint8_frames(self.pixels)
        return self._host


HOST_AHEAD = 2  # denoising steps the host may enqueue ahead of the GPU


def uint8_frames(pixels: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) in [-1, 1] -> (..., H, W, 3) uint8, on the pixels' device."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1)


class Executor:
    def __init__(self, nets: EngineNetworks, schedule: NoiseSchedule, options: SamplingOptions,
                 profile: dict[str, float] | None = None):
        self.nets = nets
        self.schedule = schedule
        self.options = options
        self.profile = profile  # if given: seconds per stage and level, with a device sync at each boundary
        self.lanes = Lanes(nets.spec.device)
        self._since = time.perf_counter()

    def _mark(self, stage: str, level: int) -> None:
        """Profile mode: seconds since the previous mark, synchronizing the device first."""
        if self.profile is None:
            return
        if self.lanes.cuda:
            torch.cuda.synchronize(self.nets.spec.device)
        now = time.perf_counter()
        key = f"level{level}_{stage}_s"
        self.profile[key] = self.profile.get(key, 0.0) + now - self._since
        self._since = now

    def _chunked(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        n = self.options.vae_batch
        return torch.cat([fn(x[i: i + n]) for i in range(0, x.shape[0], n)])

    def conditions(self, calls: tuple[Call, ...], frames: dict[int, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """x0^c = T-KLVAE(v0^c) with non-condition frames zeroed, and the binary mask x0^m (paper sec. 3.2).
        `frames`: position -> (3, H, W) pixels of final frames (views into the `Decoded.pixels` of earlier
        batches, whose decode the compute stream has been made to wait for)."""
        spec = self.nets.spec
        L, res = len(calls[0].positions), spec.config.resolution
        c, h, w = spec.latent_shape
        video = torch.zeros(len(calls), L, 3, res, res, device=spec.device, dtype=spec.dtype)
        mask = torch.zeros(len(calls), L, 1, h, w, device=spec.device, dtype=spec.dtype)
        for b, call in enumerate(calls):
            for slot, pos in zip(call.cond_slots, call.cond_positions, strict=True):
                video[b, slot] = frames[pos]
                mask[b, slot] = 1.0
        return self._chunked(self.nets.encode_frames, video), mask

    def run(self, calls: tuple[Call, ...], context: torch.Tensor, uncond: torch.Tensor,
            frames: dict[int, torch.Tensor], on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        """Sample and decode a batch of calls and wait: (B, L, 3, H, W) float32 pixels in [-1, 1]."""
        done = run_to_end(self.submit(calls, context, uncond, frames, {}, on_step))
        done.host_frames()  # waits, and raises on non-finite latents
        if self.lanes.cuda:  # made on the decode stream, read on the caller's
            done.pixels.record_stream(torch.cuda.current_stream())
        return done.pixels.float()

    def submit(self, calls: tuple[Call, ...], context: torch.Tensor, uncond: torch.Tensor,
               frames: dict[int, torch.Tensor], producers: dict[int, Decoded],
               on_step: Callable[[int], None] | None = None,
               gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
               all_calls: tuple[Call, ...] | None = None) -> Generator[int, None, Decoded]:
        """Enqueue sampling and decoding of a batch of calls; yields after each denoising step, returns the
        `Decoded` batch. `producers`: position -> the batch that made it (its decode event orders this batch's
        condition encoding after it). Data parallel: `calls` is this rank's shard of `all_calls` and `gather`
        all-gathers the decoded rows (on the decode stream)."""
        spec, lanes = self.nets.spec, self.lanes
        L = len(calls[0].positions)
        level, self._since = calls[0].level, time.perf_counter()
        # CPU generators: the same seed gives the same noise on every device (as diffusers does).
        gens = [torch.Generator().manual_seed(c.seed) for c in calls]

        def draw() -> torch.Tensor:  # fp32 noise, the same numbers whatever the model dtype
            noise = torch.stack([torch.randn((L, *spec.latent_shape), generator=g) for g in gens])
            return to_device(noise, spec.device)

        if lanes.cuda:  # inputs the caller made on its own stream (prompt contexts) come first, and stay
            lanes.compute.wait_stream(torch.cuda.current_stream())  # allocated until the compute stream is done
            for t in (context, uncond):  # with them: the host can be a whole batch ahead when steps are few
                t.record_stream(lanes.compute)
        with lanes.on(lanes.compute):
            needed = {id(producers[p]): producers[p] for c in calls for p in c.cond_positions if p in producers}
            for dec in needed.values():
                lanes.wait(lanes.compute, dec.ready, dec.pixels)
            denoise, x_T, noise, eps_fn = self._setup(calls, context, uncond, frames, draw)
        opt = self.options
        steps = sample_steps(denoise, x_T, self.schedule, opt.num_inference_steps, opt.sampler, noise, opt.eta,
                             on_step)
        issued: deque[torch.cuda.Event] = deque()
        try:
            while True:  # no stream context is held across a yield: the caller's code runs on its own stream
                with lanes.on(lanes.compute):
                    try:
                        i = next(steps)
                    except StopIteration as finished:
                        x0 = finished.value
                        sampled = lanes.record(lanes.compute)
                        break
                    if lanes.cuda:  # stay at most HOST_AHEAD steps ahead of the GPU
                        issued.append(lanes.record(lanes.compute))
                        if len(issued) > HOST_AHEAD:
                            issued.popleft().synchronize()
                yield i
        finally:  # also when the caller stops early (cancel, error): a shared denoiser stops waiting for it
            close = getattr(eps_fn, "close", None)  # runtime.batching's denoisers merge steps across jobs
            if close is not None:
                close()
        self._mark("sample", level)
        with lanes.on(lanes.vae):
            lanes.wait(lanes.vae, sampled, x0)
            pixels = self._chunked(self.nets.decode_latents, x0.to(spec.dtype)).clamp(-1.0, 1.0)
        return self.finish(all_calls or calls, pixels, gather)

    def finish(self, calls: tuple[Call, ...], pixels: torch.Tensor,
               gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Decoded:
        """On the decode stream: gather rows across ranks, check for NaN, copy uint8 frames to pinned memory."""
        lanes, spec = self.lanes, self.nets.spec
        with lanes.on(lanes.vae):
            if gather is not None:
                pixels = gather(pixels)
            finite = torch.isfinite(pixels).all()  # NaN latents decode to NaN pixels (clamp keeps NaN)
            host = None
            if lanes.cuda:
                host = torch.empty((*pixels.shape[:2], *pixels.shape[-2:], 3), dtype=torch.uint8, pin_memory=True)
                host.copy_(uint8_frames(pixels), non_blocking=True)
            ready = lanes.record(lanes.vae)
        self._mark("decode", calls[0].level)
        return Decoded(calls, pixels, ready, finite, spec.dtype, host)

    def _setup(self, calls, context, uncond, frames, draw):
        """Conditions, the bound denoiser (guidance batched), x_T and the noise source of a batch."""
        spec, opt = self.nets.spec, self.options
        B, L = len(calls), len(calls[0].positions)
        cond, mask = self.conditions(calls, frames)
        self._mark("encode_conditions", calls[0].level)

        guided = opt.guidance_scale != 1.0
        if guided:  # one batched call for the unconditional and conditional branches
            context = torch.cat([uncond.expand(B, L, *uncond.shape[1:]), context])
            cond, mask = torch.cat([cond, cond]), torch.cat([mask, mask])

        eps_fn = self.nets.denoiser(context, cond, mask)  # prompts and conditions are fixed from here on

        def denoise(x: torch.Tensor, t: int) -> torch.Tensor:
            xin = torch.cat([x, x]) if guided else x
            tt = torch.full((xin.shape[0],), t, device=spec.device, dtype=torch.int64)
            eps = eps_fn(xin.to(spec.dtype), tt).float()
            if guided:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + opt.guidance_scale * (eps_c - eps_u)
            return eps

        noise = (lambda i: draw()) if needs_noise(opt.sampler, opt.eta) else None
        return denoise, draw(), noise, eps_fn
