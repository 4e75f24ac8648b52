"""One step of a composed sampler and each model's log-density increment along it (MATH.md sections 3-4).

The caller evaluates the leaf predictions (one batched network call in the pipelines) and hands them over as
eps (L, n, ...); `Composer.step` does the rest and keeps no hidden state: log q is passed in and returned.

Density increments are computed in eps units (g^2 / sigma^2 = -d lambda / dt stays finite as sigma -> 0):
  SDE (Ito density estimator, SuperDiff Thm. 1), step dx = [-f x + g^2 s_bar] h + g sqrt(h) z:
      dlogq_a = h g^2 <s_bar, s_a> + g sqrt(h) <z, s_a> - (h g^2 / 2) |s_a|^2 + d f h
  ODE (SuperDiff Prop. 5), step dx = [-f x + (g^2 / 2) s_bar] h:
      dlogq_a = h [ d f - (g^2 / 2) div s_a - (g^2 / 2) <s_a, s_a - s_bar> ]
Both are dlogq = Q c + r with c the leaf coefficients of s_bar = sum_l c_l s_l, which is what the operators use.

Deviation from the paper (SDE only): every leaf's increment also gets the zero-mean control variate
    - (g^2 h / (2 (alpha^2 + sigma^2))) (|z|^2 - d).
The Ito estimator replaces the second-order term (g^2 h / 2) z^T H z of the exact change of log q by its mean
(g^2 h / 2) tr H; at high noise every model's Hessian is H ~ -I / (alpha^2 + sigma^2) (data of unit scale), so
that replacement is the dominant error of the estimate and it is the same for every model. Adding the term
removes it (the tracked log q of 2-D mixtures correlates 0.9998 instead of 0.9989 with the exact value after
800 steps). It is common to all leaves, so kappa of OR and AND and every difference log q_i - log q_j are
unchanged; only the absolute log q gains. `control_variate=False` gives the paper's estimator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .models import model_name
from .operators import Expr, StepContext, operator_root
from .schedule import NoiseSchedule

METHODS = ("sde", "ode")
DIVERGENCES = ("hutchinson", "hutchinson_fd", "exact")


def check_method(method: str, divergence: str | None = None) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not known; use 'sde' (Ito density estimator) or 'ode' (divergence).")
    if divergence is not None and divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r} is not known; use one of {DIVERGENCES}.")


def check_grid(timesteps: Any, name: str = "timesteps") -> torch.Tensor:
    """A strictly decreasing grid in (0, 1] as float64 (ValueError otherwise)."""
    ts = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
    if ts.numel() < 2:
        raise ValueError(f"{name} needs at least two times (a start and an end); got {ts.numel()}.")
    if not bool(torch.all(torch.isfinite(ts))) or not bool(torch.all(ts[1:] < ts[:-1])):
        raise ValueError(
            f"{name} must be strictly decreasing (noise at t = 1 to data at t = 0); got {ts.tolist()[:8]}..."
        )
    if not (0.0 < float(ts[-1]) and float(ts[0]) <= 1.0):
        raise ValueError(f"{name} must lie in (0, 1]; got [{float(ts[-1])}, {float(ts[0])}].")
    return ts


@dataclass
class StepOutput:
    x: torch.Tensor  # (n, ...) state at t_next
    log_q: torch.Tensor  # (n, L) float64 leaf log-densities at t_next
    coeffs: torch.Tensor  # (n, L) leaf coefficients of the composed prediction
    eps: torch.Tensor  # (n, ...) composed eps_bar
    kappa: dict  # node path -> (n, K)


class Composer:
    """A compiled expression: the leaves, the shared schedule, and the step.

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
            schedule = _common_schedule(self.leaves)
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
    ) -> StepOutput:
        """Move x from t_cur to t_next with the composed prediction and update each leaf's log q.

        Args:
            x: (n, ...) state at t_cur.
            eps: (L, n, ...) leaf predictions eps_hat at (x, t_cur).
            log_q: (n, L) leaf log-densities at (x, t_cur).
            noise: (n, ...) standard normal z for the SDE step (required for method="sde").
            div_eps: (L, n) divergence of each leaf's eps_hat in x (required for method="ode").
            bias_scale: h / (t_first - t_last), how much of an AND bias this step carries.
        """
        sch = self.schedule
        log_q = log_q.to(torch.float64)
        h = t_cur - t_next
        if not h > 0:
            raise ValueError(f"t_next must be smaller than t_cur; got t_cur={t_cur}, t_next={t_next}.")
        f = float(sch.f(t_cur))
        g2 = float(sch.g2(t_cur))
        sigma = float(sch.sigma(t_cur))
        w = float(sch.g2_over_sigma2(t_cur))  # g^2 / sigma^2
        L, n = eps.shape[0], eps.shape[1]
        d = x[0].numel()
        work = torch.promote_types(eps.dtype, torch.float32)
        E = eps.reshape(L, n, -1).to(work)
        G = torch.einsum("and,bnd->nab", E, E).to(torch.float64)  # <eps_a, eps_b>
        self._check_finite(G, t_cur)
        diag = torch.diagonal(G, dim1=-2, dim2=-1)
        if self.method == "sde":
            if noise is None:
                raise ValueError("noise is required for method='sde' (a standard normal tensor shaped like x).")
            zE = torch.einsum("nd,lnd->nl", noise.reshape(n, -1).to(work), E).to(torch.float64)
            Q = (h * w) * G
            r = -(math.sqrt(g2 * h) / sigma) * zE - 0.5 * h * w * diag + d * f * h
            if self.control_variate:
                zz = noise.reshape(n, -1).to(torch.float64).pow(2).sum(-1)
                alpha = float(sch.alpha(t_cur))
                r = r - (0.5 * g2 * h / (alpha**2 + sigma**2)) * (zz - d)[:, None]
        else:
            if div_eps is None:
                raise ValueError("div_eps (L, n) is required for method='ode'; see compose.engine.divergence.")
            Q = (0.5 * h * w) * G
            r = d * f * h + (0.5 * h * g2 / sigma) * div_eps.to(torch.float64).T - 0.5 * h * w * diag
        ctx = StepContext(Q=Q, r=r, log_q=log_q, bias_scale=bias_scale)
        if isinstance(self.expr, Expr):
            c = self.expr.coeffs(ctx)
        else:
            c = torch.ones(n, 1, dtype=torch.float64, device=G.device)
        dlogq = torch.einsum("nab,nb->na", Q, c) + r
        eps_bar = torch.einsum("nl,lnd->nd", c.to(work), E).reshape(x.shape).to(x.dtype)
        if self.method == "sde":
            x_next = x + (-f * x - (g2 / sigma) * eps_bar) * h + math.sqrt(g2 * h) * noise.to(x.dtype)
        else:
            x_next = x + (-f * x - (0.5 * g2 / sigma) * eps_bar) * h
        return StepOutput(x=x_next, log_q=log_q + dlogq, coeffs=c, eps=eps_bar, kappa=ctx.kappa)

    def _check_finite(self, G: torch.Tensor, t: float) -> None:
        if bool(torch.isfinite(G).all()):
            return
        bad = ~torch.isfinite(torch.diagonal(G, dim1=-2, dim2=-1)).all(0)
        names = [model_name(self.leaves[i]) for i in torch.nonzero(bad).flatten().tolist()] or ["(overflow)"]
        raise ValueError(
            f"eps: model(s) {names} returned NaN or inf at t={t:.4g}. Check the model and its inputs; in half "
            "precision try float32 or bfloat16."
        )


def _common_schedule(leaves: list) -> NoiseSchedule:
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
    fn,
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
