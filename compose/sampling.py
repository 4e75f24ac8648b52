"""`compose.sample`: a composed expression of callable models along one shared trajectory (`compose.loop.run`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .composer import Composer, leaf_predictor
from .grids import resolve_grid
from .loop import TorchDraws, run
from .models import on_schedule
from .options import (
    check_divergence,
    check_fd_eps,
    check_grid,
    check_grid_length,
    check_method,
    check_probes,
    check_solver,
)
from .schedule import NoiseSchedule
from .schedule_files import expression_keys
from .smc import PoE, SMCResult, _progress, choose_one, sample_smc
from .solvers import X0Clip
from .verify import LiftSteering, Verify, best_of, lifts, random_of, score


@dataclass
class SampleResult:
    """What `sample` returns.

    samples: (n, ...) states at the last grid time: the data (x0_hat of the last evaluation) for a grid ending at 0,
        as every named grid does.
    log_q: (n, L) float64, each leaf model's tracked log-density there (leaves in `Composer.leaves` order).
    kappa: (steps, n, K) the weights of the outermost operator (below any `Guided`) at every step.
    coeffs: (steps, n, L) effective coefficient of every leaf's prediction at every step.
    node_kappa: node path ("root", "root.0", ...) -> (steps, n, K) weights of every operator node.
    timesteps: the grid (steps + 1,), float64.
    lift, scores, candidate (with `verify`): (n, T) float64 lift of every term of the kept sample, (n, K) the score
        of every candidate, (n,) which candidate was kept (0 .. K-1; with steering, the particle slot).
    """

    samples: torch.Tensor
    log_q: torch.Tensor
    kappa: torch.Tensor
    coeffs: torch.Tensor
    timesteps: torch.Tensor
    node_kappa: dict = field(default_factory=dict)
    lift: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    candidate: torch.Tensor | None = None


def sample(
    expr: Any,
    num_samples: int | None = None,
    x_T: torch.Tensor | None = None,
    timesteps: Any = None,
    steps: int | None = None,
    method: str = "sde",
    divergence: str = "hutchinson_fd",
    probes: int = 1,
    generator: torch.Generator | None = None,
    *,
    grid: Any = "log_snr",
    solver: str = "euler",
    path: NoiseSchedule | str | None = None,
    fd_eps: float = 1e-3,
    control_variate: bool = True,
    clip: X0Clip | None = None,
    dtype: torch.dtype = torch.float32,
    callback: Callable[[int, float, torch.Tensor, torch.Tensor], None] | None = None,
    progress: bool = False,
    verify: Verify | None = None,
    **smc_options: Any,
) -> SampleResult | SMCResult:
    """Sample a composition of models (an operator expression, or one model) along one shared trajectory.

    Args:
        expr: `OR(...)`, `AND(...)`, `Average(...)`, `Product(...)`, `Guided(...)`, nested, or a single model.
        num_samples: n, when x_T is not given (x_T ~ N(0, sigma_{t_0}^2 I) then).
        x_T: (n, ...) starting states at the first grid time.
        timesteps: an explicit strictly decreasing grid in t (ending at 0 to land on the data); or `steps` with
            `grid`: a name in `compose.GRIDS` ("log_snr", "uniform", "karras", "ays_sd15", "ays_sdxl"), or the path of
            a learned JSON schedule file (`compose.ld3`; its grid, NFE, solver and model are checked against this call;
            its network times and learned solver coefficients, where it has them, are used). `steps` is the number of
            network evaluations per sample: a named grid has `steps` evaluation times from t_max to t_min and its
            last step lands on the data with x0_hat (default 500).
        method: "sde" (Euler-Maruyama, Ito density estimator) or "ode" (the probability-flow ODE with a divergence
            estimate).
        solver: "euler" (first order in t), "ddim" (first order in s = sigma / alpha: DDIM with eta = 0 for the ODE,
            EulerDiscreteScheduler's step; for the SDE Euler-Maruyama in s, SuperDiff's reference update); ODE only:
            "dpm2m" (DPM-Solver++(2M), Lu et al. 2022, on the composed x0_hat) or "unipc" (UniPC bh2, Zhao et al.
            2023: the same 2M step as predictor, then the UniC corrector once the models have been called at the
            predicted state; no extra network call). The composed coefficients come from the Euler form of the step
            (the operators solve for kappa there); each model's log q is then moved along the step actually taken,
            by adding <s_i, dx - dx_Euler> (first order). OR (kappa from the tracked log q), average, product and
            CFG keep their meaning; AND equalises the Euler increments, so with the multistep solvers the
            equal-density condition holds to first order in the step.
        path: sample along another noise schedule than the models' (e.g. "ot" or `NoiseSchedule.ot()`): every
            model is re-parametrised with `compose.on_schedule` (same log-SNR, rescaled state), so the trajectory
            follows alpha = 1 - t, sigma = t with the same signal-to-noise ratios.
        divergence: for "ode": "hutchinson_fd" (default: Rademacher probes shared across models, finite differences
            with step fd_eps * sigma_t, no autograd), "hutchinson" (the same probes, one forward-mode JVP per model
            per probe), or "exact" (d JVPs per model; small d).
        probes: number of Hutchinson probes per step.
        generator: a torch.Generator for x_T, the SDE noise and the probes (same seed, same output).
        fd_eps: the finite-difference step of "hutchinson_fd", relative to sigma_t (e = fd_eps * sigma_t).
        control_variate: the common-mode variance reduction of the SDE density estimate (see `compose.composer`).
        clip: clip the composed x0_hat at every step (`compose.X0Clip`, diffusers' clip_sample / thresholding).
        dtype: dtype of the states when x_T is not given (densities are always accumulated in float64).
        callback: called as callback(step_index, t_next, x, log_q) after every step.
        verify: `compose.verify.Verify`: report every term's lift (log q_term - log q_ref at the end) and draw
            `candidates` samples per sample kept, chosen by their lifts (best-of-K, or steered by them). x_T then holds
            num_samples x candidates rows, the candidates of one sample consecutive.
        smc_options: for a `compose.PoE` only (sampled by `compose.sample_smc`, which returns an `SMCResult`):
            num_particles, ess_threshold, resample_window, final, and the rejuvenation moves langevin_steps,
            langevin_step, langevin_after.
    """
    if isinstance(expr, PoE) or smc_options:
        if verify is not None:
            raise ValueError("verify= applies to the operators, not to particle products (PoE); drop one.")
        if not isinstance(expr, PoE):
            raise ValueError(f"{sorted(smc_options)} are options of particle products; wrap the models in PoE(...).")
        kw = dict(grid=grid, control_variate=control_variate, dtype=dtype, callback=callback, progress=progress)
        return sample_smc(
            expr,
            num_samples,
            x_T=x_T,
            timesteps=timesteps,
            steps=steps,
            method=method,
            generator=generator,
            solver=solver,
            **kw,
            **smc_options,
        )
    check_method(method)
    check_divergence(divergence)
    check_solver(solver, method)
    check_probes(probes)
    if divergence == "hutchinson_fd":
        check_fd_eps(fd_eps)
    composer = Composer(expr, method=method, control_variate=control_variate)
    leaves = composer.leaves
    if path is not None:
        path = _path_schedule(path)
        leaves = [on_schedule(m, path) for m in composer.leaves]
        composer = Composer(expr, schedule=path, method=method, control_variate=control_variate)
    sch = composer.schedule
    K = 1
    if verify is not None:
        verify.check(method)
        term_idx, ref_idx = verify.indices(composer.leaves)
        K = verify.candidates
    if timesteps is not None and steps is not None:
        raise ValueError("give either timesteps= (an explicit grid) or steps= (a default grid), not both.")
    expect = {**expression_keys(expr), "solver": solver if method == "ode" else "sde", "schedule": repr(sch)}
    hutch = probes if method == "ode" and divergence != "exact" else None
    if timesteps is not None:
        ts, t_net, offsets = check_grid(timesteps, "timesteps"), None, None
    else:
        ts, t_net, offsets = resolve_grid(sch, grid, steps, expect=expect, default_steps=500, probes=hutch)
    check_grid_length(ts, solver)
    t0 = float(ts[0])
    x = _start(x_T, num_samples, K, composer, generator, dtype, float(sch.sigma(t0)))
    if all(hasattr(m, "log_prob") for m in leaves):
        log_q = torch.stack([m.log_prob(x, t0).to(torch.float64) for m in leaves], dim=-1)
    else:
        log_q = composer.initial_log_q(x, t0)

    predict = leaf_predictor(leaves, sch, divergence=divergence if method == "ode" else None, fd_eps=fd_eps)
    cb = None if callback is None else (lambda k, t_cur, t_next, x_, lq: callback(k, t_next, x_, lq))
    n = x.shape[0] // K
    hooks = None
    if verify is not None and verify.steer:
        hooks = LiftSteering(
            n,
            K,
            term_idx,
            ref_idx,
            rule=verify.rule,
            strength=verify.steer,
            ess_threshold=verify.ess_threshold,
            window=verify.window,
        )
    draws = TorchDraws(generator)
    tr = run(
        composer,
        predict,
        x,
        ts,
        log_q,
        solver=solver,
        draws=draws,
        probes=hutch,
        network_times=t_net,
        offsets=offsets,
        clip=clip,
        callback=cb,
        hooks=hooks,
        progress=_progress(progress, len(ts) - 1, f"compose.sample ({method})"),
    )
    res = SampleResult(
        samples=tr.x, log_q=tr.log_q, kappa=tr.kappa, coeffs=tr.coeffs, timesteps=ts, node_kappa=tr.node_kappa
    )
    return res if verify is None else _verified(res, verify, term_idx, ref_idx, n, K, hooks, draws)


def _start(x_T, num_samples, K: int, composer, generator, dtype, sigma0: float) -> torch.Tensor:
    """The starting states: x_T (checked against num_samples x K candidates) or N(0, sigma0^2 I) draws."""
    if x_T is None:
        if num_samples is None:
            raise ValueError("give num_samples= (or a starting x_T=).")
        shape = getattr(composer.leaves[0], "sample_shape", None)
        if shape is None:
            raise ValueError("the models have no `sample_shape`; pass x_T= with the starting states.")
        x = torch.randn((num_samples * K, *shape), generator=generator, dtype=torch.float64).to(dtype)
        return x * sigma0
    if num_samples is not None and num_samples * K != x_T.shape[0]:
        raise ValueError(f"num_samples={num_samples} x {K} candidates does not match x_T with {x_T.shape[0]} rows.")
    if x_T.shape[0] % K:
        raise ValueError(f"x_T has {x_T.shape[0]} rows, not a multiple of candidates={K}.")
    return x_T


def _verified(res: SampleResult, verify: Verify, term_idx, ref_idx, n: int, K: int, hooks, draws) -> SampleResult:
    """Keep one of every image's K candidates (by `verify.select`) and report its lifts and every candidate's score."""
    scores = score(lifts(res.log_q, term_idx, ref_idx), verify.rule, K=K)
    if verify.select == "lift":
        pick = best_of(scores, K)
    elif hooks is not None:  # "random" after steering: one particle drawn by its final weight
        pick = choose_one(hooks.log_w, draws.uniforms(n)) + K * torch.arange(n)
    else:
        pick = random_of(draws.uniforms(n), K)
    return SampleResult(
        samples=res.samples[pick],
        log_q=res.log_q[pick],
        kappa=res.kappa[:, pick],
        coeffs=res.coeffs[:, pick],
        timesteps=res.timesteps,
        node_kappa={k: v[:, pick] for k, v in res.node_kappa.items()},
        lift=lifts(res.log_q[pick], term_idx, ref_idx),
        scores=scores.reshape(n, K),
        candidate=pick - K * torch.arange(n),
    )


def _path_schedule(path: NoiseSchedule | str) -> NoiseSchedule:
    if isinstance(path, str):
        if path != "ot":
            raise ValueError(f"path={path!r} is not known; use 'ot' or a compose.NoiseSchedule.")
        return NoiseSchedule.ot()
    if not isinstance(path, NoiseSchedule):
        raise ValueError(f"path must be 'ot' or a compose.NoiseSchedule; got {type(path).__name__}.")
    return path


__all__ = ["SampleResult", "sample"]
