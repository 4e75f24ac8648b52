"""Learned step schedules (LD3, Tong et al., arXiv 2405.15506; docs/MATH.md section 6).

An N-evaluation grid for one (model or composed expression, solver, NFE, guidance) is learned by distilling a
many-step teacher into the N-step student. The grid is t_max = t_0 > ... > t_{N-1} = t_min > t_N = 0: N network
evaluations, the last step lands on the data (x0_hat), as every grid of `compose.grids`.

- parameters xi (N - 1,): the N - 1 gaps between the evaluation times are softmax(xi) of the log-SNR span between
  the fixed endpoints lambda(t_max) and lambda(t_min), so the grid is strictly decreasing by construction.
  Optional decoupled network times: a second vector s (N,) moves the time fed to the network at step k by
  0.5 * (smallest adjacent gap) * tanh(s_k);
- the teacher (DPM-Solver++(2M), `teacher_steps` log-SNR steps, or any `compose.sample` set-up) runs once on the
  training and validation noises;
- the relaxed loss: || student(x'_T) - teacher(x_T) ||_2 with x'_T free inside the ball of radius r * sigma_T
  around x_T (r = 1e-3 d / N^2 by default), minimised over xi, s and x'_T with Adam;
- validation: the plain distance || student(x_T) - teacher(x_T) || on held-out noises (no ball), the number the
  benchmark reports; the parameters with the best validation distance are kept.

Gradients flow through the student's steps and every model call. For OR and AND the per-step coefficients come
from the tracked densities (`compose.Composer`); by default (`weight_grad=True`) the gradient also flows through
those densities (the divergences included) into the weights, which is what makes OR learnable at NFE 4 on the 2-D
mixtures (docs/benchmarks/schedules.md); `weight_grad=False` treats them as constants
(a straight-through approximation, cheaper: no backward through the divergences).

A schedule is stored as JSON (`compose.schedule_files`: `save_schedule` / `load_schedule`); loading checks the grid
and, given `expect`, that the file was learned for the same model, operator, solver, NFE and guidance.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .composer import Composer, leaf_predictor
from .grids import make_grid
from .loop import TorchDraws, run
from .operators import Expr
from .options import GRIDS, SOLVER_TABLE, check_probes, check_solver
from .predictions import bcast
from .schedule import NoiseSchedule

# Schedule files live in compose.schedule_files; their names are kept here, where LD3's users look for them.
from .schedule_files import (  # noqa: F401
    CHECKED_KEYS,
    FORMAT,
    REQUIRED_KEYS,
    SOURCE_ONLY_KEYS,
    check_solver_offsets,
    expression_keys,
    load_schedule,
    save_schedule,
    solver_offset_mask,
    transfer_schedule,
    utc_now,
)


# ---------------------------------------------------------------------- the differentiable student
def _math_attention():
    """Forward-mode AD (JVP divergences) through attention needs the math SDPA backend (docs/notes.md)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - old torch
        import contextlib

        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _tracks_density(expr: Any) -> bool:
    return isinstance(expr, Expr) and any(n.reads_log_q for n in expr.nodes())


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
    """Probability-flow ODE along ts with `solver` ("euler", "ddim", "dpm2m" or "unipc"), differentiable in x, ts
    and the solver offsets: `compose.loop.run`, the loop every sampler uses.

    x: (n, ...) states at ts[0]; ts: (N + 1,) decreasing times (may require grad; ending at 0: the data);
    network_times: (N,) times fed to the models (default ts[:-1]). Returns (n, ...) states at ts[-1]. OR / AND
    coefficients are computed from densities tracked along the way (exact divergences for d <= 16, else `probes`
    Hutchinson probes per step, shared by the models, as `compose.sample`'s `probes`). weight_grad=False
    detaches them (the grid moves the trajectory, not the weights); True lets gradients flow through the tracked
    log-densities, the divergences included, into the weights (through the states; the log-density increments'
    explicit dependence on the step sizes stays detached). Same values either way. generator: draws the Hutchinson
    probes (default: torch's global RNG). solver_offsets: None or (N, 3) learned solver coefficients (see
    `check_solver_offsets`; "dpm2m" / "unipc" only).
    """
    check_solver(solver, "ode")
    check_probes(probes)
    if solver_offsets is not None:
        check_solver_offsets(solver_offsets, solver, ts.numel() - 1, "solver_offsets")
    composer = Composer(expr, schedule=schedule, method="ode")
    sch, leaves = composer.schedule, composer.leaves
    tracks = _tracks_density(expr)
    kind = _divergence_kind(divergence_kind, x)
    predict = leaf_predictor(
        leaves, sch, divergence=kind if tracks else None, fd_eps=1e-3, weight_grad=weight_grad, context=_math_attention
    )
    log_q = composer.initial_log_q(x if weight_grad else x.detach(), float(ts[0].detach()))
    hutch = probes if tracks and kind != "exact" else None
    tr = run(
        composer,
        predict,
        x,
        ts,
        log_q,
        solver=solver,
        draws=TorchDraws(generator),
        probes=hutch,
        network_times=network_times,
        offsets=solver_offsets,
        weight_grad=weight_grad,
    )
    return tr.x


