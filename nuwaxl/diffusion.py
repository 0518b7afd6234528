"""DDPM forward process (Eq. 3-4) and batched reverse-step functions (DDPM ancestral, Eq. 16; DDIM).

Samplers see only a denoiser `eps = denoise(x_t, t)` and a noise source; schedules are plain numbers.
Each step is a pure function of (x_t, eps, t, s, noise), so many independent diffusion calls step together in
one batch: their only per-call state is their rows of x and their own noise generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from nuwaxl.config import DiffusionConfig

SamplerName = Literal["ddim", "ddpm"]


@dataclass(frozen=True)
class NoiseSchedule:
    alphas_cumprod: tuple[float, ...]  # alpha-bar_t for t = 0..T-1

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> NoiseSchedule:
        t = cfg.num_train_timesteps
        if cfg.beta_schedule == "scaled_linear":  # LDM / Stable Diffusion
            betas = np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, t, dtype=np.float64) ** 2
        else:
            betas = np.linspace(cfg.beta_start, cfg.beta_end, t, dtype=np.float64)
        return cls(tuple(np.cumprod(1.0 - betas).tolist()))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def alpha_bar(self, t: int) -> float:
        return 1.0 if t < 0 else self.alphas_cumprod[t]  # t = -1 is the clean sample

    def timesteps(self, num_steps: int) -> list[int]:
        """`num_steps` descending training timesteps, evenly spaced, ending at 0; all T of them gives Eq. 16."""
        t = self.num_train_timesteps
        if not 1 <= num_steps <= t:
            raise ValueError(f"num_inference_steps={num_steps} must be between 1 and {t}")
        return [int(round(x)) for x in np.linspace(t - 1, 0, num_steps)]

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I) (Eq. 4 with the standard deviation written correctly)."""
        ab = torch.tensor(self.alphas_cumprod, device=x0.device, dtype=torch.float64)[t].to(x0.dtype)
        ab = ab.reshape(-1, *([1] * (x0.dim() - 1)))
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def ddpm_step(sched: NoiseSchedule, x_t: torch.Tensor, eps: torch.Tensor, t: int, s: int,
              noise: torch.Tensor | None) -> torch.Tensor:
    """Ancestral step t -> s < t (Eq. 16; s = t-1 is the paper's case, larger gaps respace it).

    x_s = (x_t - beta/sqrt(1-ab_t) eps) / sqrt(alpha) + sigma z, with alpha = ab_t/ab_s, beta = 1 - alpha and
    sigma^2 = (1-ab_s)/(1-ab_t) beta (the posterior variance; the paper prints it without the square root).
    """
    ab_t, ab_s = sched.alpha_bar(t), sched.alpha_bar(s)
    alpha = ab_t / ab_s
    beta = 1.0 - alpha
    x_s = (x_t - (beta / math.sqrt(1.0 - ab_t)) * eps) / math.sqrt(alpha)
    if s >= 0 and noise is not None:
        x_s = x_s + math.sqrt((1.0 - ab_s) / (1.0 - ab_t) * beta) * noise
    return x_s


def ddim_step(sched: NoiseSchedule, x_t: torch.Tensor, eps: torch.Tensor, t: int, s: int,
              noise: torch.Tensor | None, eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12): deterministic for eta = 0."""
    ab_t, ab_s = sched.alpha_bar(t), sched.alpha_bar(s)
    x0 = (x_t - math.sqrt(1.0 - ab_t) * eps) / math.sqrt(ab_t)
    sigma = eta * math.sqrt((1.0 - ab_s) / (1.0 - ab_t) * (1.0 - ab_t / ab_s))
    x_s = math.sqrt(ab_s) * x0 + math.sqrt(max(1.0 - ab_s - sigma**2, 0.0)) * eps
    if sigma > 0 and noise is not None:
        x_s = x_s + sigma * noise
    return x_s


def needs_noise(sampler: SamplerName, eta: float = 0.0) -> bool:
    return sampler == "ddpm" or eta > 0


def sample(denoise: Callable[[torch.Tensor, int], torch.Tensor], x_T: torch.Tensor, sched: NoiseSchedule,
           num_steps: int, sampler: SamplerName = "ddim",
           noise: Callable[[int], torch.Tensor] | None = None, eta: float = 0.0,
           on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Run the reverse process from x_T; `noise(i)` gives the fresh N(0, I) for step i (per-call generators)."""
    return run_to_end(sample_steps(denoise, x_T, sched, num_steps, sampler, noise, eta, on_step))


def run_to_end(steps: Generator):
    """Exhaust a step generator and return its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def sample_steps(denoise: Callable[[torch.Tensor, int], torch.Tensor], x_T: torch.Tensor, sched: NoiseSchedule,
                 num_steps: int, sampler: SamplerName = "ddim",
                 noise: Callable[[int], torch.Tensor] | None = None, eta: float = 0.0,
                 on_step: Callable[[int], None] | None = None) -> Generator[int, None, torch.Tensor]:
    """`sample` one step at a time: yields each step's index once it is issued, returns x_0 (the caller can do
    other work between steps, such as handing out frames that are ready)."""
    timesteps = sched.timesteps(num_steps)
    x = x_T
    for i, t in enumerate(timesteps):
        s = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        eps = denoise(x, t)
        z = noise(i) if (noise is not None and needs_noise(sampler, eta) and s >= 0) else None
        if sampler == "ddpm":
            x = ddpm_step(sched, x, eps, t, s, z)
        elif sampler == "ddim":
            x = ddim_step(sched, x, eps, t, s, z, eta)
        else:
            raise ValueError(f"unknown sampler {sampler!r}; use 'ddim' or 'ddpm'")
        if on_step is not None:
            on_step(i)
        yield i
    return x
