"""The one sampling loop: every sampler of the toolkit (`compose.sample`, `compose.sample_smc`, LD3's student and
`ComposePipeline`) walks its grid through `run`.

A step from t_k to t_{k+1}:
  1. draw the SDE noise (method "sde", not on the step to the data) and the Hutchinson probes (method "ode");
  2. `predict(x, t, probes)` -> the leaf predictions eps (L, n, ...) and, with probes, their divergences (L, n):
     the caller's network call (one batched call per network in the pipelines);
  3. `Composer.step`: the operators' coefficients and every leaf's log q along the first-order step (`weigh`), then
     the solver's step (`compose.solvers.solver_step`; x0 clipping; the step to the data is x0_hat); where it
     differs from the first-order step (multistep solvers, clipping) every leaf's log q is moved along the step
     actually taken, dlogq_i += <s_i, x_next - x_first_order> (first order, docs/MATH.md section 4);
  5. hooks (particle weights, resampling and Langevin moves of `compose.smc`) and the caller's callback.
Nothing is hidden: the state, log q and the multistep history live in the loop, and `run` returns them in a `Trace`.

Randomness comes from a `Draws` object, so every caller keeps its own conventions (`TorchDraws`: one generator, as
`compose.sample`; the pipelines draw with diffusers' `randn_tensor`, one generator per image).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .composer import Composer, rademacher
from .options import solver_record
from .solvers import Multistep, X0Clip, is_final

Predict = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], "tuple[torch.Tensor, torch.Tensor | None]"]


class Draws(Protocol):
    """The randomness of one run."""

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like `like`."""

    def probes(self, k: int, like: torch.Tensor) -> torch.Tensor:
        """(k, *like.shape) Rademacher probes."""

    def uniforms(self, n: int) -> torch.Tensor:
        """(n,) float64 uniforms in [0, 1): one per sample (resampling)."""

    def uniform_rows(self, rows: int) -> torch.Tensor:
        """(rows,) float64 uniforms in [0, 1): one per particle (Metropolis tests)."""


