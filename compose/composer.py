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

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .models import model_eps, model_name, model_x0
from .operators import Expr, StepContext, operator_root
from .options import DIVERGENCES, check_method, solver_record
from .schedule import NoiseSchedule
from .solvers import Multistep, StepRates, X0Clip, first_order, solver_step, step_rates


@dataclass
class StepOutput:
    x: torch.Tensor | None  # (n, ...) state at t_next (`Composer.step`; None from `weigh`)
    log_q: torch.Tensor  # (n, L) float64 leaf log-densities at t_next (`weigh`: along the first-order step)
    coeffs: torch.Tensor  # (n, L) leaf coefficients of the composed prediction
    eps: torch.Tensor  # (n, ...) composed eps_bar
    kappa: dict  # node path -> (n, K)
    rates: StepRates | None = None  # the first-order step's rates (`Composer.step`)


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
        t_cur: Any,
        t_next: Any,
        eps: torch.Tensor,
        log_q: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        div_eps: torch.Tensor | None = None,
        bias_scale: float = 0.0,
        solver: str = "euler",
        x0: torch.Tensor | None = None,
        clip: X0Clip | None = None,
        multistep: Multistep | None = None,
        offsets: torch.Tensor | None = None,
        weight_grad: bool = False,
    ) -> StepOutput:
        """One step of the composition from t_cur to t_next (0: to the data); every sampler's steps are this one
        (`compose.loop.run`).

        `weigh` gives the operators' coefficients and every leaf's log q along the solver's first-order step; the
        state moves by the step `solver` takes with the composed prediction (`compose.solvers.solver_step`: x0
        clipping, multistep history, the step to the data is x0_hat). Where that step differs from the first-order
        one (multistep solvers, clipping) every leaf's log q is moved along the step actually taken,
        dlogq_i += <s_i, x_next - x_first_order> (first order, docs/MATH.md section 4).

        Args:
            x: (n, ...) state at t_cur. t_cur, t_next: floats or float64 0-d tensors (which may carry gradients).
            eps: (L, n, ...) leaf predictions at (x, t_cur); log_q: (n, L) leaf log q there.
            noise: (n, ...) the SDE step's standard normal z (method "sde"; unused on the step to the data).
            div_eps: (L, n) leaf divergences (method "ode"). bias_scale: the share of an AND bias this step carries.
            solver: a name of `compose.options.SOLVERS`; multistep: its `Multistep` history (multistep solvers);
                offsets: this step's row (3,) of learned solver coefficients; clip: the x0 clipping.
            x0: (L, n, ...) leaf data predictions, required at alpha(t_cur) = 0 (t = 1 of a flow path).
            weight_grad: let gradients flow through log q into the coefficients (LD3); otherwise they are computed
                on detached states and the composed prediction carries the gradients of eps alone.
        """
        t_cur, t_next = torch.as_tensor(t_cur, dtype=torch.float64), torch.as_tensor(t_next, dtype=torch.float64)
        tc, tn = float(t_cur.detach()), float(t_next.detach())
        if not tc - tn > 0:
            raise ValueError(f"t_next must be smaller than t_cur; got t_cur={tc}, t_next={tn}.")
        record = solver_record(solver)
        final = tn == 0.0
        rates = step_rates(record.density_step, self.schedule, tc, tn)
        from_noise = rates.alpha == 0.0  # t = 1 of a flow path: a deterministic step (docs/MATH.md section 3)
        x_w, eps_w = (x, eps) if weight_grad else (x.detach(), eps.detach())
        out = self.weigh(eps_w, log_q, rates, noise=noise, div_eps=div_eps, bias_scale=bias_scale, deterministic=final)
        eps_bar = out.eps if weight_grad or not eps.requires_grad else _combine(out.coeffs, eps)
        x0_bar = _composed_x0(out.coeffs, x0, tc) if from_noise else None
        step_noise = noise if self.method == "sde" and not final else None
        out.x = solver_step(
            solver,
            x,
            eps_bar.to(x.dtype),
            t_cur,
            t_next,
            self.schedule,
            noise=step_noise,
            multistep=multistep,
            offsets=offsets,
            clip=clip,
            x0_bar=x0_bar,
        )
        if (record.multistep or clip is not None) and not from_noise:  # log q along the step actually taken
            base = first_order(record.density_step, x_w, out.eps.to(x.dtype), t_cur, t_next, self.schedule, step_noise)
            s = -eps_w.reshape(eps.shape[0], eps.shape[1], -1).to(torch.float64) / rates.sigma
            dx = (out.x if weight_grad else out.x.detach()) - base
            out.log_q = out.log_q + torch.einsum("lnd,nd->nl", s, dx.reshape(dx.shape[0], -1).to(torch.float64))
        out.rates = rates
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


