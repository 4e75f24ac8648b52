"""Learned step schedules (LD3, Tong et al., arXiv 2405.15506; MATH.md section 6).

An N-step grid for one (model or composed expression, solver, NFE, guidance) is learned by distilling a many-step
teacher into the N-step student:

- parameters xi (N,): the N gaps of the grid are softmax(xi) of the log-SNR span between the fixed endpoints
  lambda(t_max) and lambda(t_min), so the grid is strictly decreasing by construction (MATH.md writes N + 1
  numbers for the N + 1 grid points; N gaps are N numbers). Optional decoupled network times: a second vector
  s (N,) moves the time fed to the network at step k by 0.5 * (smallest adjacent gap) * tanh(s_k);
- the teacher (DPM-Solver++(2M), `teacher_steps` log-SNR steps, or any `compose.sample` set-up) runs once on the
  training and validation noises;
- the relaxed loss: || student(x'_T) - teacher(x_T) ||_2 with x'_T free inside the ball of radius r * sigma_T
  around x_T (r = 1e-3 d / N^2 by default), minimised over xi, s and x'_T with Adam;
- validation: the plain distance || student(x_T) - teacher(x_T) || on held-out noises (no ball), the number the
  benchmark reports; the parameters with the best validation distance are kept.

Gradients flow through the student's steps and every model call. For OR and AND the per-step coefficients come
from the tracked densities (`compose.Composer`); by default (`weight_grad=True`) the gradient also flows through
those densities (the divergences included) into the weights, which is what makes OR learnable at NFE 4 on the 2-D
mixtures (test distance 0.20 vs 0.48 with the weights held constant); `weight_grad=False` treats them as constants
(a straight-through approximation, cheaper: no backward through the divergences).

A schedule is stored as JSON with the keys of `REQUIRED_KEYS` (`save_schedule` / `load_schedule`); loading checks
the grid and, given `expect`, that the file was learned for the same model, operator, solver, NFE and guidance.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .engine import Composer, check_grid, divergence, rademacher
from .grids import GRIDS, make_grid
from .models import model_eps, model_name
from .operators import AND, OR, Expr, Guided
from .predictions import bcast
from .schedule import NoiseSchedule

FORMAT = "compose-schedule/1"
REQUIRED_KEYS = (
    "format",
    "model",
    "operator",
    "solver",
    "nfe",
    "guidance",
    "schedule",
    "grid",
    "train_size",
    "teacher",
    "loss",
    "date",
)
CHECKED_KEYS = ("model", "operator", "solver", "nfe", "guidance", "schedule")


# ---------------------------------------------------------------------- schedule files
def expression_keys(expr: Any) -> dict[str, Any]:
    """The identity a schedule file is checked against: model names, operator expression and guidance scale."""
    if isinstance(expr, Expr):
        leaves = expr.leaves()
        guidance = next((n.scale for n in expr.nodes() if isinstance(n, Guided)), 1.0)
        return {"model": ",".join(model_name(m) for m in leaves), "operator": repr(expr), "guidance": guidance}
    return {"model": model_name(expr), "operator": "none", "guidance": 1.0}


def save_schedule(path: str | os.PathLike, info: dict[str, Any]) -> None:
    """Write a schedule file (keys `REQUIRED_KEYS`, plus anything else in `info`) after checking it."""
    _check_schedule(dict(info), str(path))
    with open(path, "w") as fh:
        json.dump(info, fh, indent=2)
        fh.write("\n")


def load_schedule(path: str | os.PathLike, expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read and check a schedule file; `expect` maps keys of `CHECKED_KEYS` to this call's values.

    Raises ValueError when the file is missing, not valid JSON, lacks a key, holds a grid that is not strictly
    decreasing in (0, 1] or whose length does not match its NFE, or was learned for another model / operator /
    solver / NFE / guidance / noise schedule than `expect` says (the message names every mismatching key).
    """
    path = str(path)
    if not os.path.isfile(path):
        raise ValueError(f"schedule file {path!r} does not exist; learn one with `python -m compose.learn_schedule`.")
    try:
        with open(path) as fh:
            info = json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"schedule file {path!r} is not valid JSON ({err}); regenerate it.") from err
    if not isinstance(info, dict):
        raise ValueError(f"schedule file {path!r} must hold a JSON object; got {type(info).__name__}.")
    _check_schedule(info, path)
    if expect:
        bad = []
        for key, want in expect.items():
            have = info.get(key)
            same = math.isclose(float(have), float(want)) if key == "guidance" else have == want
            if not same:
                bad.append(f"{key}={have!r} (this call: {want!r})")
        if bad:
            raise ValueError(
                f"schedule file {path!r} was learned for another set-up: " + ", ".join(bad) + ". Learn a schedule "
                "for this call (python -m compose.learn_schedule) or pass a matching file."
            )
    return info