def _divergence_kind(divergence_kind: str | None, x: torch.Tensor) -> str:
    """The divergence `solve` uses for density tracking: the one asked for, else exact for d <= 16, else Hutchinson."""
    return divergence_kind or ("exact" if x[0].numel() <= 16 else "hutchinson")


# ---------------------------------------------------------------------- grid parametrisation
def grid_from_params(schedule: NoiseSchedule, xi: torch.Tensor, t_max: float, t_min: float) -> torch.Tensor:
    """(N + 1,) grid of N evaluations: t_max, the N - 2 inner times whose log-SNR gaps are softmax(xi) (N - 1,) of
    [lambda(t_max), lambda(t_min)], t_min, and 0 (the step to the data); differentiable in xi."""
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
    return torch.cat([one * t_max, t_inner, one * t_min, 0.0 * one])


def params_from_grid(schedule: NoiseSchedule, ts: torch.Tensor) -> torch.Tensor:
    """Inverse of `grid_from_params`: xi (N - 1,) = log of the log-SNR gaps of ts[:-1] (up to a constant)."""
    lam = schedule.log_snr(ts[:-1])
    gaps = (lam[1:] - lam[:-1]).clamp_min(1e-12)
    return gaps.log()


def _shift_widths(ts: torch.Tensor) -> torch.Tensor:
    """(N,) how far each network time may move from t_k: half the smaller of its two adjacent gaps."""
    gaps = ts[:-1] - ts[1:]
    return 0.5 * torch.minimum(torch.cat([gaps[:1], gaps[:-1]]), gaps)


