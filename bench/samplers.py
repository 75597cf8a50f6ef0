"""Sampler accuracy on Gaussian data, where the denoiser is known in closed form.

Data ``N(mu, diag(var))`` has the exact denoiser ``D(x, s) = mu + var / (var + s^2) (x - mu)``.
Prints the RMS error of each sampler's result at 10, 20 and 50 steps against the 1000-step
solution of the same problem:

* deterministic samplers (probability-flow ODE): against 1000 Heun steps on Karras sigmas; each
  starts from ``mu + sqrt(var + sigma_0^2) z`` for one shared ``z``, whose exact solution
  ``mu + sqrt(var) z`` does not depend on ``sigma_0``, so grids starting lower (leading) compare
  fairly;
* stochastic samplers (eta = 1): against the same sampler at 1000 steps of the same schedule,
  driven by the same Brownian path (noise replayed as Brownian increments).

Run: ``python bench/samplers.py``.
"""

from __future__ import annotations

import bisect
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.diffusion.samplers import get_sampler, get_sigmas  # noqa: E402
from model.diffusion.schedule import DiscreteSchedule, append_dims  # noqa: E402

STEPS = (10, 20, 50)
SCHEDULE = DiscreteSchedule()
DIMS = 4096


class BrownianPath:
    """One Brownian path W(sigma), sampled lazily by Brownian bridges, so that step sizes of
    any size see the same path. As a noise sampler it returns the normalised increment."""

    def __init__(self, dims: int, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.dims = dims
        self.times = [0.0]
        self.values = [torch.zeros(1, dims, dtype=torch.float64)]

    def _draw(self) -> torch.Tensor:
        return torch.randn(1, self.dims, generator=self.gen, dtype=torch.float64)

    def at(self, t: float) -> torch.Tensor:
        i = bisect.bisect_left(self.times, t)
        if i < len(self.times) and self.times[i] == t:
            return self.values[i]
        t0, w0 = self.times[i - 1], self.values[i - 1]
        if i == len(self.times):  # beyond the last point: a free increment
            value = w0 + (t - t0) ** 0.5 * self._draw()
        else:  # between two points: the Brownian bridge
            t1, w1 = self.times[i], self.values[i]
            mean = w0 + (t - t0) / (t1 - t0) * (w1 - w0)
            value = mean + ((t - t0) * (t1 - t) / (t1 - t0)) ** 0.5 * self._draw()
        self.times.insert(i, t)
        self.values.insert(i, value)
        return value

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        a, b = float(sigma_next), float(sigma)
        return (self.at(b) - self.at(a)) / (b - a) ** 0.5


def gaussian_problem(dims: int = DIMS, seed: int = 0):
    """Data N(mu, diag(var)), its exact denoiser, a start at any sigma_0 for one shared z, and
    the exact solution: along the probability-flow ODE ``x - mu`` scales like
    ``sqrt(var + sigma^2)``, so from ``mu + sqrt(var + sigma_0^2) z`` it ends at
    ``mu + sqrt(var) z``."""
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(dims, generator=gen, dtype=torch.float64) * 0.5
    var = torch.rand(dims, generator=gen, dtype=torch.float64) * 0.95 + 0.05
    z = torch.randn(1, dims, generator=gen, dtype=torch.float64)

    def denoiser(x, sigma):
        return mu + var / (var + append_dims(sigma, x.ndim).double() ** 2) * (x - mu)

    def start(sigma_0):
        return mu + (var + sigma_0**2).sqrt() * z

    return denoiser, start, mu + var.sqrt() * z


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def solve(denoiser, start, name, schedule, steps, **kwargs):
    sigmas = get_sigmas(schedule, steps, SCHEDULE).double()
    return get_sampler(name)(denoiser, start(sigmas[0]), sigmas, disable=True, **kwargs)


def print_row(label: str, errors: list[float]) -> None:
    print(f"{label:<34}" + "".join(f"{e:>11.2e}" for e in errors))


def main() -> None:
    denoiser, start, exact = gaussian_problem()
    fine = solve(denoiser, start, "heun", "karras", 1000)
    print(f"Gaussian data, {DIMS} dims; RMS error of the sample at sigma = 0")
    print(
        f"reference: 1000 Heun steps, Karras (its error vs the closed form {rms(fine, exact):.1e})"
    )
    print()
    print_row("ODE sampler, schedule", [])
    print(f"{'':<34}" + "".join(f"{n:>8} st" for n in STEPS))
    for name in ("euler", "heun", "dpmpp_2m", "ddim"):
        for schedule in ("karras", "exponential", "leading", "trailing"):
            errors = [rms(solve(denoiser, start, name, schedule, n), fine) for n in STEPS]
            print_row(f"{name}, {schedule}", errors)
    print("(heun evaluates the model 2n - 1 times for n steps, the others n times)")
    print()
    print("SDE sampler (eta = 1), schedule: vs its own 1000 steps on the same Brownian path")
    for name in ("euler_a", "dpmpp_2m_sde", "ddim"):
        for schedule in ("karras", "trailing"):
            path = BrownianPath(DIMS, seed=1)
            kwargs = {"eta": 1.0, "noise_sampler": path}
            ref = solve(denoiser, start, name, schedule, 1000, **kwargs)
            errors = [rms(solve(denoiser, start, name, schedule, n, **kwargs), ref) for n in STEPS]
            print_row(f"{name}, {schedule}", errors)


if __name__ == "__main__":
    main()
