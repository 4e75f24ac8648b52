"""`compose.sample`: run a composed expression of callable models along one shared trajectory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .engine import DIVERGENCES, Composer, check_grid, check_method, divergence, rademacher
from .grids import resolve_grid
from .models import model_eps, on_schedule
from .predictions import bcast
from .schedule import NoiseSchedule
from .smc import PoE, SMCResult, sample_smc

SOLVER_ORDER = {"euler": 1, "dpm2m": 2, "unipc": 3}
SOLVERS = tuple(SOLVER_ORDER)


def check_solver(solver: str, method: str) -> None:
    """ValueError unless `solver` is known and fits `method` (the higher-order solvers are ODE-only)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not known; use one of {SOLVERS}.")
    if solver != "euler" and method != "ode":
        raise ValueError(f"solver={solver!r} is an ODE solver; use method='ode' with it (or solver='euler').")


@dataclass
class SampleResult:
    """What `sample` returns.

    samples: (n, ...) states at the last grid time t_N.
    denoised: (n, ...) x0_hat of the composed prediction at t_N (a final denoising step).
    log_q: (n, L) float64, each leaf model's tracked log-density at t_N (leaves in `Composer.leaves` order).
    kappa: (steps, n, K) the weights of the outermost operator (below any `Guided`) at every step.
    coeffs: (steps, n, L) effective coefficient of every leaf's prediction at every step.
    node_kappa: node path ("root", "root.0", ...) -> (steps, n, K) weights of every operator node.
    timesteps: the grid (steps + 1,), float64.
    """

    samples: torch.Tensor
    denoised: torch.Tensor
    log_q: torch.Tensor
    kappa: torch.Tensor
    coeffs: torch.Tensor
    timesteps: torch.Tensor
    node_kappa: dict = field(default_factory=dict)


