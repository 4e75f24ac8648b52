"""`compose.sample`: run a composed expression of callable models along one shared trajectory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .engine import DIVERGENCES, Composer, check_grid, check_method, divergence, rademacher
from .grids import make_grid
from .models import model_eps
from .predictions import bcast
from .smc import PoE, SMCResult, sample_smc


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
    grid: str = "log_snr",
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
        timesteps: an explicit strictly decreasing grid in t; or `steps` with `grid` ("log_snr" or "uniform").
        method: "sde" (Euler-Maruyama, Ito density estimator) or "ode" (Euler on the probability-flow ODE with a
            divergence estimate).
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
            num_particles, ess_threshold, resample_window, final.
    """
    if isinstance(expr, PoE) or smc_options:
        if not isinstance(expr, PoE):
            raise ValueError(f"{sorted(smc_options)} are options of particle products; wrap the models in PoE(...).")
        kw = dict(grid=grid, control_variate=control_variate, dtype=dtype, callback=callback, progress=progress)
        return sample_smc(expr, num_samples, x_T=x_T, timesteps=timesteps, steps=steps, method=method,
                          generator=generator, **kw, **smc_options)  # fmt: skip
    check_method(method, divergence)
    if not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive integer; got {probes!r}.")
    if divergence == "hutchinson_fd" and not fd_eps > 0:
        raise ValueError(f"fd_eps must be positive; got {fd_eps}.")
    composer = Composer(expr, method=method, control_variate=control_variate)
    sch = composer.schedule
    if timesteps is not None and steps is not None:
        raise ValueError("give either timesteps= (an explicit grid) or steps= (a default grid), not both.")
    if timesteps is not None:
        ts = check_grid(timesteps)
    else:
        ts = make_grid(sch, 500 if steps is None else steps, kind=grid)
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
    log_q = composer.initial_log_q(x, t0)
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
        t = torch.tensor(t_cur, dtype=torch.float64)
        eps = torch.stack([model_eps(m, x, t) for m in composer.leaves])
        noise = div = None
        if method == "sde":
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.dtype)
        else:
            div = _leaf_divergences(composer, x, t, eps, divergence, probes, generator, fd_eps)
        out = composer.step(x, t_cur, t_next, eps, log_q, noise=noise, div_eps=div, bias_scale=(t_cur - t_next) / span)
        x, log_q = out.x, out.log_q
        coeffs.append(out.coeffs)
        for path, kap in out.kappa.items():
            node_kappa.setdefault(path, []).append(kap)
        if root_path is not None:
            kappas.append(out.kappa[root_path])
        if callback is not None:
            callback(k, t_next, x, log_q)
    t_last = torch.tensor(float(ts[-1]), dtype=torch.float64)
    final = torch.stack([model_eps(m, x, t_last) for m in composer.leaves])
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


def _leaf_divergences(composer, x, t, eps, kind, probes, generator, fd_eps) -> torch.Tensor:
    """(L, n) divergence of every leaf's eps in x; probes shared across leaves (low-variance differences)."""
    if kind not in DIVERGENCES:
        raise ValueError(f"divergence={kind!r} is not known; use one of {DIVERGENCES}.")
    zeta = None
    if kind != "exact":
        zeta = rademacher((probes, *x.shape), generator, x.dtype, x.device)
    e = fd_eps * float(composer.schedule.sigma(t))
    out = []
    for i, m in enumerate(composer.leaves):
        fn = lambda y, m=m: model_eps(m, y, t)  # noqa: E731
        out.append(divergence(fn, x, kind=kind, probes=zeta, fd_eps=e, fx=eps[i]).detach())
    return torch.stack(out)
