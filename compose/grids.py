"""Time grids: decreasing sequences t_0 = t_max > ... > t_N = t_min in the convention of `NoiseSchedule`."""

from __future__ import annotations

import torch

from .schedule import NoiseSchedule

GRIDS = ("uniform", "log_snr")


def make_grid(
    schedule: NoiseSchedule,
    steps: int,
    kind: str = "log_snr",
    t_max: float | None = None,
    t_min: float | None = None,
) -> torch.Tensor:
    """A grid of `steps` steps (steps + 1 times, float64, decreasing).

    kind="uniform": uniform in t.  kind="log_snr": uniform in lambda = log(alpha^2 / sigma^2), which keeps every
    step the same size on the scale at which the dynamics change (well behaved for VP, cosine and OT alike).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}.")
    t_max = schedule.t_max if t_max is None else float(t_max)
    t_min = schedule.t_min if t_min is None else float(t_min)
    if not 0 < t_min < t_max <= 1:
        raise ValueError(f"need 0 < t_min < t_max <= 1; got t_min={t_min}, t_max={t_max}.")
    if kind == "uniform":
        return torch.linspace(t_max, t_min, steps + 1, dtype=torch.float64)
    if kind == "log_snr":
        lam = torch.linspace(
            float(schedule.log_snr(t_max)), float(schedule.log_snr(t_min)), steps + 1, dtype=torch.float64
        )
        ts = schedule.t_from_log_snr(lam)
        ts[0], ts[-1] = t_max, t_min
        return ts
    raise ValueError(f"grid={kind!r} is not known; use one of {GRIDS}.")