def sample(
    expr: Any,
    num_samples: int | None = None,
    x_T: torch.Tensor | None = None,
    timesteps: Any = None,
    steps: int | None = None,
    method: str = "sde",
    divergence: str = "hutchinson",
    probes: int = 1,
    generator: torch.Generator | None = None,
    *,
    grid: Any = "log_snr",
    solver: str = "euler",
    path: NoiseSchedule | str | None = None,
    fd_eps: float = 1e-3,
    control_variate: bool = True,
    dtype: torch.dtype = torch.float32,
    callback: Callable[[int, float, torch.Tensor, torch.Tensor], None] | None = None,
    progress: bool = False,
    **smc_options: Any,
) -> SampleResult | SMCResult:
    """Sample a composition of models (an operator expression, or one model) along one shared trajectory.

    Args:
        expr: `OR(...)`, `AND(...)`, `Average(...)`, `Product(...)`, `Guided(...)`, nested, or a single model.
        num_samples: n, when x_T is not given (x_T ~ N(0, sigma_{t_0}^2 I) then).
        x_T: (n, ...) starting states at the first grid time.
        timesteps: an explicit strictly decreasing grid in t; or `steps` with `grid`: a name in `compose.GRIDS`
            ("log_snr", "uniform", "karras", "ays_sd15", "ays_sdxl"), or the path of a learned JSON schedule file
            (`compose.ld3`; its grid, NFE, solver and model are checked against this call; its network times and
            learned solver coefficients, where it has them, are used).
        method: "sde" (Euler-Maruyama, Ito density estimator) or "ode" (the probability-flow ODE with a divergence
            estimate, stepped by `solver`).
        solver: for "ode": "euler", or "dpm2m" (DPM-Solver++(2M), Lu et al. 2022, on the composed x0_hat = x0 of the
            composed eps). The composed coefficients come from the Euler form of the step (the operators solve
            for kappa there); each model's log q is then moved along the step actually taken, by adding
            <s_i, dx_2M - dx_Euler> to the Euler increment (first order). OR (kappa from the tracked log q),
            average, product and CFG thus keep their meaning; AND equalises the Euler increments, so with dpm2m
            the equal-density condition holds only to first order in the step (the correction differs between
            models). "unipc": UniPC (Zhao et al. 2023, bh2): the same 2M step as predictor, then, once the models
            have been called at the predicted state, the UniC corrector recomputes that state from the previous one
            (order 3 on smooth flows, no extra network call; the models' outputs at the predicted state are kept).
            Its log q moves along the corrected step too, so the operators keep the same meaning as with "dpm2m".
        path: sample along another noise schedule than the models' (e.g. "ot" or `NoiseSchedule.ot()`): every
            model is re-parametrised with `compose.on_schedule` (same log-SNR, rescaled state), so the trajectory
            follows alpha = 1 - t, sigma = t with the same signal-to-noise ratios.
        divergence: for "ode": "hutchinson" (Rademacher probes, one forward-mode JVP per model per probe, probes
            shared across models), "hutchinson_fd" (the same probes, finite differences with step fd_eps * sigma_t),
            or "exact" (d JVPs per model; small d).
        probes: number of Hutchinson probes per step.
        generator: a torch.Generator for x_T, the SDE noise and the probes (same seed, same output).
        fd_eps: the finite-difference step of "hutchinson_fd", relative to sigma_t (e = fd_eps * sigma_t).
        control_variate: the common-mode variance reduction of the SDE density estimate (see `compose.engine`).
        dtype: dtype of the states when x_T is not given (densities are always accumulated in float64).
        callback: called as callback(step_index, t_next, x, log_q) after every step.
        smc_options: for a `compose.PoE` only (sampled by `compose.sample_smc`, which returns an `SMCResult`):
            num_particles, ess_threshold, resample_window, final, and the rejuvenation moves langevin_steps,
            langevin_step, langevin_after.
    """
    if isinstance(expr, PoE) or smc_options:
        if not isinstance(expr, PoE):
            raise ValueError(f"{sorted(smc_options)} are options of particle products; wrap the models in PoE(...).")
        kw = dict(grid=grid, control_variate=control_variate, dtype=dtype, callback=callback, progress=progress)
        return sample_smc(expr, num_samples, x_T=x_T, timesteps=timesteps, steps=steps, method=method,
                          generator=generator, **kw, **smc_options)  # fmt: skip
    check_method(method, divergence)
    check_solver(solver, method)
    if not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive integer; got {probes!r}.")
    if divergence == "hutchinson_fd" and not fd_eps > 0:
        raise ValueError(f"fd_eps must be positive; got {fd_eps}.")
    composer = Composer(expr, method=method, control_variate=control_variate)
    leaves = composer.leaves
    if path is not None:
        if isinstance(path, str):
            if path != "ot":
                raise ValueError(f"path={path!r} is not known; use 'ot' or a compose.NoiseSchedule.")
            path = NoiseSchedule.ot()
        if not isinstance(path, NoiseSchedule):
            raise ValueError(f"path must be 'ot' or a compose.NoiseSchedule; got {type(path).__name__}.")
        leaves = [on_schedule(m, path) for m in composer.leaves]
        composer = Composer(expr, schedule=path, method=method, control_variate=control_variate)
    sch = composer.schedule
    if timesteps is not None and steps is not None:
        raise ValueError("give either timesteps= (an explicit grid) or steps= (a default grid), not both.")
    if timesteps is not None:
        ts, t_net, offsets = check_grid(timesteps), None, None
    else:
        from .ld3 import expression_keys

        expect = {**expression_keys(expr), "solver": solver if method == "ode" else "sde", "schedule": repr(sch)}
        hutch = probes if method == "ode" and divergence != "exact" else None
        ts, t_net, offsets = resolve_grid(sch, grid, steps, expect=expect, default_steps=500, probes=hutch)
    if len(ts) - 1 < SOLVER_ORDER[solver]:
        raise ValueError(
            f"solver={solver!r} (order {SOLVER_ORDER[solver]}) needs at least {SOLVER_ORDER[solver]} steps; the grid "
            f"has {len(ts) - 1}."
        )
    t0 = float(ts[0])
    if x_T is None:
        if num_samples is None:
            raise ValueError("give num_samples= (or a starting x_T=).")
        shape = getattr(composer.leaves[0], "sample_shape", None)
        if shape is None:
            raise ValueError("the models have no `sample_shape`; pass x_T= with the starting states.")
        x = torch.randn((num_samples, *shape), generator=generator, dtype=torch.float64).to(dtype)
        x = x * float(sch.sigma(t0))
    else:
        x = x_T
        if num_samples is not None and num_samples != x.shape[0]:
            raise ValueError(f"num_samples={num_samples} does not match x_T with {x.shape[0]} samples.")
    n = x.shape[0]
    if all(hasattr(m, "log_prob") for m in leaves):
        log_q = torch.stack([m.log_prob(x, t0).to(torch.float64) for m in leaves], dim=-1)
    else:
        log_q = composer.initial_log_q(x, t0)
    multistep = None  # the multistep solvers' history (multistep_composed)
    span = t0 - float(ts[-1])
    kappas, coeffs = [], []
    node_kappa: dict[str, list] = {}
    root_path = composer.root.path if composer.root is not None else None
    iterator = range(len(ts) - 1)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"compose.sample ({method})")
    for k in iterator:
        t_cur, t_next = float(ts[k]), float(ts[k + 1])
        t = torch.tensor(t_cur if t_net is None else float(t_net[k]), dtype=torch.float64)
        eps = torch.stack([model_eps(m, x, t) for m in leaves])
        noise = div = None
        if method == "sde":
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.dtype)
        else:
            div = _leaf_divergences(leaves, sch, x, t, eps, divergence, probes, generator, fd_eps)
        out = composer.step(x, t_cur, t_next, eps, log_q, noise=noise, div_eps=div, bias_scale=(t_cur - t_next) / span)
        x_next, log_q = out.x, out.log_q
        if solver != "euler":
            x_next, log_q, multistep = multistep_composed(solver, x, out, eps, multistep, ts, k, sch, offsets)
        x = x_next
        coeffs.append(out.coeffs)
        for path, kap in out.kappa.items():
            node_kappa.setdefault(path, []).append(kap)
        if root_path is not None:
            kappas.append(out.kappa[root_path])
        if callback is not None:
            callback(k, t_next, x, log_q)
    t_last = torch.tensor(float(ts[-1]), dtype=torch.float64)
    final = torch.stack([model_eps(m, x, t_last) for m in leaves])
    eps_bar = torch.einsum("nl,ln...->n...", coeffs[-1].to(final.dtype), final)
    denoised = (x - bcast(sch.sigma(t_last), x) * eps_bar) / bcast(sch.alpha(t_last), x)
    return SampleResult(
        samples=x,
        denoised=denoised,
        log_q=log_q,
        kappa=torch.stack(kappas) if kappas else torch.ones(len(ts) - 1, n, 1, dtype=torch.float64),
        coeffs=torch.stack(coeffs),
        timesteps=ts,
        node_kappa={p: torch.stack(v) for p, v in node_kappa.items()},
    )


