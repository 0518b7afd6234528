"""DDPM forward process (Eq. 3-4) and batched reverse-step functions (DDPM ancestral, Eq. 16; DDIM; DPM-Solver++(2M)).

Samplers see only a denoiser `eps = denoise(x_t, t)` and a noise source; schedules are plain numbers.
Each step is a pure function of (x_t, eps, t, s, noise), so many independent diffusion calls step together in
one batch: their only per-call state is their rows of x and their own noise generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass

import numpy as np
import torch

from nuwaxl.config import SAMPLERS, DiffusionConfig, SamplerName


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

    def timesteps(self, num_steps: int, spacing: str = "linear") -> list[int]:
        """`num_steps` distinct descending training timesteps from T-1 to 0; all T of them gives Eq. 16.
        "linear": evenly spaced in t. "logsnr": evenly spaced in lambda = log(alpha / sigma), where multistep
        solvers' steps are equal (DPM-Solver's recommendation; with even t, the last step alone spans most of lambda
        at 10 steps), rounded to distinct integers."""
        t = self.num_train_timesteps
        if not 1 <= num_steps <= t:
            raise ValueError(f"num_inference_steps={num_steps} must be between 1 and {t}")
        if spacing == "linear":
            return [int(round(x)) for x in np.linspace(t - 1, 0, num_steps)]
        if spacing != "logsnr":
            raise ValueError(f"unknown timestep spacing {spacing!r}; use 'linear' or 'logsnr'")
        ab = np.array(self.alphas_cumprod)
        lam = 0.5 * np.log(ab / (1.0 - ab))  # increasing as t falls
        steps = [int(np.argmin(np.abs(lam - x))) for x in np.linspace(lam[-1], lam[0], num_steps)]
        steps[-1], steps[0] = 0, t - 1  # one step: T-1, as "linear"
        for i in range(num_steps - 2, -1, -1):  # distinct: nudge collisions apart, keeping T-1 .. 0
            steps[i] = max(steps[i], steps[i + 1] + 1)
        for i in range(1, num_steps):
            steps[i] = min(steps[i], steps[i - 1] - 1)
        return steps

    def table(self, device: torch.device | str) -> torch.Tensor:
        """alpha-bar_t for t = 0..T-1 as a float64 tensor on `device`."""
        return torch.tensor(self.alphas_cumprod, device=device, dtype=torch.float64)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                  table: torch.Tensor | None = None) -> torch.Tensor:
        """q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I) (Eq. 4 with the standard deviation written correctly).
        `table`: `self.table(x0.device)` made beforehand, as a CUDA-graph capture needs (no host-to-device copy)."""
        ab = (self.table(x0.device) if table is None else table)[t].to(x0.dtype)
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


SPACING = {"ddim": "linear", "ddpm": "linear", "dpmpp-2m": "logsnr"}  # each sampler's timesteps


def dpmpp_2m_step(sched: NoiseSchedule, x_t: torch.Tensor, eps: torch.Tensor, t: int, s: int,
                  prev: tuple[torch.Tensor, float] | None) -> tuple[torch.Tensor, tuple[torch.Tensor, float]]:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), data prediction, deterministic: the step t -> s uses this step's
    x0 estimate and the previous one's (`prev`: (x0, h) of the step before, None at the first). First order (DDIM)
    at the first step and at the last (s = -1, where lambda is infinite). Returns x_s and this step's (x0, h)."""
    ab_t, ab_s = sched.alpha_bar(t), sched.alpha_bar(s)
    alpha_t, sigma_t = math.sqrt(ab_t), math.sqrt(1.0 - ab_t)
    x0 = (x_t - sigma_t * eps) / alpha_t
    if s < 0:
        return x0, (x0, math.inf)
    alpha_s, sigma_s = math.sqrt(ab_s), math.sqrt(1.0 - ab_s)
    h = math.log(alpha_s / sigma_s) - math.log(alpha_t / sigma_t)  # lambda_s - lambda_t > 0
    d = x0
    if prev is not None:
        r = prev[1] / h
        d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * prev[0]
    return (sigma_s / sigma_t) * x_t - alpha_s * math.expm1(-h) * d, (x0, h)


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
    timesteps = sched.timesteps(num_steps, SPACING[sampler] if sampler in SPACING else "linear")
    x, history = x_T, None  # history: the multistep sampler's previous (x0, h)
    for i, t in enumerate(timesteps):
        s = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        eps = denoise(x, t)
        z = noise(i) if (noise is not None and needs_noise(sampler, eta) and s >= 0) else None
        if sampler == "ddpm":
            x = ddpm_step(sched, x, eps, t, s, z)
        elif sampler == "ddim":
            x = ddim_step(sched, x, eps, t, s, z, eta)
        elif sampler == "dpmpp-2m":
            x, history = dpmpp_2m_step(sched, x, eps, t, s, history)
        else:
            raise ValueError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
        if on_step is not None:
            on_step(i)
        yield i
    return x