SOURCE_ONLY_KEYS = ("val_distance", "val_distance_init", "val_distance_named", "test_size", "test_distance",
                    "test_distance_named", "probes", "teacher_probes", "command")  # fmt: skip


def transfer_schedule(source: str | os.PathLike | dict, expr: Any, **measured: Any) -> dict[str, Any]:
    """A schedule learned for one set-up, re-keyed for `expr` (e.g. one model's file used for OR / AND of it).

    The grid, network times, solver offsets, solver and NFE carry over unchanged, and the file's identity keys (model,
    operator, guidance) become `expr`'s, so `compose.sample` and the pipeline accept it for `expr`. The noise schedule
    must be the same: a grid is a list of times, and on another schedule they are other noise levels (ValueError).
    The keys that say how the grid was learned (train_size, teacher, loss, iters, ...) stay the source's; what was
    measured for the source (its distances, its Hutchinson probes, its command) moves under `transferred_from`,
    with the source's identity and file. `measured`: keys to add, e.g. distances measured for `expr`.
    """
    clash = sorted(set(measured) & {*CHECKED_KEYS, "grid", "network_times", "solver_offsets", "transferred_from"})
    if clash:
        raise ValueError(
            f"measured: {clash} are the schedule's own keys; pass measurements only (e.g. test_distance)."
        )
    if isinstance(source, dict):
        info = dict(source)
        path = info.pop("path", None)
        _check_schedule(info, str(path or "source"))
    else:
        info, path = load_schedule(source), source
    target = expression_keys(expr)
    target_schedule = repr(Composer(expr, method="ode").schedule)
    if info["schedule"] != target_schedule:
        raise ValueError(
            f"source: the schedule was learned on the noise schedule {info['schedule']}, the expression's models use "
            f"{target_schedule}; its times would be other noise levels there. Learn a schedule for this expression."
        )
    origin = {k: info[k] for k in ("model", "operator", "guidance", "date")}
    origin.update({k: info.pop(k) for k in SOURCE_ONLY_KEYS if k in info})
    if path is not None:
        origin["file"] = os.path.basename(str(path))
    info.update(target)
    info["transferred_from"] = origin
    info["date"] = _utc_now()
    info.update(measured)
    return info


def _utc_now() -> str:
    """The `date` of a schedule file: UTC, to the second."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_schedule(info: dict, path: str) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in info]
    if missing:
        raise ValueError(f"schedule file {path!r} lacks the keys {missing}; it was not written by compose.ld3.")
    grid = info["grid"]
    try:
        ts = check_grid(grid, f"the grid of schedule file {path!r}")
    except (TypeError, RuntimeError) as err:
        raise ValueError(f"the grid of schedule file {path!r} is not a list of numbers: {err}") from err
    if info["nfe"] != ts.numel() - 1:
        raise ValueError(f"schedule file {path!r}: nfe={info['nfe']} but the grid has {ts.numel() - 1} steps.")
    net = info.get("network_times")
    if net is not None and len(net) != info["nfe"]:
        raise ValueError(f"schedule file {path!r}: network_times has {len(net)} entries for nfe={info['nfe']}.")
    off = info.get("solver_offsets")
    if off is not None:
        try:
            off = torch.as_tensor(off, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"schedule file {path!r}: solver_offsets is not a table of numbers ({err}).") from err
        check_solver_offsets(off, info["solver"], info["nfe"], f"the solver_offsets of schedule file {path!r}")


def solver_offset_mask(solver: str, nfe: int) -> torch.Tensor:
    """(nfe, 3) 1 where a learned solver coefficient is used, 0 where the solver has nothing to offset.

    Row k: column 0 offsets the 2M step's rho (1/2) from ts[k], used from k = 1 (step 0 is first order); columns 1-2
    offset the UniC corrector's (rho_0, rho_1) that recomputes the state at ts[k] ("unipc" only): rho_1 from k = 1,
    rho_0 from k = 2 (the first corrector is of order 1).
    """
    mask = torch.zeros(nfe, 3, dtype=torch.float64)
    mask[1:, 0] = 1.0
    if solver == "unipc":
        mask[1:, 2] = 1.0
        mask[2:, 1] = 1.0
    return mask


def check_solver_offsets(off: Any, solver: str, nfe: int, name: str) -> None:
    """Learned solver coefficients must be a finite (nfe, 3) table, zero where the solver uses none."""
    if solver not in ("dpm2m", "unipc"):
        raise ValueError(f"{name}: learned solver coefficients exist for 'dpm2m' and 'unipc', not solver={solver!r}.")
    off = torch.as_tensor(off, dtype=torch.float64)
    if off.shape != (nfe, 3):
        raise ValueError(f"{name} must have shape ({nfe}, 3) (one row per step); got {tuple(off.shape)}.")
    if not bool(torch.isfinite(off).all()):
        raise ValueError(f"{name} must be finite; got {off.tolist()}.")
    unused = off.detach() * (1.0 - solver_offset_mask(solver, nfe))
    if bool((unused != 0).any()):
        raise ValueError(
            f"{name}: the entries the {solver} solver does not use must be 0 (row 0; for unipc row 1 column 1; for "
            f"dpm2m columns 1-2); got {off.tolist()}."
        )


# ---------------------------------------------------------------------- the differentiable student
def _math_attention():
    """Forward-mode AD (JVP divergences) through attention needs the math SDPA backend (see the project NOTES)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - old torch
        import contextlib

        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _tracks_density(expr: Any) -> bool:
    return isinstance(expr, Expr) and any(isinstance(n, (OR, AND)) for n in expr.nodes())