def _combine(coeffs: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """sum_l coeffs_l eps_l with gradients through eps (coeffs: (n, L), eps: (L, n, ...))."""
    return torch.einsum("nl,ln...->n...", coeffs.to(eps.dtype), eps)


def _composed_x0(coeffs: torch.Tensor, x0_leaves: torch.Tensor | None, t: float) -> torch.Tensor | None:
    """sum_l coeffs_l x0_l where alpha(t) = 0: the composed data prediction, for coefficients that sum to 1 (CFG, OR,
    AND, average); for others (an unguided product) x0_bar = sum c x0 + (1 - sum c) x / alpha is infinite there."""
    if x0_leaves is None:
        return None
    S = coeffs.sum(-1)
    if not bool(torch.allclose(S, torch.ones_like(S), atol=1e-6)):
        raise ValueError(
            f"at t = {t:.6g} (alpha = 0, pure noise) a composition whose weights do not sum to 1 (here "
            f"{float(S[0]):.4g}: a product or PoE without guidance) has no finite x0_hat; use guidance, another "
            "operator, or a grid that starts below t = 1."
        )
    return _combine(coeffs, x0_leaves)


# ---------------------------------------------------------------------- divergences (docs/MATH.md section 4)
# One implementation of each estimator, for a callable model (`divergence`, `compose.sample`) and for the rows of a
# batched network call (`pipelines.batching`: chunks of n rows, one per leaf, the probe points riding along).
def rademacher(shape: tuple, generator: torch.Generator | None, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Rademacher probes (+-1)."""
    z = torch.randint(0, 2, shape, generator=generator, dtype=torch.int64)
    return (2 * z - 1).to(dtype=dtype, device=device)


def probe_points(x: torch.Tensor, zeta: torch.Tensor, fd_e: float) -> list[torch.Tensor]:
    """The points x + e zeta_k at which "hutchinson_fd" evaluates the map (one per probe zeta_k of (K, n, ...))."""
    return [x + fd_e * z for z in zeta]


def fd_divergence(f_x: torch.Tensor, f_probes: list[torch.Tensor], zeta: torch.Tensor, fd_e: float) -> torch.Tensor:
    """(n,) float64 Hutchinson estimate with forward differences: mean_k <zeta_k, f(x + e zeta_k) - f(x)> / e.

    f_x: (n, ...) the map at x; f_probes: the map at `probe_points(x, zeta, e)`; zeta: (K, n, ...).
    """
    n, K = f_x.shape[0], zeta.shape[0]
    acc = torch.zeros(n, dtype=torch.float64, device=f_x.device)
    for z, f_k in zip(zeta, f_probes, strict=True):
        acc = acc + (z * (f_k - f_x)).reshape(n, -1).sum(-1).to(torch.float64)
    return acc / (fd_e * K)


def jvp_divergence(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, zeta: torch.Tensor, scales: list | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(x) and the Hutchinson estimate with forward-mode JVPs, one JVP of fn per probe.

    x: (C n, ...) rows made of C chunks of n rows (a batched call: one chunk per leaf); chunk c is probed with
    scales[c] zeta_k (default 1; 0: not probed, its estimate stays 0), zeta: (K, n, ...). Returns fn(x) and (C, n)
    float64 mean_k <zeta_k, (J_fn (s zeta_k))_c>: with s the derivative of a chunk's input in the shared state
    (`compose.models.schedule_change`), the divergence in that state.
    """
    K, n = zeta.shape[0], zeta.shape[1]
    C = x.shape[0] // n
    scales = [1.0] * C if scales is None else scales
    div = torch.zeros(C, n, dtype=torch.float64, device=x.device)
    fx = None
    for k in range(K):
        tangent = torch.cat([zeta[k] * s if s else torch.zeros_like(zeta[k]) for s in scales]).to(x.dtype)
        out, jv = torch.func.jvp(fn, (x,), (tangent,))
        fx = out if fx is None else fx
        for c, s in enumerate(scales):
            if s:
                div[c] += (zeta[k] * jv[c * n : (c + 1) * n]).reshape(n, -1).sum(-1).to(torch.float64) / K
    return fx, div


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
    kind="hutchinson": mean over probes zeta (K, n, ...) of zeta . J zeta, one forward-mode JVP per probe
        (`jvp_divergence`).
    kind="hutchinson_fd": the same probes with the forward difference (fn(x + e zeta) - fn(x)) / e
        (`fd_divergence`), which needs no forward-mode AD and can ride in the caller's batched network call. Its bias
        is (e / 2) zeta^T D^2 fn[zeta, zeta] (zero for fn linear in x); its rounding error grows like machine-eps
        |fn| / e, so e should sit near the square root of the working precision times the scale on which fn varies
        (the caller passes e; for eps-predictions ~1e-3 sigma_t in float32).
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
    if kind == "hutchinson":
        return jvp_divergence(fn, x, probes)[1][0].to(x.dtype)
    if kind == "hutchinson_fd":
        if fd_eps is None or not fd_eps > 0:
            raise ValueError("fd_eps must be a positive step for kind='hutchinson_fd'.")
        base = fn(x) if fx is None else fx
        f_probes = [fn(p) for p in probe_points(x, probes, fd_eps)]
        return fd_divergence(base, f_probes, probes, fd_eps).to(x.dtype)
    raise ValueError(f"divergence kind={kind!r} is not known; use one of {DIVERGENCES}.")


def leaf_divergences(
    leaves: list,
    x: torch.Tensor,
    t: Any,
    eps: torch.Tensor,
    kind: str,
    zeta: torch.Tensor | None,
    fd_e: float,
    *,
    detach: bool = True,
) -> torch.Tensor:
    """(L, n) divergence of every leaf's eps in x at time t; the probes zeta (K, n, ...) are shared across leaves
    (their differences have low variance). fd_e: the finite-difference step of "hutchinson_fd"."""
    out = []
    for i, m in enumerate(leaves):
        fn = lambda y, m=m: model_eps(m, y, t)  # noqa: E731
        div = divergence(fn, x, kind=kind, probes=zeta, fd_eps=fd_e, fx=eps[i])
        out.append(div.detach() if detach else div)
    return torch.stack(out)


# ---------------------------------------------------------------------- the leaf predictions of callable models
def leaf_predictor(
    leaves: list,
    schedule: NoiseSchedule,
    *,
    divergence: str | None = None,
    fd_eps: float = 1e-3,
    weight_grad: bool = False,
    context: Callable[[], Any] | None = None,
) -> Callable:
    """The `predict` of `compose.loop.run` for callable models (`compose.sample`, `compose.sample_smc`, LD3).

    predict(x, t, zeta) -> eps_hat (L, n, ...) of every leaf at (x, t); with `divergence` (a kind of
    `compose.options.DIVERGENCES`) also their divergences (L, n) from the step's probes zeta (finite-difference step
    fd_eps * sigma_t), else None; at alpha(t) = 0 (t = 1 of a flow path) a third element, the leaves' data
    predictions (L, n, ...), which the step from there needs. weight_grad: the divergences carry gradients (LD3's
    weights); context: a context-manager factory around them (LD3: math attention for forward-mode AD).
    """

    def predict(x: torch.Tensor, t: torch.Tensor, zeta: torch.Tensor | None):
        eps = torch.stack([model_eps(m, x, t) for m in leaves])
        t_d = t.detach()
        div = None
        if divergence is not None:
            x_d, eps_d = (x, eps) if weight_grad else (x.detach(), eps.detach())
            with context() if context is not None else contextlib.nullcontext():
                div = leaf_divergences(
                    leaves,
                    x_d,
                    t_d,
                    eps_d,
                    divergence,
                    zeta,
                    fd_eps * float(schedule.sigma(t_d)),
                    detach=not weight_grad,
                )
        if float(schedule.alpha(t_d)) == 0.0:
            return eps, div, torch.stack([model_x0(m, x, t) for m in leaves])
        return eps, div

    return predict


__all__ = [
    "Composer",
    "StepOutput",
    "common_schedule",
    "divergence",
    "fd_divergence",
    "jvp_divergence",
    "leaf_divergences",
    "leaf_predictor",
    "probe_points",
    "rademacher",
]
