"""Samplers on Gaussian data, whose exact denoiser is known in closed form.

For x0 ~ N(mu, s^2): x_t ~ N(sqrt(ab) mu, ab s^2 + 1 - ab), and the exact noise prediction is
E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab). A correct sampler then returns N(mu, s^2).
"""

import math

import pytest
import torch

from nuwaxl.config import DiffusionConfig
from nuwaxl.diffusion import NoiseSchedule, ddim_step, ddpm_step, sample

MU, SIGMA = 0.7, 0.4
SCHED = NoiseSchedule.from_config(DiffusionConfig())


def exact_denoiser(x: torch.Tensor, t: int) -> torch.Tensor:
    ab = SCHED.alpha_bar(t)
    return math.sqrt(1 - ab) * (x - math.sqrt(ab) * MU) / (ab * SIGMA**2 + 1 - ab)


def exact_prior(n: int, g: torch.Generator) -> torch.Tensor:
    """x_T from its true marginal: the SD schedule leaves a little signal at t = T-1 (ab = 0.0047)."""
    ab = SCHED.alpha_bar(SCHED.num_train_timesteps - 1)
    return math.sqrt(ab) * MU + math.sqrt(ab * SIGMA**2 + 1 - ab) * torch.randn(n, generator=g, dtype=torch.float64)


def run(sampler: str, steps: int, denoiser=exact_denoiser, n: int = 40_000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return sample(denoiser, exact_prior(n, g), SCHED, steps, sampler,
                  noise=lambda i: torch.randn(n, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("sampler,steps,tol", [("ddpm", 1000, 0.01), ("ddpm", 250, 0.02), ("ddim", 1000, 0.01)])
def test_sampler_recovers_gaussian_data(sampler, steps, tol):
    x0 = run(sampler, steps)  # 40k samples: standard errors of mean and std are 0.002 and 0.0014
    assert abs(x0.mean().item() - MU) < tol
    assert abs(x0.std().item() - SIGMA) < tol


def test_ddim_converges_at_first_order():
    """DDIM is an Euler-type solver of the probability-flow ODE: its error falls about as 1/steps."""
    err = {n: abs(run("ddim", n).std().item() - SIGMA) for n in (25, 100)}
    assert err[100] < 0.4 * err[25]
    assert err[100] < 0.02


def test_wrong_denoiser_is_detected():
    """The check above can fail: a denoiser for another mean lands elsewhere."""
    x0 = run("ddim", 100, lambda x, t: exact_denoiser(x, t) + 0.1, n=10_000)
    assert abs(x0.mean().item() - MU) > 0.1


def test_ddpm_step_is_eq16_for_consecutive_steps():
    t = 500
    ab_t, ab_s = SCHED.alpha_bar(t), SCHED.alpha_bar(t - 1)
    alpha, beta = ab_t / ab_s, 1 - ab_t / ab_s
    x, eps, z = torch.tensor([0.3]), torch.tensor([-1.2]), torch.tensor([0.5])
    expected = (x - beta / math.sqrt(1 - ab_t) * eps) / math.sqrt(alpha) + math.sqrt((1 - ab_s) / (1 - ab_t) * beta) * z
    assert torch.allclose(ddpm_step(SCHED, x, eps, t, t - 1, z), expected)


def test_last_step_returns_the_clean_estimate():
    x, eps = torch.tensor([0.5]), torch.tensor([0.2])
    ab = SCHED.alpha_bar(0)
    x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    assert torch.allclose(ddim_step(SCHED, x, eps, 0, -1, None), x0)
    assert torch.allclose(ddpm_step(SCHED, x, eps, 0, -1, torch.tensor([9.0])), x0)  # no noise at the end


def test_timesteps():
    assert SCHED.timesteps(1000) == list(range(999, -1, -1))
    ts = SCHED.timesteps(25)
    assert len(ts) == 25 and ts[0] == 999 and ts[-1] == 0 and ts == sorted(ts, reverse=True)
    with pytest.raises(ValueError, match="between 1 and 1000"):
        SCHED.timesteps(0)


def test_add_noise_matches_forward_process():
    x0, eps = torch.ones(3, 2), torch.full((3, 2), 2.0)
    t = torch.tensor([0, 500, 999])
    out = SCHED.add_noise(x0, eps, t)
    for i, ti in enumerate(t.tolist()):
        ab = SCHED.alpha_bar(ti)
        assert torch.allclose(out[i], torch.full((2,), math.sqrt(ab) + 2 * math.sqrt(1 - ab)))


def test_dpmpp_2m_is_second_order_and_beats_ddim_at_few_steps():
    """DPM-Solver++(2M) solves the probability-flow ODE, whose exact solution for Gaussian data maps x_T's quantile
    to x_0's: against it the error falls about as 1/steps^2 (on log-SNR-uniform steps) and at 10 steps is a small
    fraction of DDIM's."""
    g = torch.Generator().manual_seed(0)
    x_T, ab = exact_prior(2000, g), SCHED.alpha_bar(SCHED.num_train_timesteps - 1)
    exact = MU + SIGMA * (x_T - math.sqrt(ab) * MU) / math.sqrt(ab * SIGMA**2 + 1 - ab)

    def err(sampler, steps):
        return (run(sampler, steps, n=2000) - exact).abs().max().item()

    assert err("dpmpp-2m", 10) < 0.1 * err("ddim", 10)
    assert err("dpmpp-2m", 20) < 0.35 * err("dpmpp-2m", 10)  # second order: about a quarter per doubling
    x0 = run("dpmpp-2m", 15)
    assert abs(x0.mean().item() - MU) < 0.01 and abs(x0.std().item() - SIGMA) < 0.01


def test_logsnr_timesteps_are_distinct_and_span_the_schedule():
    for n in (1, 2, 3, 10, 50, 500, 1000):
        ts = SCHED.timesteps(n, "logsnr")
        assert len(set(ts)) == n and ts == sorted(ts, reverse=True) and ts[0] == 999 and (n == 1 or ts[-1] == 0)
    assert SCHED.timesteps(1000, "logsnr") == SCHED.timesteps(1000)