def multistep_composed(
    solver: str,
    x: torch.Tensor,
    out: Any,
    eps: torch.Tensor,
    state: tuple | None,
    ts: torch.Tensor,
    k: int,
    schedule: NoiseSchedule,
    offsets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Replace the Euler ODE step `out` (a `StepOutput` from x at ts[k]) by `solver` on the composed eps:
    "dpm2m" (DPM-Solver++(2M)) or "unipc" (UniPC, bh2: the same 2M step as predictor, after the UniC corrector).

    x: the state at ts[k] where eps (L, n, ...), the leaf predictions, were evaluated. state: None at k = 0, else
    what the previous call returned: (the state the previous step started from, its composed x0_hat, the x0_hat
    before it or None). For "unipc" the corrector first recomputes the state at ts[k] from that of ts[k-1] with the
    new x0_hat (`unic_step`, no extra network call); the 2M step then goes from it to ts[k+1]. Each model's log q
    is moved along the displacement actually taken: dlogq_i += <s_i, x_next - x_Euler>, s_i = -eps_i / sigma (the
    Euler form of MATH.md section 4 holds for any displacement to first order). Returns (x_next, log_q, state for
    the next call). offsets: None or the (N, 3) learned solver coefficients of a schedule file (`compose.ld3`):
    row k holds the 2M step's rho offset from ts[k] and the corrector's (d_rho0, d_rho1) at ts[k].
    """
    t_cur, t_next = float(ts[k]), float(ts[k + 1])
    pred_off = corr_off = None
    if offsets is not None:
        pred_off, corr_off = offsets[k, 0], offsets[k, 1:]
    n = x.shape[0]
    x0_bar = (x - bcast(schedule.sigma(t_cur), x).to(x.dtype) * out.eps) / bcast(schedule.alpha(t_cur), x).to(x.dtype)
    x_from, m_prev, h_prev = x, None, None
    if state is not None:
        x_c, m_prev, m_prev2 = state
        if solver == "unipc":
            t_prev2 = float(ts[k - 2]) if m_prev2 is not None else None
            x_from = unic_step(x_c, m_prev, x0_bar, m_prev2, t_prev2, float(ts[k - 1]), t_cur, schedule, corr_off)
        h_prev = 0.5 * float(schedule.log_snr(t_cur) - schedule.log_snr(float(ts[k - 1])))
    x_next = dpm2m_step(x_from, x0_bar, m_prev, t_cur, t_next, schedule, h_prev, pred_off)
    s = -eps.reshape(eps.shape[0], n, -1).to(torch.float64) / float(schedule.sigma(t_cur))
    log_q = out.log_q + torch.einsum("lnd,nd->nl", s, (x_next - out.x).reshape(n, -1).to(torch.float64))
    return x_next, log_q, (x_from, x0_bar, m_prev)


def unic_step(
    x_prev: torch.Tensor,
    m_prev: torch.Tensor,
    m_cur: torch.Tensor,
    m_prev2: torch.Tensor | None,
    t_prev2: Any,
    t_prev: Any,
    t_cur: Any,
    schedule: NoiseSchedule,
    rho_offsets: Any = None,
) -> torch.Tensor:
    """The UniC corrector (Zhao et al. 2023, arXiv 2302.04867; B(h) = expm1(-h), "bh2"; data prediction).

    Recomputes the state at t_cur from x_prev at t_prev with m_prev = x0_hat at t_prev, m_cur = x0_hat at the
    predicted state at t_cur and, for order 2, m_prev2 = x0_hat at t_prev2 (None: order 1). With lambda = half
    the log-SNR, h = lambda_cur - lambda_prev, phi = expm1(-h) and r = (lambda_prev2 - lambda_prev) / h:
        x = (sigma_cur / sigma_prev) x_prev - alpha_cur phi [m_prev + rho_0 (m_prev2 - m_prev) / r
                                                              + rho_1 (m_cur - m_prev)],
    order 1: rho_0 = 0, rho_1 = 1/2; order 2: rho_0 + rho_1 = b_1, r rho_0 + rho_1 = b_2 with
    b_1 = (phi / (-h) - 1) / phi and b_2 = 2 ((phi / (-h) - 1) / (-h) - 1/2) / phi.
    rho_offsets: None or (d_rho0, d_rho1) added to (rho_0, rho_1), learned solver coefficients (`compose.ld3`; at
    order 1 only d_rho1 is used). Times may be tensors that carry gradients (learned grids).
    """
    lam_prev, lam_cur = 0.5 * schedule.log_snr(t_prev), 0.5 * schedule.log_snr(t_cur)
    h = lam_cur - lam_prev
    phi = torch.expm1(-h)
    if m_prev2 is None:
        corr = (0.5 if rho_offsets is None else 0.5 + rho_offsets[1]) * (m_cur - m_prev)
    else:
        r = (0.5 * schedule.log_snr(t_prev2) - lam_prev) / h
        phi_1 = phi / -h - 1.0
        b1 = phi_1 / phi
        b2 = 2.0 * (phi_1 / -h - 0.5) / phi
        rho0 = (b1 - b2) / (1.0 - r)
        rho1 = b1 - rho0
        if rho_offsets is not None:
            rho0, rho1 = rho0 + rho_offsets[0], rho1 + rho_offsets[1]
        corr = bcast(rho0 / r, m_cur).to(m_cur.dtype) * (m_prev2 - m_prev) + bcast(rho1, m_cur).to(m_cur.dtype) * (
            m_cur - m_prev
        )
    ratio = schedule.sigma(t_cur) / schedule.sigma(t_prev)
    coef = -schedule.alpha(t_cur) * phi
    return bcast(ratio, x_prev).to(x_prev.dtype) * x_prev + bcast(coef, x_prev).to(x_prev.dtype) * (m_prev + corr)


def dpm2m_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    x0_prev: torch.Tensor | None,
    t_cur: Any,
    t_next: Any,
    schedule: NoiseSchedule,
    h_prev: Any = None,
    rho_offset: Any = None,
) -> torch.Tensor:
    """One DPM-Solver++(2M) step (Lu et al. 2022, Alg. 2) from t_cur to t_next on data predictions.

    x, x0, x0_prev: (n, ...) state, x0_hat at (x, t_cur), and x0_hat of the previous step (None: first order).
    With lambda = log(alpha / sigma) (half the log-SNR), h = lambda_next - lambda_cur and r = h_prev / h:
        x_next = (sigma_next / sigma_cur) x - alpha_next expm1(-h) D,  D = (1 + rho/r) x0 - (rho/r) x0_prev,
    rho = 1/2 (+ rho_offset: a learned solver coefficient, `compose.ld3`; 0 is the solver itself).
    t_cur / t_next may be tensors that carry gradients (learned grids).
    """
    lam_cur, lam_next = 0.5 * schedule.log_snr(t_cur), 0.5 * schedule.log_snr(t_next)
    h = lam_next - lam_cur
    d = x0
    if x0_prev is not None:
        r = h_prev / h
        rho = 0.5 if rho_offset is None else 0.5 + rho_offset
        d = (1.0 + rho / r) * x0 - (rho / r) * x0_prev
    ratio = schedule.sigma(t_next) / schedule.sigma(t_cur)
    coef = -schedule.alpha(t_next) * torch.expm1(-h)
    return bcast(ratio, x).to(x.dtype) * x + bcast(coef, x).to(x.dtype) * d


def _leaf_divergences(leaves, schedule, x, t, eps, kind, probes, generator, fd_eps) -> torch.Tensor:
    """(L, n) divergence of every leaf's eps in x; probes shared across leaves (low-variance differences)."""
    if kind not in DIVERGENCES:
        raise ValueError(f"divergence={kind!r} is not known; use one of {DIVERGENCES}.")
    zeta = None
    if kind != "exact":
        zeta = rademacher((probes, *x.shape), generator, x.dtype, x.device)
    e = fd_eps * float(schedule.sigma(t))
    out = []
    for i, m in enumerate(leaves):
        fn = lambda y, m=m: model_eps(m, y, t)  # noqa: E731
        out.append(divergence(fn, x, kind=kind, probes=zeta, fd_eps=e, fx=eps[i]).detach())
    return torch.stack(out)