def solve(
    expr: Any,
    x: torch.Tensor,
    ts: torch.Tensor,
    solver: str = "dpm2m",
    network_times: torch.Tensor | None = None,
    *,
    schedule: NoiseSchedule | None = None,
    divergence_kind: str | None = None,
    weight_grad: bool = False,
    generator: torch.Generator | None = None,
    probes: int = 1,
    solver_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Probability-flow ODE from ts[0] to ts[-1] with `solver` ("euler", "dpm2m" or "unipc"), differentiable in x, ts
    and the solver offsets.

    x: (n, ...) states at ts[0]; ts: (N + 1,) decreasing times (may require grad); network_times: (N,) times fed
    to the models (default ts[:-1]). Returns (n, ...) states at ts[-1]. OR / AND coefficients are computed from
    densities tracked along the way (exact divergences for d <= 16, else `probes` Hutchinson probes per step, shared
    by the models, as `compose.sample`'s `probes`). weight_grad=False
    detaches them (the grid moves the trajectory, not the weights); True lets gradients flow through the tracked
    log-densities, the divergences included, into the weights (through the states; the log-density increments'
    explicit dependence on the step sizes stays detached). Same values either way. generator: draws the Hutchinson
    probes (default: torch's global RNG). solver_offsets: None or (N, 3) learned solver coefficients (see
    `check_solver_offsets`; "dpm2m" / "unipc" only).
    """
    from .sampling import SOLVER_ORDER, dpm2m_step, unic_step

    if solver not in SOLVER_ORDER:
        raise ValueError(f"solver={solver!r} is not known; use one of {tuple(SOLVER_ORDER)}.")
    _check_probes(probes, "probes")
    if solver_offsets is not None:
        check_solver_offsets(solver_offsets, solver, ts.numel() - 1, "solver_offsets")
    composer = Composer(expr, schedule=schedule, method="ode")
    sch = composer.schedule
    leaves = composer.leaves
    tracks = _tracks_density(expr)
    kind = _divergence_kind(divergence_kind, x)
    log_q = composer.initial_log_q(x if weight_grad else x.detach(), float(ts[0].detach()))
    x0_prev = h_prev = x0_prev2 = x_c = None
    n = x.shape[0]
    for k in range(ts.numel() - 1):
        t_cur, t_next = ts[k], ts[k + 1]
        t_in = t_cur if network_times is None else network_times[k]
        eps = torch.stack([model_eps(m, x, t_in) for m in leaves])
        if tracks:
            xd, t_d = (x if weight_grad else x.detach()), t_in.detach()
            fd = 1e-3 * float(sch.sigma(t_d))  # hutchinson_fd step, as in compose.sample
            zeta = None if kind == "exact" else rademacher((probes, *x.shape), generator, x.dtype, x.device)
            with _math_attention():
                div = torch.stack(
                    [
                        divergence(lambda y, m=m, tt=t_d: model_eps(m, y, tt), xd, kind=kind, probes=zeta, fd_eps=fd)
                        for m in leaves
                    ]
                )
            div = div if weight_grad else div.detach()
        else:
            div = torch.zeros(len(leaves), n, dtype=torch.float64)
        x_w, eps_w = (x, eps) if weight_grad else (x.detach(), eps.detach())
        out = composer.step(x_w, float(t_cur.detach()), float(t_next.detach()), eps_w, log_q, div_eps=div)
        c = out.coeffs.to(eps.dtype)
        eps_bar = torch.einsum("nl,ln...->n...", c, eps)
        sigma, alpha = sch.sigma(t_cur), sch.alpha(t_cur)
        if solver == "euler":
            h = t_cur - t_next
            f, g2_over_sigma = sch.f(t_cur), sch.g2_over_sigma2(t_cur) * sigma
            x_next = x + bcast(h * -f, x).to(x.dtype) * x - bcast(h * 0.5 * g2_over_sigma, x).to(x.dtype) * eps_bar
            log_q = out.log_q
        else:
            x0 = (x - bcast(sigma, x).to(x.dtype) * eps_bar) / bcast(alpha, x).to(x.dtype)
            x_from = x
            pred_off = corr_off = None
            if solver_offsets is not None:
                pred_off, corr_off = solver_offsets[k, 0], solver_offsets[k, 1:]
            if solver == "unipc" and x0_prev is not None:  # UniC: recompute the state at t_cur with x0
                t_prev2 = ts[k - 2] if x0_prev2 is not None else None
                x_from = unic_step(x_c, x0_prev, x0, x0_prev2, t_prev2, ts[k - 1], t_cur, sch, corr_off)
            x_next = dpm2m_step(x_from, x0, x0_prev, t_cur, t_next, sch, h_prev, pred_off)
            s = -eps_w.reshape(len(leaves), n, -1).to(torch.float64) / float(sigma.detach())
            dx = ((x_next if weight_grad else x_next.detach()) - out.x).reshape(n, -1).to(torch.float64)
            log_q = out.log_q + torch.einsum("lnd,nd->nl", s, dx)
            x0_prev2, x0_prev, x_c = x0_prev, x0, x_from
            h_prev = 0.5 * (sch.log_snr(t_next) - sch.log_snr(t_cur))
        x = x_next
    return x


def _divergence_kind(divergence_kind: str | None, x: torch.Tensor) -> str:
    """The divergence `solve` uses for density tracking: the one asked for, else exact for d <= 16, else Hutchinson."""
    return divergence_kind or ("exact" if x[0].numel() <= 16 else "hutchinson")


def _check_probes(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer (Hutchinson probes per step); got {value!r}.")


# ---------------------------------------------------------------------- grid parametrisation
def grid_from_params(schedule: NoiseSchedule, xi: torch.Tensor, t_max: float, t_min: float) -> torch.Tensor:
    """(N + 1,) grid whose log-SNR gaps are softmax(xi) (N,) of [lambda(t_max), lambda(t_min)]; differentiable."""
    lam0, lam1 = float(schedule.log_snr(t_max)), float(schedule.log_snr(t_min))
    frac = torch.cumsum(torch.softmax(xi.to(torch.float64), 0), 0)
    lam = lam0 + (lam1 - lam0) * frac[:-1]
    t_b = schedule.t_from_log_snr(lam.detach())
    if schedule.kind == "discrete":
        # bisection has no gradient: one Newton step through lambda(t) gives dt/dlambda = 1 / lambda'(t)
        t_inner = t_b + (lam - lam.detach()) / (-schedule.g2_over_sigma2(t_b))
    else:
        t_inner = schedule.t_from_log_snr(lam)
    one = torch.ones(1, dtype=torch.float64)
    return torch.cat([one * t_max, t_inner, one * t_min])


def params_from_grid(schedule: NoiseSchedule, ts: torch.Tensor) -> torch.Tensor:
    """Inverse of `grid_from_params`: xi (N,) = log of the log-SNR gaps of `ts` (up to an additive constant)."""
    lam = schedule.log_snr(ts)
    gaps = (lam[1:] - lam[:-1]).clamp_min(1e-12)
    return gaps.log()


def _shift_widths(ts: torch.Tensor) -> torch.Tensor:
    """(N,) how far each network time may move from t_k: half the smaller of its two adjacent gaps."""
    gaps = ts[:-1] - ts[1:]
    return 0.5 * torch.minimum(torch.cat([gaps[:1], gaps[:-1]]), gaps)


def network_times_from_params(ts: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(N,) network times t_k + 0.5 * (smallest adjacent gap) * tanh(s_k), kept in [t_N, t_0]."""
    return (ts[:-1] + _shift_widths(ts) * torch.tanh(s)).clamp(float(ts[-1].detach()), float(ts[0].detach()))


def params_from_network_times(ts: torch.Tensor, network_times: Any) -> torch.Tensor:
    """Inverse of `network_times_from_params` (s (N,); shifts at the edge of their range are pulled just inside)."""
    u = (torch.as_tensor(network_times, dtype=torch.float64) - ts[:-1]) / _shift_widths(ts)
    return torch.atanh(u.clamp(-0.999, 0.999))


# ---------------------------------------------------------------------- learning
@dataclass
class LD3Result:
    """A learned schedule: grid (N + 1,), network_times (N,) or None, solver_offsets (N, 3) or None, and how it was
    learned."""

    grid: torch.Tensor
    network_times: torch.Tensor | None
    val_loss: float
    val_loss_init: float
    train_losses: list = field(default_factory=list)
    seconds: float = 0.0
    info: dict = field(default_factory=dict)
    solver_offsets: torch.Tensor | None = None


def learn_schedule(
    expr: Any,
    nfe: int,
    x_train: torch.Tensor,
    x_val: torch.Tensor,
    *,
    solver: str = "dpm2m",
    teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
    teacher_steps: int = 200,
    init: str | dict = "log_snr",
    time_shift: bool = False,
    solver_offsets: bool = False,
    divergence_kind: str | None = None,
    weight_grad: bool = True,
    iters: int = 200,
    lr: float = 0.05,
    batch_size: int = 50,
    ball: float | None = None,
    generator: torch.Generator | None = None,
    probe_seed: int = 0,
    probes: int = 1,
    teacher_probes: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> LD3Result:
    """Learn an `nfe`-step grid for `expr` (a model or composed expression) and `solver` ("euler", "dpm2m", "unipc").

    x_train: (n, ...) and x_val: (m, ...) starting noises at the schedule's t_max (e.g. sigma_T * randn).
    teacher: maps x_T to the target states at t_min; default DPM-Solver++(2M) with `teacher_steps` log-SNR steps.
    init: the named grid the parameters start from, "best": the named grid closest to the teacher on x_val (every
        named grid's validation distance is recorded in the result's info either way), or a schedule (a dict with
        "grid" and optionally "network_times", e.g. `load_schedule(path)` of a file learned for one of the
        composed models: a warm start; its network times start the time shift's, and are dropped when
        time_shift is False; its solver offsets likewise with solver_offsets).
    time_shift: learn the decoupled network times too.
    solver_offsets: learn the solver's coefficients too ("dpm2m" / "unipc"): per step, an offset to the 2M step's
        extrapolation weight and, for UniPC, to the corrector's two weights (`check_solver_offsets`), starting from
        0 (the solver itself) or from the init schedule's. Beyond LD3 (which learns times only), in the spirit of
        learned solvers; the file then runs only with its own solver, as every file does.
    divergence_kind: for OR / AND (density tracking), "exact", "hutchinson" or "hutchinson_fd" (default exact for
        d <= 16, else hutchinson).
    weight_grad: for OR / AND, let the gradient flow through the tracked densities into the per-step weights (see
        `solve`); False treats the weights as constants (cheaper: no backward through the divergences).
    ball: r of the relaxed loss (x'_T within r * sigma_T of x_T); default 1e-3 d / nfe^2. iters: Adam steps.
    generator: draws the training batches and, for OR / AND with Hutchinson divergences, the training probes.
    probe_seed: every validation (the named grids, each iterate) uses the same Hutchinson probes, drawn from this
        seed (common random numbers: the comparison between grids is not a comparison between probe draws).
    probes: Hutchinson probes per step of the student (OR / AND with Hutchinson divergences; each costs one forward
        pass or JVP per model, like `compose.sample`'s `probes`). teacher_probes: the same for the default teacher
        (default `probes`); more probes make the reference less dependent on its probe draw.
    """
    from .sampling import SOLVER_ORDER

    if solver not in SOLVER_ORDER:
        raise ValueError(f"solver={solver!r} is not known; use one of {tuple(SOLVER_ORDER)}.")
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < SOLVER_ORDER[solver]:
        raise ValueError(
            f"nfe={nfe!r} is too small for solver={solver!r} (order {SOLVER_ORDER[solver]}); use "
            f"nfe >= {SOLVER_ORDER[solver]}."
        )
    start_ts = start_net = start_off = None
    if solver_offsets and solver not in ("dpm2m", "unipc"):
        raise ValueError(f"solver_offsets=True needs solver 'dpm2m' or 'unipc' (multistep); got solver={solver!r}.")
    if isinstance(init, dict):
        if "grid" not in init:
            raise ValueError("init: a schedule dict needs a 'grid' (e.g. compose.ld3.load_schedule(path)).")
        start_ts = torch.as_tensor(init["grid"], dtype=torch.float64)
        start_net = init.get("network_times")
        start_off = init.get("solver_offsets")
        init = str(init.get("path", "schedule"))
    elif init not in GRIDS and init != "best":
        raise ValueError(f"init={init!r} is not a named grid; use one of {GRIDS}, 'best' or a schedule dict.")
    _check_probes(probes, "probes")
    teacher_probes = probes if teacher_probes is None else teacher_probes
    _check_probes(teacher_probes, "teacher_probes")
    if x_train.shape[1:] != x_val.shape[1:] or x_train.shape[0] < 1 or x_val.shape[0] < 1:
        raise ValueError("x_train and x_val must be non-empty batches of the same sample shape.")
    if not (iters >= 0 and lr > 0 and batch_size >= 1):
        raise ValueError(f"need iters >= 0, lr > 0, batch_size >= 1; got {iters}, {lr}, {batch_size}.")
    sch = Composer(expr, method="ode").schedule
    t_max, t_min = sch.t_max, sch.t_min
    d = x_train[0].numel()
    r = 1e-3 * d / nfe**2 if ball is None else float(ball)
    if r < 0:
        raise ValueError(f"ball must be >= 0; got {ball}.")
    sigma_T = float(sch.sigma(t_max))
    start = time.time()

    if teacher is None:
        t_teacher = make_grid(sch, teacher_steps, "log_snr")

        def teacher(x):  # noqa: F811 - the default teacher
            with torch.no_grad():
                return solve(expr, x, t_teacher, "dpm2m", divergence_kind=divergence_kind, probes=teacher_probes)

    with torch.no_grad():
        y_train, y_val = teacher(x_train), teacher(x_val)
    t_teach = time.time() - start
    if progress:
        log(f"ld3: teacher on {x_train.shape[0]} + {x_val.shape[0]} noises in {t_teach:.1f} s")

    def run(x, ts, net=None, off=None, gen=generator):
        grad = weight_grad and torch.is_grad_enabled()
        return solve(
            expr, x, ts, solver, net, divergence_kind=divergence_kind, weight_grad=grad, generator=gen, probes=probes,
            solver_offsets=off,
        )  # fmt: skip

    def val_distance(ts, net=None, off=None) -> float:
        with torch.no_grad():
            out = run(x_val, ts, net, off, torch.Generator().manual_seed(probe_seed))
            return float((out - y_val).reshape(x_val.shape[0], -1).norm(dim=1).mean())

    named = {k: val_distance(make_grid(sch, nfe, k)) for k in GRIDS}
    if init == "best":
        init = min(GRIDS, key=lambda k: named[k])
    ts0 = make_grid(sch, nfe, init) if start_ts is None else start_ts
    if ts0.shape != (nfe + 1,) or abs(float(ts0[0]) - t_max) > 1e-6 or abs(float(ts0[-1]) - t_min) > 1e-6:
        raise ValueError(
            f"init: the start grid must have nfe + 1 = {nfe + 1} times from t_max = {t_max} to t_min = {t_min} "
            f"(this schedule's ends); got {ts0.numel()} times from {float(ts0[0])} to {float(ts0[-1])}."
        )
    xi = params_from_grid(sch, ts0).clone().requires_grad_(True)
    s0 = torch.zeros(nfe, dtype=torch.float64)
    if start_net is not None and time_shift:
        s0 = params_from_network_times(grid_from_params(sch, xi.detach(), t_max, t_min), start_net)
    s = s0.clone().requires_grad_(True)
    mask = solver_offset_mask(solver, nfe)
    o0 = torch.zeros(nfe, 3, dtype=torch.float64)
    if start_off is not None and solver_offsets:
        check_solver_offsets(start_off, solver, nfe, "init: the schedule's solver_offsets")
        o0 = torch.as_tensor(start_off, dtype=torch.float64).clone()
    o = o0.clone().requires_grad_(True)
    delta = torch.zeros_like(x_train, requires_grad=True)
    params = ([xi, s] if time_shift else [xi]) + ([o] if solver_offsets else [])
    opt = torch.optim.Adam([{"params": params, "lr": lr}, {"params": [delta], "lr": lr * max(r * sigma_T, 1e-12)}])

    def current():
        ts = grid_from_params(sch, xi, t_max, t_min)
        return ts, (network_times_from_params(ts, s) if time_shift else None), (o * mask if solver_offsets else None)

    def val_loss() -> float:
        with torch.no_grad():
            return val_distance(*current())

    best = val_loss()
    init_loss = best
    best_state = (xi.detach().clone(), s.detach().clone(), o.detach().clone())
    losses = []
    n = x_train.shape[0]
    if progress:
        log(f"ld3: nfe {nfe}, solver {solver}, init {init}: validation distance {init_loss:.5f}")
    for it in range(iters):
        idx = torch.randperm(n, generator=generator)[:batch_size]
        ts, net, off = current()
        x_start = x_train[idx] + delta[idx]
        out = run(x_start, ts, net, off)
        loss = (out - y_train[idx]).reshape(len(idx), -1).norm(dim=1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # project x'_T back into its ball
            norm = delta.reshape(n, -1).norm(dim=1).clamp_min(1e-30)
            delta.mul_(bcast((r * sigma_T / norm).clamp(max=1.0), delta))
        losses.append(float(loss.detach()))
        if (it + 1) % max(1, iters // 10) == 0 or it + 1 == iters:
            v = val_loss()
            if v < best:
                best, best_state = v, (xi.detach().clone(), s.detach().clone(), o.detach().clone())
            if progress:
                log(f"ld3: iter {it + 1}/{iters} train {sum(losses[-10:]) / len(losses[-10:]):.5f} val {v:.5f}")
    with torch.no_grad():
        xi.copy_(best_state[0])
        s.copy_(best_state[1])
        o.copy_(best_state[2])
        ts, net, off = current()
    seconds = time.time() - start
    hutchinson = _tracks_density(expr) and _divergence_kind(divergence_kind, x_val) != "exact"
    info = {
        **expression_keys(expr),
        "format": FORMAT,
        "solver": solver,
        "nfe": nfe,
        "schedule": repr(sch),
        "grid": [float(v) for v in ts],
        "network_times": None if net is None else [float(v) for v in net],
        **({"solver_offsets": [[float(v) for v in row] for row in off]} if off is not None else {}),
        "train_size": int(x_train.shape[0]),
        "val_size": int(x_val.shape[0]),
        "teacher": f"dpm2m, {teacher_steps} log_snr steps" if teacher_steps else "custom",
        "loss": "l2",
        "ball_r": r,
        "weight_grad": bool(weight_grad) and _tracks_density(expr),
        **({"probes": probes, "teacher_probes": teacher_probes} if hutchinson else {}),
        "init": init,
        "iters": iters,
        "lr": lr,
        "val_distance": best,
        "val_distance_init": init_loss,
        "val_distance_named": named,
        "seconds": round(seconds, 2),
        "date": _utc_now(),
    }
    return LD3Result(
        grid=ts.detach(),
        network_times=None if net is None else net.detach(),
        solver_offsets=None if off is None else off.detach(),
        val_loss=best,
        val_loss_init=init_loss,
        train_losses=losses,
        seconds=seconds,
        info=info,
    )


# ---------------------------------------------------------------------- command line
def toy_models(schedule: str = "vp_linear") -> dict[str, Any]:
    """The two 2-D mixtures of the tests: A = {(-2, 0), (2, 0)}, B = {(2, 0), (0, 3)}, std 0.5."""
    from .toy import GaussianMixture

    sch = {"vp_linear": NoiseSchedule.vp_linear, "cosine": NoiseSchedule.cosine, "ot": NoiseSchedule.ot}[schedule]()
    return {
        "A": GaussianMixture([[-2.0, 0.0], [2.0, 0.0]], 0.5, schedule=sch, name="A"),
        "B": GaussianMixture([[2.0, 0.0], [0.0, 3.0]], 0.5, schedule=sch, name="B"),
    }


class DiffusersUnconditional:
    """A diffusers unconditional folder (unet/ + scheduler/) as a compose model (eps(x, t), schedule)."""

    def __init__(self, folder: str) -> None:
        from diffusers import DDPMPipeline

        from .predictions import normalize_prediction_type, to_eps

        pipe = DDPMPipeline.from_pretrained(folder)
        self.unet = pipe.unet.eval().requires_grad_(False)
        self.schedule = NoiseSchedule.from_scheduler(pipe.scheduler)
        flow = "FlowMatch" in type(pipe.scheduler).__name__
        self.prediction_type = (
            "flow" if flow else normalize_prediction_type(pipe.scheduler.config.get("prediction_type", "epsilon"))
        )
        self._to_eps = to_eps
        c, s = self.unet.config.in_channels, self.unet.config.sample_size
        self.sample_shape = (c, s, s)
        self.name = os.path.basename(os.path.normpath(folder))

    def eps(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        ts = self.schedule.timestep(t).to(torch.float32).expand(x.shape[0])
        pred = self.unet(x.to(torch.float32), ts).sample.to(x.dtype)
        return self._to_eps(pred, x, t, self.schedule, self.prediction_type)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Learn an N-step schedule (LD3) and write it as a JSON schedule file.")
    p.add_argument(
        "--model",
        nargs="+",
        required=True,
        help="toy:A / toy:B (2-D mixtures) or diffusers unconditional folders (e.g. model_cards/...)",
    )
    p.add_argument("--operator", default="none", choices=("none", "or", "and", "average"))
    p.add_argument("--nfe", type=int, default=None, help="steps of the grid (required unless --transfer)")
    p.add_argument("--solver", default=None, choices=("euler", "dpm2m", "unipc"), help="default dpm2m")
    p.add_argument("--teacher-steps", type=int, default=200)
    p.add_argument("--train", type=int, default=100, help="training noises")
    p.add_argument("--val", type=int, default=50, help="validation noises")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument(
        "--init",
        default="best",
        help=f"start grid: one of {GRIDS}, best (the closest named grid) or a schedule file (a warm start, e.g. "
        "one model's file for OR / AND of it)",
    )
    p.add_argument(
        "--divergence",
        default=None,
        choices=("exact", "hutchinson", "hutchinson_fd"),
        help="divergence estimate for OR / AND density tracking (default: exact for d <= 16)",
    )
    p.add_argument("--probes", type=int, default=1, help="OR / AND: Hutchinson probes per step of the student")
    p.add_argument("--teacher-probes", type=int, default=None, help="the same for the teacher (default --probes)")
    p.add_argument("--time-shift", action="store_true", help="learn the decoupled network times too")
    p.add_argument(
        "--solver-offsets",
        action="store_true",
        help="learn the solver's coefficients too (dpm2m / unipc: offsets to the multistep and corrector weights)",
    )
    p.add_argument(
        "--detach-weights",
        action="store_true",
        help="OR / AND: treat the per-step weights as constants in the backward pass (cheaper, usually worse)",
    )
    p.add_argument("--toy-schedule", default="vp_linear", choices=("vp_linear", "cosine", "ot"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--transfer",
        default=None,
        metavar="FILE",
        help="no learning: re-key this schedule file (e.g. one model's) for --model / --operator and write it to "
        "--out (grid, network times, solver and NFE unchanged; compose.ld3.transfer_schedule)",
    )
    p.add_argument("--out", required=True, help="the JSON schedule file to write")
    a = p.parse_args(argv)
    if a.nfe is None and a.transfer is None:
        p.error("--nfe is required (the number of steps of the grid to learn).")
    solver = a.solver or "dpm2m"
    init: str | dict = a.init
    if a.init not in (*GRIDS, "best"):
        if not a.init.endswith(".json") and not os.path.exists(a.init):
            p.error(f"--init {a.init}: not a named grid {GRIDS}, 'best' or a schedule file.")
        init = dict(load_schedule(a.init, {"solver": solver, "nfe": a.nfe}), path=a.init)  # names what is wrong
    torch.set_num_threads(a.threads)
    models = []
    for spec in a.model:
        if spec.startswith("toy:"):
            toys = toy_models(a.toy_schedule)
            if spec[4:] not in toys:
                raise ValueError(f"--model {spec}: the toy models are {['toy:' + k for k in toys]}.")
            models.append(toys[spec[4:]])
        else:
            models.append(DiffusersUnconditional(spec))
    ops = {"or": OR, "and": AND}
    if a.operator == "none":
        if len(models) != 1:
            raise ValueError("--operator none takes one --model; give --operator or/and/average for several.")
        expr = models[0]
    elif a.operator == "average":
        from .operators import Average

        expr = Average(*models)
    else:
        expr = ops[a.operator](*models)
    command = "python -m compose.learn_schedule " + " ".join(sys.argv[1:] if argv is None else argv)
    if a.transfer is not None:
        given = {k: v for k, v in (("nfe", a.nfe), ("solver", a.solver)) if v is not None}
        source = dict(load_schedule(a.transfer, given), path=a.transfer)  # another NFE / solver: the message says so
        info = transfer_schedule(source, expr, command=command)
        save_schedule(a.out, info)
        print(f"wrote {a.out}: the grid of {a.transfer} for {info['operator']} ({info['solver']}, NFE {info['nfe']})")
        return
    sch = Composer(expr, method="ode").schedule
    g = torch.Generator().manual_seed(a.seed)
    shape = models[0].sample_shape
    dtype = torch.float64 if len(shape) == 1 else torch.float32
    noise = torch.randn((a.train + a.val, *shape), generator=g, dtype=torch.float64).to(dtype)
    x_all = noise * float(sch.sigma(sch.t_max))
    res = learn_schedule(
        expr,
        a.nfe,
        x_all[: a.train],
        x_all[a.train :],
        solver=solver,
        teacher_steps=a.teacher_steps,
        init=init,
        time_shift=a.time_shift,
        solver_offsets=a.solver_offsets,
        divergence_kind=a.divergence,
        weight_grad=not a.detach_weights,
        iters=a.iters,
        lr=a.lr,
        batch_size=a.batch,
        generator=g,
        probes=a.probes,
        teacher_probes=a.teacher_probes,
    )
    res.info["command"] = command
    save_schedule(a.out, res.info)
    print(
        f"wrote {a.out}: validation distance {res.val_loss:.5f} (init {a.init}: {res.val_loss_init:.5f}), "
        f"{res.seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
