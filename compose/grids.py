"""Time grids: decreasing sequences t_0 = t_max > ... > t_{N-1} = t_min > t_N = 0 in the convention of `NoiseSchedule`.

A grid of N + 1 times is N steps and N network evaluations (at every time but the last, 0: the last step lands on
the data with x0_hat, as diffusers' schedulers end). Every named grid is a rule for placing the N evaluation times
between the schedule's endpoints; the levels are converted to t through the log-SNR, so one name means the same
noise levels for every schedule that reaches them:

- "uniform": uniform in t.
- "log_snr": uniform in lambda = log(alpha^2 / sigma^2).
- "karras": Karras et al. (EDM, 2022) eq. 5 with rho = 7 in the VE scale s = sigma / alpha:
  s_i = (s_max^(1/rho) + i / (N - 1) (s_min^(1/rho) - s_max^(1/rho)))^rho.
- "ays_sd15", "ays_sdxl": the Align-Your-Steps 10-step presets (Sabour et al. 2024) that diffusers ships as
  `AysSchedules` (VE scale, SD 1.5 / SDXL), interpolated log-linearly to other step counts (the paper's recipe:
  log s linearly interpolated over an equally spaced index). They were optimised for the SD noise table, whose
  VE range is [0.029, 14.615]; on another schedule the preset's log s is mapped affinely onto that schedule's
  [log s_min, log s_max] (the identity for SD 1.5 and SDXL themselves).
- a path to a JSON schedule file (`compose.schedule_files.load_schedule`), or an explicit tensor: see `resolve_grid`.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch

from .options import GRIDS, check_grid, check_steps
from .schedule import NoiseSchedule
from .schedule_files import load_schedule

# diffusers `AysSchedules` "StableDiffusionSigmas" / "StableDiffusionXLSigmas" (10 steps, VE sigma = sigma / alpha).
# diffusers writes a final 0.0 ("denoise to the data"); the paper's last level is 0.029, the SD table's sigma_min,
# which is what a grid ending at t_min needs, so it is used here.
AYS_SIGMAS = {
    "ays_sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "ays_sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}
KARRAS_RHO = 7.0


def loglinear_interp(values: torch.Tensor | tuple, num: int) -> torch.Tensor:
    """Resample a decreasing positive sequence to `num` points, linearly in log(value) over an even index.

    values: (K,) decreasing and positive. Returns (num,) float64 with the same first and last value.
    """
    v = torch.as_tensor(values, dtype=torch.float64)
    if v.ndim != 1 or v.numel() < 2 or not bool(torch.all(v > 0)) or not bool(torch.all(v[1:] < v[:-1])):
        raise ValueError("values must be a decreasing sequence of at least two positive numbers.")
    if num < 2:
        raise ValueError(f"num must be at least 2; got {num}.")
    xs = torch.linspace(0.0, 1.0, v.numel(), dtype=torch.float64)
    xq = torch.linspace(0.0, 1.0, num, dtype=torch.float64)
    logv = v.log()
    i = (torch.searchsorted(xs, xq, right=True) - 1).clamp(0, v.numel() - 2)
    w = (xq - xs[i]) / (xs[i + 1] - xs[i])
    return (logv[i] + w * (logv[i + 1] - logv[i])).exp()


def _log_ve_sigma(schedule: NoiseSchedule, t: float) -> float:
    """log(sigma / alpha) = -lambda / 2."""
    return -0.5 * float(schedule.log_snr(t))


def make_grid(
    schedule: NoiseSchedule,
    steps: int,
    kind: str = "log_snr",
    t_max: float | None = None,
    t_min: float | None = None,
) -> torch.Tensor:
    """A grid of `steps` network evaluations: (steps + 1,) float64 times, strictly decreasing, ending at 0.

    The `steps` evaluation times run from t_max to t_min (both included; `steps` = 1: t_max only) placed by `kind`
    (one of `GRIDS`, see the module docstring); the last step goes from t_min to the data (t = 0) with x0_hat, as
    diffusers' schedulers end (DDIM's final alpha of 1, Euler's final sigma of 0). t_max / t_min default to the
    schedule's.
    """
    steps = check_steps(steps, "steps")
    return torch.cat([noise_levels(schedule, steps, kind, t_max, t_min), torch.zeros(1, dtype=torch.float64)])


def noise_levels(
    schedule: NoiseSchedule, num: int, kind: str = "log_snr", t_max: float | None = None, t_min: float | None = None
) -> torch.Tensor:
    """`num` strictly decreasing times from t_max to t_min (both included) placed by `kind`; (num,) float64."""
    t_max = schedule.t_max if t_max is None else float(t_max)
    t_min = schedule.t_min if t_min is None else float(t_min)
    if not 0 < t_min < t_max <= 1:
        raise ValueError(f"need 0 < t_min < t_max <= 1; got t_min={t_min}, t_max={t_max}.")
    if kind not in GRIDS:
        raise ValueError(f"grid={kind!r} is not known; use one of {GRIDS}, or the path of a JSON schedule file.")
    if num == 1:
        return torch.tensor([t_max], dtype=torch.float64)
    steps = num - 1
    if kind == "uniform":
        return torch.linspace(t_max, t_min, steps + 1, dtype=torch.float64)
    lo, hi = _log_ve_sigma(schedule, t_min), _log_ve_sigma(schedule, t_max)  # log s_min, log s_max
    if not math.isfinite(hi):  # t_max = 1 of a flow path (alpha = 0): place the levels from log-SNR -20 down,
        hi = _log_ve_sigma(schedule, float(schedule.t_from_log_snr(-20.0)))  # the first one stays at t_max
    if kind == "log_snr":
        log_s = torch.linspace(hi, lo, steps + 1, dtype=torch.float64)
    elif kind == "karras":
        inv = 1.0 / KARRAS_RHO
        ramp = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
        s_max, s_min = math.exp(hi * inv), math.exp(lo * inv)  # s^(1 / rho)
        log_s = KARRAS_RHO * torch.log(s_max + ramp * (s_min - s_max))
    else:
        preset = loglinear_interp(AYS_SIGMAS[kind], steps + 1).log()
        p_hi, p_lo = float(preset[0]), float(preset[-1])
        log_s = lo + (preset - p_lo) * (hi - lo) / (p_hi - p_lo)
    ts = schedule.t_from_log_snr(-2.0 * log_s)
    ts[0], ts[-1] = t_max, t_min
    return _strict(ts, kind)


def _strict(ts: torch.Tensor, kind: str) -> torch.Tensor:
    if not bool(torch.all(ts[1:] < ts[:-1])):
        raise ValueError(
            f"grid={kind!r} with {ts.numel()} steps has coinciding times on this schedule (the steps are finer "
            "than the schedule resolves); use fewer steps or another grid."
        )
    return ts


def grid_from_diffusers(
    schedule: NoiseSchedule,
    timesteps: Any = None,
    sigmas: Any = None,
    num_inference_steps: int | None = None,
) -> torch.Tensor:
    """The grid in t (ending at 0, the data) of diffusers' `timesteps=` or `sigmas=` (give one).

    timesteps: the network's timestep inputs, one evaluation each (`NoiseSchedule.t_from_timestep`). sigmas:
    diffusers' sigmas, sigma / alpha (the k-diffusion VE scale) for DDPM-family schedulers and t itself for flow
    matching, with an optional trailing 0 (diffusers' "denoise to the data", the last step of every grid here).
    num_inference_steps, when given, must equal the number of entries. ValueError naming the argument otherwise.
    """
    name = "timesteps" if timesteps is not None else "sigmas"
    try:
        vals = torch.as_tensor(timesteps if timesteps is not None else sigmas, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError):
        given = timesteps if sigmas is None else sigmas
        raise ValueError(f"{name} must be a list of numbers; got {given!r}.") from None
    if not bool(torch.isfinite(vals).all()) or vals.numel() == 0:
        raise ValueError(f"{name} must be a non-empty list of finite numbers; got {vals.tolist()[:8]}.")
    if timesteps is not None:
        t = schedule.t_from_timestep(vals)
    else:
        if float(vals[-1]) == 0.0:
            vals = vals[:-1]
        if not bool(torch.all(vals > 0)):
            raise ValueError(f"sigmas must be positive (a trailing 0 is allowed); got {vals.tolist()[:8]}...")
        t = vals.clone() if schedule.kind == "ot" else schedule.t_from_log_snr(-2.0 * vals.log())
    if not bool(((t > 0) & (t <= 1)).all()):
        raise ValueError(f"{name} lie outside this model's range; got {vals.tolist()[:8]}...")
    ts = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
    if num_inference_steps is not None and num_inference_steps != t.numel():
        raise ValueError(
            f"num_inference_steps={num_inference_steps} but {name} has {t.numel()} entries; give one of them."
        )
    try:
        return check_grid(ts, name)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def is_schedule_file(grid: Any) -> bool:
    """True when `grid` names a schedule file (a path ending in .json or containing a path separator)."""
    return isinstance(grid, (str, os.PathLike)) and (str(grid).endswith(".json") or os.path.sep in str(grid))


def resolve_grid(
    schedule: NoiseSchedule,
    grid: Any,
    steps: int | None = None,
    *,
    expect: dict | None = None,
    default_steps: int | None = None,
    probes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Turn a grid given by name, file or values into (ts (N + 1,), network times (N,) or None, solver offsets
    (N, 3) or None).

    grid: a name in `GRIDS` (needs `steps`), the path of a JSON schedule file written by `compose.ld3`
        (its keys are checked against `expect`, e.g. {"nfe": 6, "solver": "dpm2m"}; a mismatch names the key), or
        a strictly decreasing sequence of times.
    default_steps: the step count of a named grid when steps is None.
    probes: the call's Hutchinson probes per step (None: it uses none). A file learned with another number warns
        (not an error: the grid still runs, but the distances recorded in the file were measured with its own).
    Returns the grid and, for learned schedules, the times fed to the network at each step (a decoupled time shift)
    and the learned solver coefficients (`compose.ld3`; pass them to the multistep solver), each None when absent.
    """
    if is_schedule_file(grid):
        sched = load_schedule(grid, expect=expect)
        ts = check_grid(sched["grid"], "the schedule file's grid")
        if steps is not None and steps != ts.numel() - 1:
            raise ValueError(
                f"steps={steps} does not match the schedule file {grid} ({ts.numel() - 1} steps); drop steps= or "
                "learn a schedule for that NFE."
            )
        learned = sched.get("probes")
        if probes is not None and learned is not None and learned != probes:
            warnings.warn(
                f"schedule file {grid} was learned and measured with probes={learned} Hutchinson probes per step; "
                f"this call uses probes={probes}. Pass probes={learned} for the distances the file records.",
                stacklevel=3,
            )
        net, off = sched.get("network_times"), sched.get("solver_offsets")
        as_t = lambda v: None if v is None else torch.as_tensor(v, dtype=torch.float64)  # noqa: E731
        return ts, as_t(net), as_t(off)
    if isinstance(grid, str):
        steps = default_steps if steps is None else steps
        if steps is None:
            raise ValueError(f"grid={grid!r} needs steps= (the number of steps).")
        return make_grid(schedule, steps, kind=grid), None, None
    ts = check_grid(grid, "grid")
    return ts, None, None
