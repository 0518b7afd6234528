"""Runs one scheduled batch of diffusion calls on an engine: conditions -> batched sampling -> decode.

All calls of a batch share the timestep sequence, so each denoising step is one batched model call
(doubled along batch for classifier-free guidance). Each call draws its noise from its own generator seeded by
`Call.seed`, which makes the video independent of batch composition and of the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nuwaxl.diffusion import NoiseSchedule, SamplerName, needs_noise, sample
from nuwaxl.engine.base import EngineNetworks
from nuwaxl.runtime.planner import Call


@dataclass(frozen=True)
class SamplingOptions:
    num_inference_steps: int = 25
    sampler: SamplerName = "ddim"
    eta: float = 0.0
    guidance_scale: float = 1.0  # 1 = no classifier-free guidance
    vae_batch: int = 4  # calls per T-KLVAE encode/decode chunk (bounds memory, FACTS: decode OOM)


class PromptBank:
    """Encodes each distinct prompt once; gathers (B, L, l_p, d_p) contexts for batches of calls."""

    def __init__(self, nets: EngineNetworks, prompts: list[str]):
        self.index = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        self.embeddings = nets.encode_prompts(list(self.index))  # (P, l_p, d_p)
        self.empty = nets.encode_prompts([""])  # unconditional context for guidance

    def context(self, prompts_per_call: list[list[str]]) -> torch.Tensor:
        idx = torch.tensor([[self.index[p] for p in ps] for ps in prompts_per_call],
                           device=self.embeddings.device)
        return self.embeddings[idx]  # (B, L, l_p, d_p)


class Executor:
    def __init__(self, nets: EngineNetworks, schedule: NoiseSchedule, options: SamplingOptions,
                 profile: dict[str, float] | None = None):
        self.nets = nets
        self.schedule = schedule
        self.options = options
        self.profile = profile  # if given: seconds per stage and level, with a device sync at each boundary

    def _mark(self, stage: str, level: int, since: float) -> float:
        if self.profile is None:
            return since
        if self.nets.spec.device.type == "cuda":
            torch.cuda.synchronize(self.nets.spec.device)
        now = time.perf_counter()
        key = f"level{level}_{stage}_s"
        self.profile[key] = self.profile.get(key, 0.0) + now - since
        return now

    def _chunked(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        n = self.options.vae_batch
        return torch.cat([fn(x[i: i + n]) for i in range(0, x.shape[0], n)])

    def conditions(self, calls: tuple[Call, ...], frames: dict[int, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """x0^c = T-KLVAE(v0^c) with non-condition frames zeroed, and the binary mask x0^m (paper sec. 3.2)."""
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
        """Sample and decode a batch of calls: returns (B, L, 3, H, W) float32 pixels in [-1, 1]."""
        spec, opt = self.nets.spec, self.options
        B, L = len(calls), len(calls[0].positions)
        level, t = calls[0].level, time.perf_counter()
        cond, mask = self.conditions(calls, frames)
        t = self._mark("encode_conditions", level, t)
        # CPU generators: the same seed gives the same noise on every device (as diffusers does).
        gens = [torch.Generator().manual_seed(c.seed) for c in calls]

        def draw() -> torch.Tensor:  # fp32 noise, the same numbers whatever the model dtype
            noise = torch.stack([torch.randn((L, *spec.latent_shape), generator=g) for g in gens])
            return noise.to(spec.device, non_blocking=True)

        guided = opt.guidance_scale != 1.0
        if guided:  # one batched call for the unconditional and conditional branches
            context = torch.cat([uncond.expand(B, L, *uncond.shape[1:]), context])
            cond, mask = torch.cat([cond, cond]), torch.cat([mask, mask])

        def denoise(x: torch.Tensor, t: int) -> torch.Tensor:
            xin = torch.cat([x, x]) if guided else x
            tt = torch.full((xin.shape[0],), t, device=spec.device, dtype=torch.int64)
            eps = self.nets.denoise(xin.to(spec.dtype), tt, context, cond, mask).float()
            if guided:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + opt.guidance_scale * (eps_c - eps_u)
            return eps

        x_T = draw()
        noise = (lambda i: draw()) if needs_noise(opt.sampler, opt.eta) else None
        x0 = sample(denoise, x_T, self.schedule, opt.num_inference_steps, opt.sampler, noise, opt.eta, on_step)
        t = self._mark("sample", level, t)
        if not torch.isfinite(x0).all():  # one sync per batch; fp16 overflow shows up as NaN -> black frames
            raise FloatingPointError(
                f"non-finite latents in level {calls[0].level} (calls {[c.index for c in calls][:8]}) at "
                f"{str(spec.dtype).removeprefix('torch.')}; rerun with --precision fp32 (or bf16) to avoid overflow")
        pixels = self._chunked(self.nets.decode_latents, x0.to(spec.dtype)).float().clamp(-1.0, 1.0)
        self._mark("decode", level, t)
        return pixels
