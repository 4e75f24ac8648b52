"""Products of experts sampled with particles and Feynman-Kac weights (docs/MATH.md section 8; Skreta et al.,
ICML 2025, arXiv 2503.02819).

`PoE(a, b, exponents=[a_1, a_2])` targets the product p ~ prod_i q_i^{a_i} ("likely under every model"), which no
single trajectory reaches: SuperDiff's AND makes the densities equal and the plain sum of scores (`Product`) is
biased at t > 0. Particles move with the SDE of the summed score and carry log-weights that correct the bias:
  start   x ~ N(0, sigma_T^2 / A),  A = sum_i a_i;
  move    dx = [-f x + g^2 s_bar] h + g sqrt(h) z,  s_bar = sum_i a_i s_i   (a SUM, not an average);
  weight  dl = (h g^2 / 2) (||s_bar||^2 - sum_i a_i ||s_i||^2)   (scores only: no divergence, no extra call);
the term (A - 1) d f h of the increment is the same for every particle and is dropped. Special cases: product of two
h g^2 <s_1, s_2>; tempering q^beta h g^2 beta (beta - 1) / 2 ||s||^2; CFG with scale w (exponents w and 1 - w)
h g^2 w (w - 1) / 2 ||s_c - s_u||^2. With `unconditional=u` the exponents are guidance weights w_i and the target is
q_u^(1 - sum w) prod_i q_{c_i}^{w_i} (A = 1): s_bar = s_u + sum_i w_i delta_i and
dl = (h g^2 / 2) (||sum_i w_i delta_i||^2 - sum_i w_i ||delta_i||^2), delta_i = s_{c_i} - s_u, the guided text-to-image
conjunction. Everything is computed in eps units (g^2 / sigma^2 stays finite as sigma -> 0).

Particles come in groups (one group per requested sample / image): a state is (n, K, ...), flattened to (n K, ...)
for the network call. Within a group the log-weights are accumulated in float64; when the effective sample size
(sum e^l)^2 / sum e^(2l) drops below ess_threshold K inside the active time window, the group is resampled
(systematic) and its log-weights reset to 0. Clamping increments would bias the target (it is never done).

Rejuvenation (resample-move, `langevin_steps` > 0). The weighted particles at t target p_t ~ prod_j q_{j,t}^{a_j},
whose score is exactly s_bar; any move that leaves p_t invariant keeps the weights as they are, and after a
resampling it pulls the copies of one particle apart again. The move is Metropolis-adjusted Langevin (MALA):
  propose  x' = x + tau s_bar(x) + sqrt(2 tau) z,   tau = langevin_step sigma_t^2 / A   (sigma_t^2 / A: the prior's
           variance of the product, an upper bound on its variance per dimension when the factors are Gaussian),
  accept   with probability min(1, p_t(x') N(x; x' + tau s_bar(x'), 2 tau) / (p_t(x) N(x'; x + tau s_bar(x), 2 tau))),
  where log p_t(x') - log p_t(x) ~ <s_bar(x) + s_bar(x'), x' - x> / 2 (trapezoid rule on the scores: no log-density
  is needed; exact when p_t is Gaussian, otherwise off by O(|x' - x|^3 |grad^3 log p_t|) with |x' - x| ~
  sqrt(2 tau d)). Each leaf's tracked log q moves by the same trapezoid rule on its own score.
Without the test (unadjusted Langevin) the invariant law would be off by O(tau): for N(m, v I) its variance is
v / (1 - tau / (2 v)), 33% too wide at tau = v / 2; with it the only bias left is the trapezoid error above (zero on
Gaussian targets; the trapezoid bias grows with langevin_step and smaller steps mix between modes more slowly (the
docs/benchmarks/smc.md measures both). Cost: one network evaluation of every leaf per move and
particle; the prediction at the proposal is kept for the next step whichever way the test goes, and the one at the
start of the moves is the one the next step would have made, so L moves after each of the N - 1 reweighted steps
cost N + L (N - 1) evaluations per particle for an N-step grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .composer import Composer, leaf_predictor
from .grids import resolve_grid
from .loop import Draws, Hooks, StepInfo, TorchDraws, run
from .models import model_name
from .operators import OR, Average, Expr, Product, StepContext
from .options import SMC_FINALS, check_grid, check_langevin_options, check_smc_options, check_solver


class PoE(Expr):
    """Weighted product of experts prod_i q_i^{a_i}, sampled by particles with Feynman-Kac weights (`sample_smc`).

    Args:
        models: the factors: models, or expressions with a density (`OR`, `Average`, `Product` of models / OR); an
            `AND` has no density to multiply and `Guided` is written with `unconditional=` instead.
        exponents: (M,) a_i, default 1 each. Without `unconditional` they must be positive (tempering: one model
            with a_1 = beta). With `unconditional` they are the guidance weights w_i (non-zero; negative = negation).
        unconditional: a model u for the guided form q_u^(1 - sum w) prod_i q_{c_i}^{w_i} (CFG: one model, w_1 = w).

    A PoE is always the outermost operator (it needs particles); nested inside another operator it is refused.
    """

    has_density = False  # a product with particles is sampled, not multiplied again

    def __init__(self, *models: Any, exponents: Any = None, unconditional: Any = None) -> None:
        super().__init__(*models, name="PoE")
        if len(self.children) < 1:
            raise ValueError("PoE needs at least one model (one model with an exponent is tempering).")
        for c in self.children:
            if isinstance(c, Expr):
                bad = [n for n in c.nodes() if not n.has_density]
                if bad:
                    raise ValueError(
                        f"PoE: the factor {c!r} contains {bad[0].op_name}, which has no density to multiply. Use "
                        "models, OR, Average or Product as factors; write guidance as PoE(..., unconditional=u)."
                    )
                for node in c.nodes():
                    if isinstance(node, OR) and any(isinstance(n, (Average, Product)) for n in node.nodes()):
                        raise ValueError(
                            f"PoE: the factor {node!r} mixes products; the weights need every factor to be a model "
                            "or a mixture (OR) of models, whose density is a diffusion marginal. Multiply outside "
                            "the OR instead."
                        )
        if isinstance(unconditional, Expr):
            raise ValueError("PoE: unconditional must be a model, not an expression.")
        k = len(self.children)
        a = torch.ones(k, dtype=torch.float64) if exponents is None else torch.as_tensor(exponents).double().flatten()
        if a.numel() != k:
            raise ValueError(f"PoE: exponents has {a.numel()} entries for {k} factors; give one exponent per factor.")
        if not bool(torch.all(torch.isfinite(a))):
            raise ValueError(f"PoE: exponents must be finite; got {a.tolist()}.")
        if bool(torch.any(a == 0)):
            raise ValueError(f"PoE: an exponent of 0 removes its factor; drop that model instead (got {a.tolist()}).")
        if unconditional is None and bool(torch.any(a < 0)):
            raise ValueError(
                f"PoE: exponents must be positive without an unconditional model (got {a.tolist()}): q^a with a <= 0 "
                "is not a density. For negation or CFG give unconditional=u; the exponents are then guidance weights."
            )
        self.exponents = a
        self.unconditional = unconditional
        # Factors are models or OR mixtures of models (diffusion marginals): Product / Average factors are flattened
        # into their children with multiplied exponents (q_a q_b as one factor is no marginal: its weights differ).
        factors, exps = [], []
        for c, e in zip(self.children, a.tolist(), strict=True):
            for f, ef in _flatten(c, e):
                factors.append(f)
                exps.append(ef)
        if any(e == 0 for e in exps) or (unconditional is None and any(e < 0 for e in exps)):
            raise ValueError(
                f"PoE: the flattened exponents {exps} of the factors' models must be non-zero, and positive without "
                "an unconditional model; check the weights of the Product / Average factors."
            )
        if unconditional is not None:  # the guided form has total exponent A = 1
            factors.append(unconditional)
            exps.append(1.0 - float(a.sum()))
        self.factor_exponents = torch.tensor(exps, dtype=torch.float64)
        self.total_exponent = float(self.factor_exponents.sum())
        # The move: s_bar = sum_j a_j s_j, exactly a `Product` of the factors (which also tracks each leaf's log q).
        self.product = Product(*factors, weights=self.factor_exponents)

    def leaves(self) -> list:
        return self.product.leaves()

    def _assign(self, leaves: list, path: str) -> None:
        if path != "root":
            raise ValueError(
                "PoE must be the outermost operator (it samples with particles and resampling); it cannot be nested "
                "inside OR / AND / Average / Product / Guided. Put those inside the PoE instead."
            )
        super()._assign(leaves, path)

    def coeffs(self, ctx: StepContext, outer: Any = None) -> torch.Tensor:
        raise ValueError("a PoE is sampled with particles: use compose.sample(poe, num_particles=K) or sample_smc.")

    def __repr__(self) -> str:
        inner = ", ".join(repr(c) if isinstance(c, Expr) else model_name(c) for c in self.children)
        u = "" if self.unconditional is None else f", unconditional={model_name(self.unconditional)}"
        return f"PoE({inner}, exponents={self.exponents.tolist()}{u})"


def _flatten(node: Any, e: float) -> list[tuple[Any, float]]:
    """(factor, exponent) pairs of node^e with Product / Average expanded: q_a^w q_b^v stays a product of marginals."""
    if isinstance(node, Product):
        return [p for c, w in zip(node.children, node.weights.tolist(), strict=True) for p in _flatten(c, e * w)]
    if isinstance(node, Average):
        k = len(node.children)
        return [p for c in node.children for p in _flatten(c, e / k)]
    return [(node, e)]


# ---------------------------------------------------------------------- the pieces (pure functions)
def log_weight_increment(
    eps_factors: torch.Tensor, exponents: torch.Tensor, h: float, g2_over_sigma2: float
) -> torch.Tensor:
    """Feynman-Kac log-weight increment of one step for the product prod_j q_j^{a_j} (docs/MATH.md section 8), float64.

        dl = (h g^2 / 2) (||s_bar||^2 - sum_j a_j ||s_j||^2)
           = (h g^2 / (2 sigma^2)) (||e_bar||^2 - sum_j a_j ||e_j||^2)     (eps units, e_bar = sum_j a_j e_j)

    Args:
        eps_factors: (J, n, ...) each factor's eps_hat at (x, t_cur).
        exponents: (J,) a_j (the unconditional factor of the guided form has 1 - sum w).
        h: step length t_cur - t_next.
        g2_over_sigma2: g(t_cur)^2 / sigma(t_cur)^2.
    Returns: (n,) float64.
    """
    J, n = eps_factors.shape[0], eps_factors.shape[1]
    E = eps_factors.reshape(J, n, -1).to(torch.float64)
    a = torch.as_tensor(exponents, dtype=torch.float64, device=E.device)
    e_bar = torch.einsum("j,jnd->nd", a, E)
    return 0.5 * h * g2_over_sigma2 * ((e_bar**2).sum(-1) - torch.einsum("j,jn->n", a, (E**2).sum(-1)))


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """ESS (sum_k e^{l_k})^2 / sum_k e^{2 l_k} of every group, in particles (1 .. K). log_w: (n, K) -> (n,)."""
    log_w = log_w.to(torch.float64)
    return torch.exp(2 * torch.logsumexp(log_w, -1) - torch.logsumexp(2 * log_w, -1))


def systematic_resample(log_w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Systematic resampling: ancestor indices (n, K) from log-weights (n, K) and one uniform u in [0, 1) per group.

    Particle k is copied floor(K w_k) or ceil(K w_k) times (w: normalised weights), and K w_k times on average over u.
    """
    n, K = log_w.shape
    w = torch.softmax(log_w.to(torch.float64), -1)
    cdf = w.cumsum(-1)
    cdf[:, -1] = 1.0  # guard the float rounding of the last cumulative sum
    pos = (
        u.to(device=w.device, dtype=torch.float64).reshape(n, 1) + torch.arange(K, dtype=w.dtype, device=w.device)
    ) / K
    return torch.searchsorted(cdf, pos, right=True).clamp_max(K - 1)


