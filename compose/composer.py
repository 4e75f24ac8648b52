"""Each model's log-density increment along one step of the shared trajectory (docs/MATH.md sections 3-4).

The caller evaluates the leaf predictions (one batched network call in the pipelines) and hands them over as
eps (L, n, ...); `Composer.weigh` returns the operators' leaf coefficients and every leaf's log q after the step.
It keeps no hidden state: log q is passed in and returned. The step itself is `compose.solvers`'.

Density increments are computed in eps units with the rate rho of the first-order step (`compose.solvers.StepRates`:
rho = h g^2 / sigma^2 for "euler", 2 (s - s') / s for "ddim", s = sigma / alpha), so they stay finite as sigma -> 0:
  SDE (Ito density estimator, SuperDiff Thm. 1), step sigma (-rho eps_bar + sqrt(rho) z) beside the linear part:
      dlogq_a = rho <eps_bar, eps_a> - sqrt(rho) <z, eps_a> - (rho / 2) |eps_a|^2 + d c
  ODE (SuperDiff Prop. 5), step -sigma (rho / 2) eps_bar beside the linear part:
      dlogq_a = d c + (rho / 2) sigma div eps_a - (rho / 2) <eps_a, eps_a - eps_bar>
with c the per-dimension log-Jacobian of the linear part (f h for euler), the same for every model. Both are
dlogq = Q coeffs + r, affine in the leaf coefficients of eps_bar = sum_l coeffs_l eps_l: what the operators use.

Deviation from the paper (SDE only): every leaf's increment also gets the zero-mean control variate
    - (rho sigma^2 / (2 (alpha^2 + sigma^2))) (|z|^2 - d).
The Ito estimator replaces the second-order term (g^2 h / 2) z^T H z of the exact change of log q by its mean
(g^2 h / 2) tr H; at high noise every model's Hessian is H ~ -I / (alpha^2 + sigma^2) (data of unit scale), so
that replacement is the dominant error of the estimate and it is the same for every model. Adding the term
removes it. It is common to all leaves, so kappa of OR and AND and every difference log q_i - log q_j are
unchanged; only the absolute log q gains. `control_variate=False` gives the paper's estimator.

The step to the data (t_next = 0) is deterministic whatever the method: its increment is the ODE one with rho = 2;
under method="sde" no divergence is available, so its divergence term is left out (approximate, as the Ito estimator
is for any deterministic step; docs/MATH.md section 4). The step from alpha = 0 (t = 1 of a flow path) has an
infinite rate; every model's marginal there is N(0, sigma^2 I) and its eps_hat is x / sigma, so the step changes
every log q by the same amount: it is left out (Q = 0, r = 0: OR keeps its weights, AND gives 1/M).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .models import model_eps, model_name
from .operators import Expr, StepContext, operator_root
from .options import DIVERGENCES, check_method
from .schedule import NoiseSchedule
from .solvers import StepRates, first_order, is_final, step_rates


@dataclass
class StepOutput:
    x: torch.Tensor | None  # (n, ...) state at t_next (Composer.step only; the sampler's solvers move x)
    log_q: torch.Tensor  # (n, L) float64 leaf log-densities at t_next (along the first-order step)
    coeffs: torch.Tensor  # (n, L) leaf coefficients of the composed prediction
    eps: torch.Tensor  # (n, ...) composed eps_bar
    kappa: dict  # node path -> (n, K)


class Composer:
    """A compiled expression: the leaves, the shared schedule, and the density bookkeeping of a step.

    Args:
        expr: an operator expression (or a single model).
        schedule: the schedule of the shared trajectory; defaults to the leaves' common schedule.
        method: "sde" or "ode".
        control_variate: add the zero-mean common-mode term of the module docstring to the SDE increments.
    """

    def __init__(
        self, expr: Any, schedule: NoiseSchedule | None = None, method: str = "sde", control_variate: bool = True
    ) -> None:
        check_method(method)
        self.expr = expr
        self.method = method
        self.control_variate = bool(control_variate)
        self.leaves = expr.compile() if isinstance(expr, Expr) else [expr]
        if schedule is None:
            schedule = common_schedule(self.leaves)
        self.schedule = schedule
        self.root = operator_root(expr) if isinstance(expr, Expr) else None

    @property
    def num_leaves(self) -> int:
        return len(self.leaves)

    def initial_log_q(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """(n, L) float64: exact log q_t(x) if every leaf has `log_prob`, else the prior N(0, sigma_t^2 I)."""
        if all(hasattr(m, "log_prob") for m in self.leaves):
            return torch.stack([m.log_prob(x, t).to(torch.float64) for m in self.leaves], dim=-1)
        sigma = float(self.schedule.sigma(t))
        d = x[0].numel()
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        lp = -0.5 * (xf**2).sum(-1) / sigma**2 - 0.5 * d * math.log(2 * math.pi * sigma**2)
        return lp[:, None].expand(-1, self.num_leaves).clone()

    def weigh(
        self,
        eps: torch.Tensor,
        log_q: torch.Tensor,
        rates: StepRates,
        *,
        noise: torch.Tensor | None = None,
        div_eps: torch.Tensor | None = None,
        bias_scale: float = 0.0,
        deterministic: bool = False,
    ) -> StepOutput:
        """The operators' coefficients for one step and every leaf's log q after it (module docstring).

        Args:
            eps: (L, n, ...) leaf predictions eps_hat at the start of the step.
            log_q: (n, L) leaf log-densities there.
            rates: the first-order step's `StepRates` (`compose.solvers.step_rates`).
            noise: (n, ...) the standard normal z of an SDE step (required for method="sde" unless deterministic).
            div_eps: (L, n) divergence of each leaf's eps_hat in x (method="ode"; None under a deterministic SDE step).
            bias_scale: the share of an AND bias this step carries (h / (t_first - t_last)).
            deterministic: the step to the data (the ODE formula, also under method="sde").
        """
        log_q = log_q.to(torch.float64)
        rho, sigma = rates.rho, rates.sigma
        if math.isinf(rho):  # from alpha = 0: every model's eps_hat is x / sigma, the step moves every log q alike
            rho, common_step = 0.0, True
        else:
            common_step = False
        L, n = eps.shape[0], eps.shape[1]
        d = eps[0, 0].numel()
        # float64 for the Gram matrix and the composition: products of float32 numbers are exact in float64, so the
        # differences between nearly equal predictions (AND's B, eps_bar with large kappa) keep their digits.
        E = eps.reshape(L, n, -1).to(torch.float64)
        G = torch.einsum("and,bnd->nab", E, E)  # <eps_a, eps_b>
        self._check_finite(G, sigma)
        diag = torch.diagonal(G, dim1=-2, dim2=-1)
        if common_step:
            Q, r = torch.zeros_like(G), torch.zeros_like(diag)
        elif self.method == "sde" and not deterministic:
            if noise is None:
                raise ValueError("noise is required for method='sde' (a standard normal tensor shaped like x).")
            zE = torch.einsum("nd,lnd->nl", noise.reshape(n, -1).to(torch.float64), E)
            Q = rho * G
            r = -math.sqrt(rho) * zE - 0.5 * rho * diag + d * rates.common
            if self.control_variate:
                zz = noise.reshape(n, -1).to(torch.float64).pow(2).sum(-1)
                r = r - (0.5 * rho * sigma**2 / (rates.alpha**2 + sigma**2)) * (zz - d)[:, None]
        else:
            if div_eps is None and not deterministic:
                raise ValueError("div_eps (L, n) is required for method='ode'; see compose.composer.divergence.")
            Q = (0.5 * rho) * G
            r = d * rates.common - 0.5 * rho * diag
            if div_eps is not None:
                r = r + (0.5 * rho * sigma) * div_eps.to(torch.float64).T
        ctx = StepContext(Q=Q, r=r, log_q=log_q, bias_scale=bias_scale)
        if isinstance(self.expr, Expr):
            c = self.expr.coeffs(ctx)
        else:
            c = torch.ones(n, 1, dtype=torch.float64, device=G.device)
        dlogq = torch.einsum("nab,nb->na", Q, c) + r
        eps_bar = torch.einsum("nl,lnd->nd", c.to(E.dtype), E).reshape(eps.shape[1:]).to(eps.dtype)
        return StepOutput(x=None, log_q=log_q + dlogq, coeffs=c, eps=eps_bar, kappa=ctx.kappa)

    def step(
        self,
        x: torch.Tensor,
        t_cur: float,
        t_next: float,
        eps: torch.Tensor,
        log_q: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        div_eps: torch.Tensor | None = None,
        bias_scale: float = 0.0,
        solver: str = "euler",
    ) -> StepOutput:
        """`weigh` and the first-order step ("euler" or "ddim") from t_cur to t_next (0: to the data) in one call."""
        if not t_cur - t_next > 0:
            raise ValueError(f"t_next must be smaller than t_cur; got t_cur={t_cur}, t_next={t_next}.")
        final = is_final(t_next)
        rates = step_rates(solver, self.schedule, t_cur, t_next)
        out = self.weigh(eps, log_q, rates, noise=noise, div_eps=div_eps, bias_scale=bias_scale, deterministic=final)
        step_noise = noise if self.method == "sde" and not final else None
        out.x = first_order(solver, x, out.eps.to(x.dtype), t_cur, t_next, self.schedule, step_noise)
        return out

    def _check_finite(self, G: torch.Tensor, sigma: float) -> None:
        if bool(torch.isfinite(G).all()):
            return
        bad = ~torch.isfinite(torch.diagonal(G, dim1=-2, dim2=-1)).all(0)
        names = [model_name(self.leaves[i]) for i in torch.nonzero(bad).flatten().tolist()] or ["(overflow)"]
        raise ValueError(
            f"eps: model(s) {names} returned NaN or inf at sigma_t={sigma:.4g}. Check the model and its inputs; in "
            "half precision try float32 or bfloat16."
        )


def common_schedule(leaves: list) -> NoiseSchedule:
    """The one noise schedule of the leaves (ValueError when they differ or one has none)."""
    schedules = []
    for m in leaves:
        sch = getattr(m, "schedule", None)
        if not isinstance(sch, NoiseSchedule):
            raise ValueError(f"model {model_name(m)} has no `schedule` (a compose.NoiseSchedule); give it one.")
        schedules.append(sch)
    for i, sch in enumerate(schedules[1:], 1):
        if sch != schedules[0]:
            raise ValueError(
                f"models {model_name(leaves[0])} and {model_name(leaves[i])} use different noise schedules "
                f"({schedules[0]!r} vs {sch!r}); convert one with compose.on_schedule(model, schedule) first."
            )
    return schedules[0]


# ---------------------------------------------------------------------- divergences for callables
def rademacher(shape: tuple, generator: torch.Generator | None, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Rademacher probes (+-1)."""
    z = torch.randint(0, 2, shape, generator=generator, dtype=torch.int64)
    return (2 * z - 1).to(dtype=dtype, device=device)


