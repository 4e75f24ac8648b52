"""Schedule diagnostics from the thermodynamic speed-accuracy relations (Ikeda, Uda, Okanohara, Ito, PRX 2025,
arXiv 2407.04495; docs/MATH.md section 7).

- `kinetic_action`: the model-free per-dimension action A = integral (alpha'^2 + sigma'^2) dt of a noise schedule
  (conditional OT 2, cosine pi^2 / 4, VP-linear ~3.65 on [1e-3, 1]).
- `dissipation`: the Monte-Carlo estimate, with a model, of integral E_{x ~ q_t} ||nu_t(x)||^2 dt / d, where
  nu_t(x) = (sigma'/sigma) x - alpha (sigma'/sigma - alpha'/alpha) x0_hat(x, t) is the velocity of the forward
  marginal flow; `gaussian_dissipation` is its closed form for Gaussian data N(mu, s^2 I) (the test).
- `step_lengths`: how far the teacher trajectory moves over each step of a grid (mean ||x_{k+1} - x_k||) and how
  uniform those lengths are: a constant-speed path has equal lengths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .composer import Composer
from .grids import make_grid, noise_levels
from .ld3 import solve
from .models import model_eps
from .predictions import bcast
from .schedule import NoiseSchedule


def _trapezoid(fn: Callable[[torch.Tensor], torch.Tensor], t_min: float, t_max: float, n: int) -> float:
    t = torch.linspace(t_min, t_max, n, dtype=torch.float64)
    # alpha' = alpha (log alpha)' is 0 * inf at t = 1 on OT / cosine: evaluate a hair inside (the integrand is
    # continuous there, the change is below 1e-9)
    return float(torch.trapezoid(fn(t.clamp(max=1.0 - 1e-10)), t))


def _check_range(schedule: NoiseSchedule, t_min: float, t_max: float) -> None:
    if not 0 < t_min < t_max <= 1:
        raise ValueError(f"need 0 < t_min < t_max <= 1; got t_min={t_min}, t_max={t_max}.")


def kinetic_action(schedule: NoiseSchedule, t_min: float = 1e-3, t_max: float = 1.0, n: int = 200_001) -> float:
    """Per-dimension kinetic action integral_{t_min}^{t_max} (alpha'^2 + sigma'^2) dt (trapezoid on n points)."""
    _check_range(schedule, t_min, t_max)
    return _trapezoid(lambda t: schedule.d_alpha(t) ** 2 + schedule.d_sigma(t) ** 2, t_min, t_max, n)


def gaussian_dissipation(
    mean: torch.Tensor, std: float, schedule: NoiseSchedule, t_min: float = 1e-3, t_max: float = 1.0, n: int = 200_001
) -> float:
    """Closed form of `dissipation` for data N(mean, std^2 I), mean (d,), per dimension.

    x_t ~ N(alpha mean, v I) with v = alpha^2 std^2 + sigma^2; the marginal flow is nu = alpha' mean +
    (sqrt v)' (x - alpha mean) / sqrt v, so E||nu||^2 = alpha'^2 ||mean||^2 + d ((sqrt v)')^2.
    """
    _check_range(schedule, t_min, t_max)
    mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
    d = mean.numel()
    m2 = float((mean**2).sum())

    def rate(t: torch.Tensor) -> torch.Tensor:
        a, s, da, ds = schedule.alpha(t), schedule.sigma(t), schedule.d_alpha(t), schedule.d_sigma(t)
        v = a**2 * std**2 + s**2
        dsqrt_v = (a * da * std**2 + s * ds) / v.sqrt()
        return (da**2 * m2 + d * dsqrt_v**2) / d

    return _trapezoid(rate, t_min, t_max, n)


def forward_velocity(model: Any, x: torch.Tensor, t: Any, schedule: NoiseSchedule | None = None) -> torch.Tensor:
    """nu_t(x) = (sigma'/sigma) x - alpha (sigma'/sigma - alpha'/alpha) x0_hat(x, t), shape like x (n, ...).

    t: a float or (n,) times. The velocity of the forward marginal flow (docs/MATH.md section 7).
    """
    sch = schedule or model.schedule
    t = torch.as_tensor(t, dtype=torch.float64)
    sigma = bcast(sch.sigma(t), x)
    r_s = bcast(sch.d_sigma(t) / sch.sigma(t), x)
    r_a = bcast(sch.d_log_alpha(t), x)
    eps = model_eps(model, x, t)
    # x0_hat = (x - sigma eps) / alpha; written without dividing by alpha (alpha -> 0 on OT / cosine at t = 1).
    return (r_s * x - (r_s - r_a) * (x - sigma * eps)).to(x.dtype)


def dissipation(
    model: Any,
    data: Callable[[int, torch.Generator | None], torch.Tensor] | torch.Tensor,
    *,
    schedule: NoiseSchedule | None = None,
    t_min: float = 1e-3,
    t_max: float = 1.0,
    num_samples: int = 4096,
    batch_size: int = 1024,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Monte-Carlo estimate of integral_{t_min}^{t_max} E_{x ~ q_t} ||nu_t(x)||^2 dt / d, and its standard error.

    data: x0 samples (N, ...) (drawn with replacement) or a function (n, generator) -> (n, ...) data samples.
    t ~ U(t_min, t_max) (stratified), x_t = alpha_t x0 + sigma_t eps; nu from the model's eps (`forward_velocity`).
    """
    sch = schedule or model.schedule
    _check_range(sch, t_min, t_max)
    if num_samples < 2 or batch_size < 1:
        raise ValueError(f"need num_samples >= 2 and batch_size >= 1; got {num_samples}, {batch_size}.")
    vals = []
    done = 0
    while done < num_samples:
        b = min(batch_size, num_samples - done)
        if callable(data):
            x0 = data(b, generator)
        else:
            idx = torch.randint(0, data.shape[0], (b,), generator=generator)
            x0 = data[idx]
        u = torch.arange(done, done + b, dtype=torch.float64) + torch.rand(b, generator=generator, dtype=torch.float64)
        t = t_min + (t_max - t_min) * u / num_samples
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(x0.dtype)
        x = bcast(sch.alpha(t), x0).to(x0.dtype) * x0 + bcast(sch.sigma(t), x0).to(x0.dtype) * noise
        with torch.no_grad():
            nu = forward_velocity(model, x, t, sch)
        vals.append(nu.reshape(b, -1).to(torch.float64).pow(2).mean(-1))
        done += b
    v = torch.cat(vals) * (t_max - t_min)
    return float(v.mean()), float(v.std() / v.numel() ** 0.5)


def step_lengths(trajectory: torch.Tensor) -> dict[str, Any]:
    """Step lengths of a trajectory sampled at the grid times, trajectory (N + 1, n, ...).

    Returns lengths (N,) = mean over samples of ||x_{k+1} - x_k||, their sum, and the uniformity measures
    cv = std / mean of the lengths and ratio = max / min (1 and 0 for a constant-speed walk).
    """
    if trajectory.ndim < 2 or trajectory.shape[0] < 2:
        raise ValueError("trajectory must be (N + 1, n, ...) with N >= 1.")
    n = trajectory.shape[1]
    diff = (trajectory[1:] - trajectory[:-1]).reshape(trajectory.shape[0] - 1, n, -1).to(torch.float64)
    lengths = diff.norm(dim=-1).mean(-1)
    cv = float(lengths.std() / lengths.mean()) if lengths.numel() > 1 else 0.0
    return {
        "lengths": lengths,
        "total": float(lengths.sum()),
        "cv": cv,
        "ratio": float(lengths.max() / lengths.min().clamp_min(1e-300)),
    }


def teacher_trajectory(expr: Any, x_T: torch.Tensor, ts: torch.Tensor, substeps: int = 20) -> torch.Tensor:
    """(N + 1, n, ...) states of the teacher (DPM-Solver++(2M), `substeps` log-SNR steps per grid step) at ts.

    A step to the data (ts[k + 1] = 0) is taken as `substeps` steps down to the schedule's t_min, then x0_hat."""
    out = [x_T]
    x = x_T
    sch = getattr(expr, "schedule", None) or Composer(expr, method="ode").schedule
    with torch.no_grad():
        for k in range(ts.numel() - 1):
            t_a, t_b = float(ts[k]), float(ts[k + 1])
            if t_b > 0:
                fine = noise_levels(sch, substeps + 1, "log_snr", t_max=t_a, t_min=t_b)
            elif t_a > sch.t_min:
                fine = make_grid(sch, substeps, "log_snr", t_max=t_a)
            else:
                fine = torch.tensor([t_a, 0.0], dtype=torch.float64)
            x = solve(expr, x, fine, "dpm2m" if fine.numel() > 2 else "euler")
            out.append(x)
    return torch.stack(out)