def choose_one(log_w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One particle index per group (n,), drawn with probability softmax(log_w) (inverse CDF at u (n,) in [0, 1))."""
    cdf = torch.softmax(log_w.to(torch.float64), -1).cumsum(-1)
    u = u.to(device=cdf.device, dtype=torch.float64).reshape(-1, 1)
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_max(log_w.shape[1] - 1)


@dataclass
class ParticleStep:
    """One step of the particle sampler (all particles flattened to n K rows)."""

    x: torch.Tensor  # (n K, ...) states at t_next (after any resampling)
    log_q: torch.Tensor  # (n K, L) float64 tracked leaf log-densities at t_next
    log_w: torch.Tensor  # (n, K) float64 log-weights at t_next (0 in resampled groups)
    ancestors: torch.Tensor  # (n, K) index (within the group) of every particle's parent at this step
    ess: torch.Tensor  # (n,) ESS before resampling, in particles
    resampled: torch.Tensor  # (n,) bool


def factor_increment(poe: PoE, eps: torch.Tensor, log_q: torch.Tensor, rho: float) -> torch.Tensor:
    """(n K,) float64 Feynman-Kac log-weight increment of one step with rate rho = h g^2 / sigma^2.

    eps: (L, n K, ...) leaf predictions at the start of the step; log_q: (n K, L) there (OR factors weigh their
    leaves by it).
    """
    ctx = StepContext(Q=torch.zeros(0), r=torch.zeros(0), log_q=log_q.to(torch.float64))
    C = poe.product._child_coeffs(ctx)  # (n K, J, L): leaf coefficients of every factor (OR factors use log q)
    E = eps.reshape(eps.shape[0], eps.shape[1], -1).to(torch.float64)
    eps_factors = torch.einsum("njl,lnd->jnd", C, E)
    return log_weight_increment(eps_factors, poe.factor_exponents, rho, 1.0)


def reweight_and_resample(
    x: torch.Tensor,
    log_q: torch.Tensor,
    log_w: torch.Tensor,
    dl: torch.Tensor,
    u: torch.Tensor,
    t_next: float,
    *,
    ess_threshold: float = 0.5,
    resample_window: tuple[float, float] = (0.0, 1.0),
) -> ParticleStep:
    """Add the increments dl (n K,) to the log-weights (n, K) and resample (systematic, u (n,)) every group whose ESS
    fell below ess_threshold K, where t_next lies in resample_window. x: (n K, ...), log_q: (n K, L), group-major."""
    n, K = log_w.shape
    log_w = log_w.to(torch.float64) + dl.reshape(n, K)
    log_w = log_w - log_w.amax(-1, keepdim=True)  # mean-free shifts do not change the normalised weights
    ess = effective_sample_size(log_w)
    lo, hi = resample_window
    resampled = (ess < ess_threshold * K) & (lo <= t_next <= hi)
    idx = torch.arange(K, device=log_w.device).expand(n, K).clone()
    if bool(resampled.any()):
        idx[resampled] = systematic_resample(log_w[resampled], u.to(log_w.device)[resampled])
        flat = (idx + K * torch.arange(n, device=idx.device)[:, None]).reshape(-1)
        x, log_q = x[flat.to(x.device)], log_q[flat.to(log_q.device)]
        log_w = torch.where(resampled[:, None], torch.zeros_like(log_w), log_w)
    return ParticleStep(x, log_q, log_w, idx, ess, resampled)


@dataclass
class LangevinMove:
    """The particles after `langevin_move` (same rows, same weights)."""

    x: torch.Tensor  # (n, ...) moved particles
    log_q: torch.Tensor  # (n, L) float64 leaf log-densities at the moved particles (trapezoid updates)
    eps: torch.Tensor  # (L, n, ...) leaf predictions at (x, t): the next step reuses them
    accepted: torch.Tensor  # (n,) float64 fraction of the moves each particle accepted


def langevin_move(
    poe: PoE,
    eps_fn: Callable[[torch.Tensor, float], torch.Tensor],
    x: torch.Tensor,
    t: float,
    sigma: float,
    eps: torch.Tensor,
    log_q: torch.Tensor,
    noises: list[torch.Tensor],
    uniforms: list[torch.Tensor],
    step: float,
) -> LangevinMove:
    """Metropolis-adjusted Langevin moves that leave the current target p_t ~ prod_j q_{j,t}^{a_j} invariant.

    For each (noise z, uniform u) pair, with s_bar = sum_j a_j s_j = -e_bar / sigma (the move's own score) and the
    step size tau = step sigma^2 / A:
        x' = x + tau s_bar(x) + sqrt(2 tau) z,
        log q_l(x') - log q_l(x) ~ <s_l(x) + s_l(x'), x' - x> / 2    (trapezoid rule: exact for Gaussian q_l),
        accept if log u < log p_t(x') - log p_t(x) + log N(x; x' + tau s_bar(x'), 2 tau) - log N(x'; ..x.., 2 tau),
    where log p_t = `poe.product.node_log_q` of the leaf log q's. Every move costs one network evaluation of every
    leaf at (x', t) (eps_fn), whose result is kept for the next step whichever way the test goes.

    Args:
        poe: the PoE; its `product` compiled (as `Composer(poe.product)` does), leaves in that order.
        eps_fn: eps_fn(x, t) -> (L, n, ...) the leaf predictions.
        x: (n, ...) particles at t; eps: (L, n, ...) their predictions; log_q: (n, L) their leaf log-densities.
        noises: standard normals shaped like x, one per move; uniforms: (n,) in [0, 1), one per move.
        step: tau in units of sigma_t^2 / A.
    """
    n = x.shape[0]
    tau = step * sigma**2 / poe.total_exponent
    zero = torch.zeros(0)
    log_q = log_q.to(torch.float64)
    accepted = torch.zeros(n, dtype=torch.float64, device=x.device)

    def drift_and_logp(E: torch.Tensor, lq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = StepContext(Q=zero, r=zero, log_q=lq)
        c = poe.product.coeffs(ctx)  # (n, L): leaf coefficients of s_bar (OR factors weigh leaves by log q)
        e_bar = torch.einsum("nl,lnd->nd", c, E)
        return -(tau / sigma) * e_bar, poe.product.node_log_q(StepContext(Q=zero, r=zero, log_q=lq))

    E = eps.reshape(eps.shape[0], n, -1).to(torch.float64)
    xf = x.reshape(n, -1).to(torch.float64)
    for z, u in zip(noises, uniforms, strict=True):
        mu, logp = drift_and_logp(E, log_q)
        zf = z.reshape(n, -1).to(torch.float64)
        x_new = (xf + mu + math.sqrt(2 * tau) * zf).reshape(x.shape).to(x.dtype)
        eps_new = eps_fn(x_new, t)
        x_new = x_new.reshape(n, -1).to(torch.float64)
        E_new = eps_new.reshape(E.shape).to(torch.float64)
        dx = x_new - xf
        lq_new = log_q - (0.5 / sigma) * torch.einsum("lnd,nd->nl", E + E_new, dx)
        mu_new, logp_new = drift_and_logp(E_new, lq_new)
        log_fwd = -((dx - mu) ** 2).sum(-1) / (4 * tau)
        log_bwd = -((-dx - mu_new) ** 2).sum(-1) / (4 * tau)
        acc = torch.log(u.to(torch.float64)) < (logp_new - logp + log_bwd - log_fwd)
        xf = torch.where(acc[:, None], x_new, xf)
        E = torch.where(acc[None, :, None], E_new, E)
        log_q = torch.where(acc[:, None], lq_new, log_q)
        accepted = accepted + acc.to(torch.float64) / len(noises)
    return LangevinMove(xf.reshape(x.shape).to(x.dtype), log_q, E.reshape(eps.shape).to(eps.dtype), accepted)


@dataclass
class Rejuvenation:
    """The particles after `rejuvenate` (all n K rows; rows outside the moved groups unchanged)."""

    x: torch.Tensor  # (n K, ...)
    log_q: torch.Tensor  # (n K, L) float64
    eps: Pending  # the leaf predictions the moves left at (x, t) on the moved rows (for the next step)
    accepted: torch.Tensor  # (n,) float64 acceptance rate of every moved group (0 elsewhere)


@dataclass
class Pending:
    """Leaf predictions at (x, t) known on some rows: `eps` (L, n K, ...) is valid where `rows` (n K,) is True."""

    eps: torch.Tensor
    rows: torch.Tensor

    def complete(self, eps_fn: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, t: float):
        """(L, n K, ...) the predictions at (x, t): the known rows as they are, the others evaluated by eps_fn."""
        if bool(self.rows.all()):
            return self.eps
        eps = self.eps.clone()
        eps[:, ~self.rows] = eps_fn(x[~self.rows], t).to(eps.dtype)
        return eps


def rejuvenate(
    poe: PoE,
    eps_fn: Callable[[torch.Tensor, float], torch.Tensor],
    x: torch.Tensor,
    t: float,
    sigma: float,
    log_q: torch.Tensor,
    groups: torch.Tensor,
    noises: list[torch.Tensor],
    uniforms: list[torch.Tensor],
    step: float,
) -> Rejuvenation:
    """`langevin_move` on the particles of the groups marked in `groups` (n,) bool; x: (n K, ...) group-major.

    noises: standard normals (n K, ...) and uniforms: (n K,), one of each per move, drawn for every row (so the random
    streams do not depend on which groups move); eps_fn is called on the moved rows only (1 + len(noises) calls).
    """
    n = groups.shape[0]
    K = x.shape[0] // n
    rows = groups.to(x.device).repeat_interleave(K)
    mv = langevin_move(
        poe,
        eps_fn,
        x[rows],
        t,
        sigma,
        eps_fn(x[rows], t),
        log_q[rows],
        [z[rows] for z in noises],
        [u.to(x.device)[rows] for u in uniforms],
        step,
    )
    x, log_q = x.clone(), log_q.clone()
    x[rows], log_q[rows] = mv.x, mv.log_q
    eps = torch.zeros((mv.eps.shape[0], *x.shape), dtype=mv.eps.dtype, device=x.device)
    eps[:, rows] = mv.eps
    accepted = torch.zeros(n, dtype=torch.float64)
    accepted[groups.cpu()] = mv.accepted.reshape(-1, K).mean(-1).cpu()
    return Rejuvenation(x, log_q, Pending(eps, rows), accepted)


def langevin_groups(after: str, resampled: torch.Tensor, t_next: float, window: tuple[float, float]) -> torch.Tensor:
    """(n,) bool: the groups to rejuvenate after a step, by `langevin_after` ("resample" or "every")."""
    if after == "resample":
        return resampled.clone()
    return torch.full(resampled.shape, window[0] <= t_next <= window[1], device=resampled.device)


# ---------------------------------------------------------------------- the sampler
class ParticleHooks(Hooks):
    """The particle sampler as hooks of `compose.loop.run`: Feynman-Kac weights, resampling, Langevin moves.

    x in the loop holds the n K particles group-major. Every step but the last (the step to the data, which maps
    each particle to its x0_hat) adds the log-weight increment, resamples the groups whose ESS fell, and, with
    langevin_steps > 0, rejuvenates (the predictions the moves leave at (x, t_next) serve the next step).
    """

    def __init__(
        self,
        poe: PoE,
        schedule: Any,
        n: int,
        K: int,
        *,
        ess_threshold: float,
        resample_window: tuple[float, float],
        langevin_steps: int = 0,
        langevin_step: float = 0.5,
        langevin_after: str = "every",
        device: Any = None,
    ) -> None:
        self.poe, self.schedule, self.n, self.K = poe, schedule, n, K
        self.ess_threshold, self.window = ess_threshold, resample_window
        self.langevin = (langevin_steps, langevin_step, langevin_after)
        self.log_w = torch.zeros(n, K, dtype=torch.float64, device=device)
        self.lineage = torch.arange(K, device=device).expand(n, K).clone()
        self.ess: list[torch.Tensor] = []
        self.resampled: list[torch.Tensor] = []
        self.evaluations = torch.zeros(n, dtype=torch.float64)
        self.accepted = torch.zeros(n, dtype=torch.float64)
        self.moved = torch.zeros(n, dtype=torch.float64)
        self.pending: Pending | None = None
        self.u: torch.Tensor | None = None

    def draw(self, k: int, draws: Draws, final: bool) -> None:
        self.u = None if final else draws.uniforms(self.n)

    def predict(self, predict, x, t, zeta):
        if self.pending is None:
            return predict(x, t, zeta)
        eps = self.pending.complete(
            lambda xr, tt: predict(xr, torch.as_tensor(tt, dtype=torch.float64), None)[0], x, t
        )
        self.pending = None
        return eps, None

    def state_replaced(self) -> None:
        self.pending = None  # new particles from a callback: evaluate them afresh

    def after_step(self, k: int, step: StepInfo) -> tuple[torch.Tensor, torch.Tensor]:
        self.evaluations += 1
        if step.final or math.isinf(step.rho):  # the steps to the data and from pure noise are not reweighted
            return step.x, step.log_q
        dl = factor_increment(self.poe, step.eps, step.log_q_prev, step.rho)
        st = reweight_and_resample(
            step.x,
            step.log_q,
            self.log_w,
            dl,
            self.u,
            step.t_next,
            ess_threshold=self.ess_threshold,
            resample_window=self.window,
        )
        x, log_q, self.log_w = st.x, st.log_q, st.log_w
        self.lineage = torch.gather(self.lineage, 1, st.ancestors.to(self.lineage.device))
        self.ess.append(st.ess)
        self.resampled.append(st.resampled)
        L, step_size, after = self.langevin
        groups = langevin_groups(after, st.resampled, step.t_next, self.window) if L else None
        if groups is not None and bool(groups.any()):
            noises = [step.draws.noise(x) for _ in range(L)]
            us = [step.draws.uniform_rows(self.n * self.K) for _ in range(L)]
            sigma = float(self.schedule.sigma(step.t_next))

            def eps_fn(xr: torch.Tensor, tt: float) -> torch.Tensor:
                return step.predict(xr, torch.as_tensor(tt, dtype=torch.float64), None)[0]

            rj = rejuvenate(self.poe, eps_fn, x, step.t_next, sigma, log_q, groups, noises, us, step_size)
            x, log_q, self.pending = rj.x, rj.log_q, rj.eps
            self.evaluations += groups.cpu().double() * L  # the call at the start is the next step's
            self.accepted += rj.accepted
            self.moved += groups.cpu().double()
        return x, log_q

    def pick(self, u: torch.Tensor) -> torch.Tensor:
        """(n,) flat row index of one particle per group, drawn by the final normalised weights (u: (n,))."""
        log_w = self.log_w - torch.logsumexp(self.log_w, -1, keepdim=True)
        return choose_one(log_w, u) + self.K * torch.arange(self.n, device=log_w.device)


@dataclass
class SMCResult:
    """What `sample_smc` returns.

    samples: (n, K, ...) the particles of every group at the last grid time (the data when the grid ends at 0).
    log_weights: (n, K) float64 final log-weights (normalised: logsumexp = 0); uniform after final="resample".
    log_q: (n, K, L) float64 tracked log-density of every leaf (Ito estimator along the particle paths).
    ess: (steps - 1, n) ESS in particles after every reweighted step (all but the step to the data), before
        resampling.
    resampled: (steps - 1, n) bool, where a group was resampled.
    num_resamples: (n,) resampling events per group (the final resample not counted).
    ancestors: (n, K) the starting particle (0 .. K-1) each final particle descends from.
    timesteps: the grid (steps + 1,), float64.
    evaluations: (n,) network evaluations per particle of every group (of every leaf): steps, plus langevin_steps
        for every rejuvenation of the group.
    acceptance: (n,) mean acceptance rate of the group's Langevin moves (NaN where none was made).
    """

    samples: torch.Tensor
    log_weights: torch.Tensor
    log_q: torch.Tensor
    ess: torch.Tensor
    resampled: torch.Tensor
    num_resamples: torch.Tensor
    ancestors: torch.Tensor
    timesteps: torch.Tensor
    evaluations: torch.Tensor | None = None
    acceptance: torch.Tensor | None = None

    def unique_ancestors(self) -> torch.Tensor:
        """(n,) number of distinct starting particles among every group's final particles (lineage collapse)."""
        return torch.tensor([len(torch.unique(a)) for a in self.ancestors])


def sample_smc(
    expr: PoE,
    num_samples: int | None = None,
    num_particles: int = 64,
    x_T: torch.Tensor | None = None,
    timesteps: Any = None,
    steps: int | None = None,
    method: str = "sde",
    generator: torch.Generator | None = None,
    *,
    grid: str = "log_snr",
    solver: str = "euler",
    ess_threshold: float = 0.5,
    resample_window: tuple[float, float] = (0.0, 1.0),
    final: str = "resample",
    control_variate: bool = True,
    langevin_steps: int = 0,
    langevin_step: float = 0.5,
    langevin_after: str = "every",
    dtype: torch.dtype = torch.float32,
    callback: Callable[[int, float, torch.Tensor, torch.Tensor], None] | None = None,
    progress: bool = False,
) -> SMCResult:
    """Sample the product of a `PoE` with n groups of K particles (docs/MATH.md section 8).

    Args:
        expr: a `PoE`.
        num_samples: n, the number of groups (each gives weighted particles of the product); default 1.
        num_particles: K >= 2 particles per group.
        x_T: (n, K, ...) starting particles; default N(0, sigma_{t_0}^2 / A) with A the total exponent.
        timesteps / steps / grid: the time grid, as in `compose.sample` (default 500 log-SNR steps, ending at the
            data: the last step maps every particle to its x0_hat and is not reweighted).
        method: "sde" only (the weights need it). solver: "euler" or "ddim" (the Euler-Maruyama step in t or in
            sigma / alpha).
        generator: for x_T, the SDE noise and the resampling uniforms (same seed, same output).
        ess_threshold: resample a group when its ESS drops below ess_threshold * K; in (0, 1].
        resample_window: (t_lo, t_hi): resample only after steps that land at t_next in this interval.
        final: "resample" (a last systematic resample: equally weighted particles) or "weights" (keep log_weights).
        langevin_steps: rejuvenation (resample-move): this many Metropolis-adjusted Langevin moves per particle
            (`langevin_move`), which leave the current product target invariant and keep the weights; each costs one
            network evaluation per leaf and particle. 0 (default): none, the plain sampler.
        langevin_step: the moves' step tau = langevin_step sigma_t^2 / A, in (0, 1].
        langevin_after: "resample": move the particles of a group right after it was resampled (the copies drift
            apart again); "every": after every step whose t_next lies in resample_window.
        callback: callback(step_index, t_next, x (n, K, ...), log_w (n, K)) after every step.
        progress: show a tqdm bar.
    """
    if not isinstance(expr, PoE):
        raise ValueError(f"sample_smc samples a compose.PoE; got {type(expr).__name__}. Wrap it: PoE(a, b).")
    window = check_smc_options(num_particles, ess_threshold, resample_window, method)
    check_langevin_options(langevin_steps, langevin_step, langevin_after)
    check_solver(solver, method)
    if final not in SMC_FINALS:
        raise ValueError(f"final={final!r} is not known; use one of {SMC_FINALS}.")
    if expr.total_exponent <= 0:
        raise ValueError(f"PoE: the total exponent must be positive; got {expr.total_exponent}.")
    expr.compile()
    composer = Composer(expr.product, method="sde", control_variate=control_variate)
    sch, K = composer.schedule, num_particles
    if timesteps is not None and steps is not None:
        raise ValueError("give either timesteps= (an explicit grid) or steps= (a default grid), not both.")
    if timesteps is not None:
        ts = check_grid(timesteps, "timesteps")
    else:
        ts, _, _ = resolve_grid(sch, grid, steps, default_steps=500)
    t0 = float(ts[0])
    if x_T is None:
        n = 1 if num_samples is None else num_samples
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"num_samples must be a positive integer; got {num_samples!r}.")
        shape = getattr(composer.leaves[0], "sample_shape", None)
        if shape is None:
            raise ValueError("the models have no `sample_shape`; pass x_T= (n, K, ...) with the starting particles.")
        x = torch.randn((n * K, *shape), generator=generator, dtype=torch.float64)
        x = (x * (float(sch.sigma(t0)) / math.sqrt(expr.total_exponent))).to(dtype)
    else:
        if x_T.ndim < 2 or x_T.shape[1] != K:
            raise ValueError(f"x_T must have shape (n, num_particles={K}, ...); got {tuple(x_T.shape)}.")
        n = x_T.shape[0]
        if num_samples is not None and num_samples != n:
            raise ValueError(f"num_samples={num_samples} does not match x_T with {n} groups.")
        x = x_T.reshape(n * K, *x_T.shape[2:])
    predict = leaf_predictor(composer.leaves, sch)
    hooks = ParticleHooks(
        expr,
        sch,
        n,
        K,
        ess_threshold=ess_threshold,
        resample_window=window,
        langevin_steps=langevin_steps,
        langevin_step=langevin_step,
        langevin_after=langevin_after,
        device=x.device,
    )
    cb = None
    if callback is not None:

        def cb(k, t_cur, t_next, x_, log_q_):
            callback(k, t_next, x_.reshape(n, K, *x_.shape[1:]), hooks.log_w)

    bar = _progress(progress, len(ts) - 1, f"compose.sample_smc (K={K})")
    draws = TorchDraws(generator)
    tr = run(
        composer,
        predict,
        x,
        ts,
        composer.initial_log_q(x, t0),
        solver=solver,
        draws=draws,
        hooks=hooks,
        callback=cb,
        progress=bar,
    )
    x, log_q, lineage = tr.x, tr.log_q, hooks.lineage
    log_w = hooks.log_w - torch.logsumexp(hooks.log_w, -1, keepdim=True)
    if final == "resample":
        idx = systematic_resample(log_w, draws.uniforms(n))
        flat = (idx + K * torch.arange(n, device=idx.device)[:, None]).reshape(-1)
        x, log_q = x[flat], log_q[flat]
        lineage = torch.gather(lineage, 1, idx)
        log_w = torch.full_like(log_w, -math.log(K))
    res = torch.stack(hooks.resampled) if hooks.resampled else torch.zeros(0, n, dtype=torch.bool)
    return SMCResult(
        samples=x.reshape(n, K, *x.shape[1:]),
        log_weights=log_w,
        log_q=log_q.reshape(n, K, -1),
        ess=torch.stack(hooks.ess) if hooks.ess else torch.zeros(0, n, dtype=torch.float64),
        resampled=res,
        num_resamples=res.sum(0),
        ancestors=lineage,
        timesteps=ts,
        evaluations=hooks.evaluations,
        acceptance=hooks.accepted / hooks.moved,
    )


def _progress(show: bool, total: int, desc: str):
    """A tqdm bar's update method (or None)."""
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc).update