def divergence(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    kind: str = "hutchinson",
    probes: torch.Tensor | None = None,
    fd_eps: float | None = None,
    fx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Divergence in x of a per-sample map fn: (n, ...) -> (n, ...), shape (n,).

    kind="exact": one forward-mode JVP per dimension (small d only).
    kind="hutchinson": mean over probes zeta (K, n, ...) of zeta . J zeta, one forward-mode JVP per probe.
    kind="hutchinson_fd": the same probes with the forward difference (fn(x + e zeta) - fn(x)) / e, which needs no
        forward-mode AD and can ride in the caller's batched network call. Its bias is (e / 2) zeta^T D^2 fn[zeta,
        zeta] (zero for fn linear in x); its rounding error grows like machine-eps |fn| / e, so e should sit near
        the square root of the working precision times the scale on which fn varies (the caller passes e; for
        eps-predictions ~1e-3 sigma_t in float32).
    """
    n = x.shape[0]
    if kind == "exact":
        d = x[0].numel()
        total = torch.zeros(n, dtype=x.dtype, device=x.device)
        for j in range(d):
            e = torch.zeros(d, dtype=x.dtype, device=x.device)
            e[j] = 1.0
            tangent = e.reshape(x.shape[1:]).expand_as(x)
            _, jv = torch.func.jvp(fn, (x,), (tangent,))
            total = total + jv.reshape(n, -1)[:, j]
        return total
    if probes is None:
        raise ValueError(f"probes are required for divergence kind={kind!r}.")
    acc = torch.zeros(n, dtype=x.dtype, device=x.device)
    if kind == "hutchinson":
        for zeta in probes:
            _, jv = torch.func.jvp(fn, (x,), (zeta,))
            acc = acc + (zeta * jv).reshape(n, -1).sum(-1)
    elif kind == "hutchinson_fd":
        if fd_eps is None or not fd_eps > 0:
            raise ValueError("fd_eps must be a positive step for kind='hutchinson_fd'.")
        base = fn(x) if fx is None else fx
        for zeta in probes:
            acc = acc + (zeta * (fn(x + fd_eps * zeta) - base)).reshape(n, -1).sum(-1) / fd_eps
    else:
        raise ValueError(f"divergence kind={kind!r} is not known; use one of {DIVERGENCES}.")
    return acc / probes.shape[0]


def leaf_divergences(leaves: list, x: torch.Tensor, t: Any, eps: torch.Tensor, kind: str, zeta: torch.Tensor | None,
                     fd_e: float, *, detach: bool = True) -> torch.Tensor:  # fmt: skip
    """(L, n) divergence of every leaf's eps in x at time t; the probes zeta (K, n, ...) are shared across leaves
    (their differences have low variance). fd_e: the finite-difference step of "hutchinson_fd"."""
    out = []
    for i, m in enumerate(leaves):
        fn = lambda y, m=m: model_eps(m, y, t)  # noqa: E731
        div = divergence(fn, x, kind=kind, probes=zeta, fd_eps=fd_e, fx=eps[i])
        out.append(div.detach() if detach else div)
    return torch.stack(out)


__all__ = ["Composer", "StepOutput", "common_schedule", "divergence", "leaf_divergences", "rademacher"]