class TorchDraws:
    """`Draws` from one torch.Generator (or torch's global RNG): float64 normals cast to the state's dtype."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        z = torch.randn(like.shape, generator=self.generator, dtype=torch.float64)
        return z.to(dtype=like.dtype, device=like.device)

    def probes(self, k: int, like: torch.Tensor) -> torch.Tensor:
        return rademacher((k, *like.shape), self.generator, like.dtype, like.device)

    def uniforms(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, dtype=torch.float64)

    def uniform_rows(self, rows: int) -> torch.Tensor:
        return torch.rand(rows, generator=self.generator, dtype=torch.float64)


class Hooks:
    """What a sampler adds to the loop (the particle sampler of `compose.smc`); the base class adds nothing."""

    def draw(self, k: int, draws: Draws, final: bool) -> None:
        """Draw this step's extra randomness (right after the SDE noise)."""

    def predict(self, predict: Predict, x: torch.Tensor, t: torch.Tensor, zeta: torch.Tensor | None):
        """The leaf predictions at (x, t): by default the caller's `predict`."""
        return predict(x, t, zeta)

    def after_step(self, k: int, step: StepInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """The state and log q after step k (may reweight, resample or move them)."""
        return step.x, step.log_q

    def state_replaced(self) -> None:
        """The caller's callback replaced the state (cached predictions are stale)."""


@dataclass
class StepInfo:
    """One step as the hooks see it."""

    x: torch.Tensor  # (n, ...) state at t_next
    log_q: torch.Tensor  # (n, L) float64 leaf log q at t_next
    x_prev: torch.Tensor  # (n, ...) state at t_cur
    eps: torch.Tensor  # (L, n, ...) leaf predictions at (x_prev, t_cur)
    log_q_prev: torch.Tensor  # (n, L) at t_cur
    t_cur: float
    t_next: float
    rho: float  # the first-order step's rate (compose.solvers.StepRates)
    final: bool  # the step to the data
    draws: Draws
    predict: Predict
    coeffs: torch.Tensor | None = None  # (n, L) the leaf coefficients of the composed prediction at t_cur


@dataclass
class Trace:
    """What `run` returns.

    x: (n, ...) the state at the last grid time (the data when the grid ends at 0).
    log_q: (n, L) float64 every leaf's tracked log q there.
    log_q_trace: (steps, n, L) log q after every step (after the callback).
    kappa: (steps, n, K) weights of the outermost operator (below any `Guided`); ones (K = 1) for a single model.
    coeffs: (steps, n, L) the leaf coefficients of the composed prediction at every step.
    node_kappa: operator path ("root", "root.0", ...) -> (steps, n, K).
    timesteps: the grid (steps + 1,).
    """

    x: torch.Tensor
    log_q: torch.Tensor
    log_q_trace: torch.Tensor
    kappa: torch.Tensor
    coeffs: torch.Tensor
    timesteps: torch.Tensor
    node_kappa: dict = field(default_factory=dict)


def run(
    composer: Composer,
    predict: Predict,
    x: torch.Tensor,
    ts: torch.Tensor,
    log_q: torch.Tensor,
    *,
    solver: str = "euler",
    draws: Draws | None = None,
    probes: int | None = None,
    network_times: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
    clip: X0Clip | None = None,
    hooks: Hooks | None = None,
    callback: Callable[..., Any] | None = None,
    progress: Callable[[], None] | None = None,
    weight_grad: bool = False,
) -> Trace:
    """Walk x from ts[0] along the grid `ts` with the composed prediction of `composer` (module docstring).

    Args:
        composer: the compiled expression, its schedule and method ("sde" / "ode").
        predict: predict(x, t, zeta) -> (eps (L, n, ...), div (L, n) or None) at (x, t), t a float64 0-d tensor;
            zeta: the step's probes (K, n, ...) or None. Leaves in `composer.leaves` order. It may add a third
            element, the data predictions x0 (L, n, ...): required at alpha = 0 (t = 1 of a flow path).
        x: (n, ...) state at ts[0]; ts: (N + 1,) float64 grid (`compose.options.check_grid`), may carry gradients.
        log_q: (n, L) float64 leaf log q at (x, ts[0]).
        solver: "euler", "ddim" (SDE and ODE), "dpm2m" or "unipc" (ODE).
        draws: the randomness (default `TorchDraws()`, torch's global RNG).
        probes: Hutchinson probes per step for method "ode" (None: none drawn; predict then returns exact
            divergences or None, read as 0).
        network_times: (N,) the times fed to predict at each step (default ts[:-1]; learned schedules shift them).
        offsets: (N, 3) learned solver coefficients (multistep solvers).
        clip: the x0 clipping of the checkpoint (`compose.solvers.X0Clip`).
        hooks: a `Hooks` (the particle sampler).
        callback: callback(k, t_cur, t_next, x, log_q) after every step; may return (x, log_q) to replace them.
        progress: called after every step (a progress bar's update).
        weight_grad: let gradients flow through the tracked log q into the operators' weights (LD3); otherwise the
            weights and log q are computed on detached states.
    """
    hooks = hooks or Hooks()
    draws = draws or TorchDraws()
    sch = composer.schedule
    method = composer.method
    multistep = Multistep(solver) if solver_record(solver).multistep else None
    n_steps = ts.numel() - 1
    span = float(ts[0].detach() - ts[-1].detach())
    root = composer.root.path if composer.root is not None else None
    kappas, coeffs, trace, node_kappa = [], [], [], {}
    for k in range(n_steps):
        t_cur, t_next = float(ts[k].detach()), float(ts[k + 1].detach())
        final = is_final(t_next)
        from_noise = float(sch.alpha(t_cur)) == 0.0  # t = 1 of a flow path: a deterministic step (docs/MATH.md 3)
        noise = draws.noise(x) if method == "sde" and not (final or from_noise) else None
        hooks.draw(k, draws, final)
        zeta = draws.probes(probes, x) if method == "ode" and probes else None
        t_in = ts[k] if network_times is None else network_times[k]
        eps, div, *x0 = hooks.predict(predict, x, t_in, zeta)
        if method == "ode" and div is None:
            div = torch.zeros(eps.shape[0], eps.shape[1], dtype=torch.float64, device=eps.device)
        out = composer.step(
            x,
            ts[k],
            ts[k + 1],
            eps,
            log_q,
            noise=noise,
            div_eps=div,
            bias_scale=(t_cur - t_next) / span,
            solver=solver,
            x0=x0[0] if x0 else None,
            clip=clip,
            multistep=multistep,
            offsets=None if offsets is None else offsets[k],
            weight_grad=weight_grad,
        )
        info = StepInfo(
            out.x, out.log_q, x, eps, log_q, t_cur, t_next, out.rates.rho, final, draws, predict, out.coeffs
        )
        x, log_q = hooks.after_step(k, info)
        coeffs.append(out.coeffs)
        for path, kap in out.kappa.items():
            node_kappa.setdefault(path, []).append(kap)
        kappas.append(out.kappa[root] if root is not None else torch.ones(x.shape[0], 1, dtype=torch.float64))
        if callback is not None:
            ret = callback(k, t_cur, t_next, x, log_q)
            if ret is not None:
                if ret[0] is not x:
                    hooks.state_replaced()
                x, log_q = ret
        trace.append(log_q)
        if progress is not None:
            progress()
    return Trace(
        x=x,
        log_q=log_q,
        log_q_trace=torch.stack(trace),
        kappa=torch.stack(kappas),
        coeffs=torch.stack(coeffs),
        timesteps=ts,
        node_kappa={p: torch.stack(v) for p, v in node_kappa.items()},
    )


__all__ = ["Draws", "Hooks", "StepInfo", "TorchDraws", "Trace", "run"]