def network_times_from_params(ts: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(N,) network times t_k + 0.5 * (smallest adjacent gap) * tanh(s_k), kept in [t_{N-1}, t_0] (never at the
    data, t = 0, where the network is not defined)."""
    return (ts[:-1] + _shift_widths(ts) * torch.tanh(s)).clamp(float(ts[-2].detach()), float(ts[0].detach()))


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


def _learned(ts: torch.Tensor, net: torch.Tensor | None, off: torch.Tensor | None) -> dict[str, Any]:
    """The learned parameters as schedule-file keys (plain floats)."""
    out: dict[str, Any] = {"grid": [float(v) for v in ts], "network_times": None}
    if net is not None:
        out["network_times"] = [float(v) for v in net]
    if off is not None:
        out["solver_offsets"] = [[float(v) for v in row] for row in off]
    return out


def _distances(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(n,) L2 distance of every sample to its reference."""
    return (out - ref).reshape(out.shape[0], -1).norm(dim=1)


def _check_learn_inputs(nfe, solver, solver_offsets, init, x_train, x_val, iters, lr, batch_size) -> tuple:
    """ValueError for bad `learn_schedule` arguments; returns (init name, (grid, network times, offsets) or None)."""
    check_solver(solver, "ode")
    order = SOLVER_TABLE[solver].order
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < max(2, order):
        raise ValueError(
            f"nfe={nfe!r} is too small for solver={solver!r} (order {order}); use nfe >= {max(2, order)} (network "
            "evaluations, the last one before the step to the data)."
        )
    if solver_offsets and not SOLVER_TABLE[solver].learnable_offsets:
        names = " or ".join(repr(s.name) for s in SOLVER_TABLE.values() if s.learnable_offsets)
        raise ValueError(f"solver_offsets=True needs solver {names} (multistep); got solver={solver!r}.")
    start = None
    if isinstance(init, dict):
        if "grid" not in init:
            raise ValueError("init: a schedule dict needs a 'grid' (e.g. compose.ld3.load_schedule(path)).")
        start = (
            torch.as_tensor(init["grid"], dtype=torch.float64),
            init.get("network_times"),
            init.get("solver_offsets"),
        )
        init = str(init.get("path", "schedule"))
    elif init not in GRIDS and init != "best":
        raise ValueError(f"init={init!r} is not a named grid; use one of {GRIDS}, 'best' or a schedule dict.")
    if x_train.shape[1:] != x_val.shape[1:] or x_train.shape[0] < 1 or x_val.shape[0] < 1:
        raise ValueError("x_train and x_val must be non-empty batches of the same sample shape.")
    if not (iters >= 0 and lr > 0 and batch_size >= 1):
        raise ValueError(f"need iters >= 0, lr > 0, batch_size >= 1; got {iters}, {lr}, {batch_size}.")
    return init, start


class _StudentParams:
    """What LD3 learns: the grid's xi, the network times' s and the solver offsets o (the last two optional)."""

    def __init__(
        self,
        sch: NoiseSchedule,
        nfe: int,
        solver: str,
        ts0: torch.Tensor,
        time_shift: bool,
        solver_offsets: bool,
        start: tuple | None,
    ) -> None:
        self.sch, self.time_shift, self.use_offsets = sch, time_shift, solver_offsets
        t_max, t_min = sch.t_max, sch.t_min
        if (
            ts0.shape != (nfe + 1,)
            or abs(float(ts0[0]) - t_max) > 1e-6
            or abs(float(ts0[-2]) - t_min) > 1e-6
            or float(ts0[-1]) != 0.0
        ):
            raise ValueError(
                f"init: the start grid must have nfe + 1 = {nfe + 1} times from t_max = {t_max} through t_min = "
                f"{t_min} (this schedule's ends) to 0; got {ts0.numel()} times from {float(ts0[0])} to "
                f"{float(ts0[-1])}."
            )
        self.xi = params_from_grid(sch, ts0).clone().requires_grad_(True)
        s0 = torch.zeros(nfe, dtype=torch.float64)
        if start is not None and start[1] is not None and time_shift:
            s0 = params_from_network_times(self._grid(self.xi.detach()), start[1])
        self.s = s0.clone().requires_grad_(True)
        self.mask = solver_offset_mask(solver, nfe)
        o0 = torch.zeros(nfe, 3, dtype=torch.float64)
        if start is not None and start[2] is not None and solver_offsets:
            check_solver_offsets(start[2], solver, nfe, "init: the schedule's solver_offsets")
            o0 = torch.as_tensor(start[2], dtype=torch.float64).clone()
        self.o = o0.clone().requires_grad_(True)

    def _grid(self, xi: torch.Tensor) -> torch.Tensor:
        return grid_from_params(self.sch, xi, self.sch.t_max, self.sch.t_min)

    def trainable(self) -> list[torch.Tensor]:
        return ([self.xi, self.s] if self.time_shift else [self.xi]) + ([self.o] if self.use_offsets else [])

    def current(self) -> tuple:
        """(grid, network times or None, solver offsets or None) of the current parameters."""
        ts = self._grid(self.xi)
        net = network_times_from_params(ts, self.s) if self.time_shift else None
        return ts, net, (self.o * self.mask if self.use_offsets else None)

    def state(self) -> tuple:
        return tuple(v.detach().clone() for v in (self.xi, self.s, self.o))

    def load(self, state: tuple) -> None:
        with torch.no_grad():
            for v, saved in zip((self.xi, self.s, self.o), state, strict=True):
                v.copy_(saved)


def _fit(
    params: _StudentParams,
    student: Callable,
    val_distance: Callable,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    init_loss: float,
    radius: float,
    lr: float,
    iters: int,
    batch_size: int,
    generator: torch.Generator | None,
    log: Callable[[str], None] | None,
) -> tuple[float, list[float]]:
    """Adam on the relaxed loss: the student's parameters and x'_T within `radius` of every training noise x_T.

    Validates every iters / 10 steps and loads the parameters with the best validation distance (`init_loss` is
    the start's). Returns (that distance, the training losses)."""
    n = x_train.shape[0]
    delta = torch.zeros_like(x_train, requires_grad=True)
    opt = torch.optim.Adam(
        [{"params": params.trainable(), "lr": lr}, {"params": [delta], "lr": lr * max(radius, 1e-12)}]
    )
    best, best_state, losses = init_loss, params.state(), []
    for it in range(iters):
        idx = torch.randperm(n, generator=generator)[:batch_size]
        loss = _distances(student(x_train[idx] + delta[idx], *params.current()), y_train[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # project x'_T back into its ball
            norm = delta.reshape(n, -1).norm(dim=1).clamp_min(1e-30)
            delta.mul_(bcast((radius / norm).clamp(max=1.0), delta))
        losses.append(float(loss.detach()))
        if (it + 1) % max(1, iters // 10) == 0 or it + 1 == iters:
            v = val_distance(*params.current())
            if v < best:
                best, best_state = v, params.state()
            if log is not None:
                log(f"ld3: iter {it + 1}/{iters} train {sum(losses[-10:]) / len(losses[-10:]):.5f} val {v:.5f}")
    params.load(best_state)
    return best, losses


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
    teacher: maps x_T to the target states at the end of the grid (the data); default DPM-Solver++(2M) with
        `teacher_steps` log-SNR steps.
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
    init, start_sched = _check_learn_inputs(nfe, solver, solver_offsets, init, x_train, x_val, iters, lr, batch_size)
    check_probes(probes)
    teacher_probes = probes if teacher_probes is None else teacher_probes
    check_probes(teacher_probes, "teacher_probes")
    sch = Composer(expr, method="ode").schedule
    r = 1e-3 * x_train[0].numel() / nfe**2 if ball is None else float(ball)
    if r < 0:
        raise ValueError(f"ball must be >= 0; got {ball}.")
    sigma_T = float(sch.sigma(sch.t_max))
    start = time.time()
    if teacher is None:
        t_teacher = make_grid(sch, teacher_steps, "log_snr")

        def teacher(x):  # noqa: F811 - the default teacher
            return solve(expr, x, t_teacher, "dpm2m", divergence_kind=divergence_kind, probes=teacher_probes)

    with torch.no_grad():
        y_train, y_val = teacher(x_train), teacher(x_val)
    if progress:
        log(f"ld3: teacher on {x_train.shape[0]} + {x_val.shape[0]} noises in {time.time() - start:.1f} s")

    solve_kw = dict(divergence_kind=divergence_kind, probes=probes)

    def student(x, ts, net=None, off=None, gen=generator):
        grad = weight_grad and torch.is_grad_enabled()
        return solve(expr, x, ts, solver, net, weight_grad=grad, generator=gen, solver_offsets=off, **solve_kw)

    def val_distance(ts, net=None, off=None) -> float:
        with torch.no_grad():
            out = student(x_val, ts, net, off, torch.Generator().manual_seed(probe_seed))
            return float(_distances(out, y_val).mean())

    named = {k: val_distance(make_grid(sch, nfe, k)) for k in GRIDS}
    if init == "best":
        init = min(GRIDS, key=lambda k: named[k])
    start_grid = make_grid(sch, nfe, init) if start_sched is None else start_sched[0]
    params = _StudentParams(sch, nfe, solver, start_grid, time_shift, solver_offsets, start_sched)
    init_loss = val_distance(*params.current())
    if progress:
        log(f"ld3: nfe {nfe}, solver {solver}, init {init}: validation distance {init_loss:.5f}")
    best, losses = _fit(
        params,
        student,
        val_distance,
        x_train,
        y_train,
        init_loss,
        r * sigma_T,
        lr,
        iters,
        batch_size,
        generator,
        log if progress else None,
    )
    with torch.no_grad():
        ts, net, off = params.current()
    seconds = time.time() - start
    hutchinson = _tracks_density(expr) and _divergence_kind(divergence_kind, x_val) != "exact"
    info = {
        **expression_keys(expr),
        "format": FORMAT,
        "solver": solver,
        "nfe": nfe,
        "schedule": repr(sch),
        **_learned(ts, net, off),
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
        "date": utc_now(),
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
