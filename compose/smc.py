"""Products of experts sampled with particles and Feynman-Kac weights (MATH.md section 8; Skreta et al., ICML 2025,
arXiv 2503.02819).

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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .engine import Composer, check_grid
from .grids import make_grid
from .models import model_eps, model_name
from .operators import AND, OR, Average, Expr, Guided, Product, StepContext
from .predictions import bcast

FINALS = ("resample", "weights")


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

    def __init__(self, *models: Any, exponents: Any = None, unconditional: Any = None) -> None:
        super().__init__(*models, name="PoE")
        if len(self.children) < 1:
            raise ValueError("PoE needs at least one model (one model with an exponent is tempering).")
        for c in self.children:
            if isinstance(c, Expr):
                bad = [n for n in c.nodes() if isinstance(n, (AND, Guided, PoE))]
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
    """Feynman-Kac log-weight increment of one step for the product prod_j q_j^{a_j} (MATH.md section 8), float64.

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


def check_smc_options(num_particles: Any, ess_threshold: Any, resample_window: Any, method: str = "sde") -> tuple:
    """ValueError for bad particle options; returns the window (t_lo, t_hi) as floats."""
    if method != "sde":
        raise ValueError(
            f"method={method!r} cannot be used with a particle product: the Feynman-Kac weights need the SDE. Use "
            "method='sde', or an ODE operator (compose.AND / compose.Product) without particles."
        )
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 2:
        raise ValueError(
            f"num_particles must be an integer >= 2 (with one particle nothing is reweighted); got {num_particles!r}. "
            "Use compose.Product (operator='product') for a single trajectory."
        )
    if not (isinstance(ess_threshold, (int, float)) and 0 < ess_threshold <= 1):
        raise ValueError(
            f"ess_threshold must lie in (0, 1] (a fraction of num_particles; 0.5 is usual, 1 resamples every step); "
            f"got {ess_threshold!r}."
        )
    try:
        lo, hi = (float(v) for v in resample_window)
    except (TypeError, ValueError):
        raise ValueError(f"resample_window must be a pair (t_lo, t_hi); got {resample_window!r}.") from None
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"resample_window=(t_lo, t_hi) must satisfy 0 <= t_lo < t_hi <= 1; got {resample_window!r}.")
    return lo, hi


@dataclass
class ParticleStep:
    """One step of the particle sampler (all particles flattened to n K rows)."""

    x: torch.Tensor  # (n K, ...) states at t_next (after any resampling)
    log_q: torch.Tensor  # (n K, L) float64 tracked leaf log-densities at t_next
    log_w: torch.Tensor  # (n, K) float64 log-weights at t_next (0 in resampled groups)
    ancestors: torch.Tensor  # (n, K) index (within the group) of every particle's parent at this step
    ess: torch.Tensor  # (n,) ESS before resampling, in particles
    resampled: torch.Tensor  # (n,) bool
    coeffs: torch.Tensor  # (n K, L) leaf coefficients of the move
    kappa: dict


def particle_step(
    composer: Composer,
    poe: PoE,
    x: torch.Tensor,
    t_cur: float,
    t_next: float,
    eps: torch.Tensor,
    log_q: torch.Tensor,
    log_w: torch.Tensor,
    noise: torch.Tensor,
    u: torch.Tensor,
    *,
    ess_threshold: float = 0.5,
    resample_window: tuple[float, float] = (0.0, 1.0),
) -> ParticleStep:
    """Move every particle (`Composer.step` of the PoE's Product), add its log-weight increment, resample if needed.

    Args:
        composer: `Composer(poe.product, method="sde")`.
        x: (n K, ...) particles at t_cur, group-major (the K particles of group i are rows i K .. i K + K - 1).
        eps: (L, n K, ...) leaf predictions at (x, t_cur), leaves in `composer.leaves` order.
        log_q: (n K, L) leaf log-densities; log_w: (n, K) float64 log-weights; noise: (n K, ...) standard normal.
        u: (n,) uniforms in [0, 1) for systematic resampling (drawn every step, used where a group resamples).
    """
    n, K = log_w.shape
    ctx = StepContext(Q=torch.zeros(0), r=torch.zeros(0), log_q=log_q.to(torch.float64))
    C = poe.product._child_coeffs(ctx)  # (n K, J, L): leaf coefficients of every factor (OR factors use log q)
    E = eps.reshape(eps.shape[0], eps.shape[1], -1).to(torch.float64)
    eps_factors = torch.einsum("njl,lnd->jnd", C, E)
    w_sch = float(composer.schedule.g2_over_sigma2(t_cur))
    dl = log_weight_increment(eps_factors, poe.factor_exponents, t_cur - t_next, w_sch)
    out = composer.step(x, t_cur, t_next, eps, log_q, noise=noise)
    log_w = log_w.to(torch.float64) + dl.reshape(n, K)
    log_w = log_w - log_w.amax(-1, keepdim=True)  # mean-free shifts do not change the normalised weights
    ess = effective_sample_size(log_w)
    lo, hi = resample_window
    active = lo <= t_next <= hi
    resampled = (ess < ess_threshold * K) & active
    idx = torch.arange(K, device=log_w.device).expand(n, K).clone()
    x_next, lq = out.x, out.log_q
    if bool(resampled.any()):
        idx[resampled] = systematic_resample(log_w[resampled], u.to(log_w.device)[resampled])
        flat = (idx + K * torch.arange(n, device=idx.device)[:, None]).reshape(-1)
        x_next, lq = x_next[flat], lq[flat]
        log_w = torch.where(resampled[:, None], torch.zeros_like(log_w), log_w)
    return ParticleStep(x_next, lq, log_w, idx, ess, resampled, out.coeffs, out.kappa)


# ---------------------------------------------------------------------- the sampler
@dataclass
class SMCResult:
    """What `sample_smc` returns.

    samples: (n, K, ...) the particles of every group at the last grid time t_N.
    denoised: (n, K, ...) x0_hat of the move's composed prediction at t_N.
    log_weights: (n, K) float64 final log-weights (normalised: logsumexp = 0); uniform after final="resample".
    log_q: (n, K, L) float64 tracked log-density of every leaf (Ito estimator along the particle paths).
    ess: (steps, n) ESS in particles at every step, before resampling.
    resampled: (steps, n) bool, where a group was resampled.
    num_resamples: (n,) resampling events per group (the final resample not counted).
    ancestors: (n, K) the starting particle (0 .. K-1) each final particle descends from.
    timesteps: the grid (steps + 1,), float64.
    """

    samples: torch.Tensor
    denoised: torch.Tensor
    log_weights: torch.Tensor
    log_q: torch.Tensor
    ess: torch.Tensor
    resampled: torch.Tensor
    num_resamples: torch.Tensor
    ancestors: torch.Tensor
    timesteps: torch.Tensor

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
    ess_threshold: float = 0.5,
    resample_window: tuple[float, float] = (0.0, 1.0),
    final: str = "resample",
    control_variate: bool = True,
    dtype: torch.dtype = torch.float32,
    callback: Callable[[int, float, torch.Tensor, torch.Tensor], None] | None = None,
    progress: bool = False,
) -> SMCResult:
    """Sample the product of a `PoE` with n groups of K particles (MATH.md section 8).

    Args:
        expr: a `PoE`.
        num_samples: n, the number of groups (each gives weighted particles of the product); default 1.
        num_particles: K >= 2 particles per group.
        x_T: (n, K, ...) starting particles; default N(0, sigma_{t_0}^2 / A) with A the total exponent.
        timesteps / steps / grid: the time grid, as in `compose.sample` (default 500 log-SNR steps).
        method: "sde" only (the weights need it).
        generator: for x_T, the SDE noise and the resampling uniforms (same seed, same output).
        ess_threshold: resample a group when its ESS drops below ess_threshold * K; in (0, 1].
        resample_window: (t_lo, t_hi): resample only after steps that land at t_next in this interval.
        final: "resample" (a last systematic resample: equally weighted particles) or "weights" (keep log_weights).
        callback: callback(step_index, t_next, x (n, K, ...), log_w (n, K)) after every step.
        progress: show a tqdm bar.
    """
    if not isinstance(expr, PoE):
        raise ValueError(f"sample_smc samples a compose.PoE; got {type(expr).__name__}. Wrap it: PoE(a, b).")
    window = check_smc_options(num_particles, ess_threshold, resample_window, method)
    if final not in FINALS:
        raise ValueError(f"final={final!r} is not known; use one of {FINALS}.")
    if expr.total_exponent <= 0:
        raise ValueError(f"PoE: the total exponent must be positive; got {expr.total_exponent}.")
    expr.compile()
    composer = Composer(expr.product, method="sde", control_variate=control_variate)
    sch, K = composer.schedule, num_particles
    if timesteps is not None and steps is not None:
        raise ValueError("give either timesteps= (an explicit grid) or steps= (a default grid), not both.")
    ts = check_grid(timesteps) if timesteps is not None else make_grid(sch, 500 if steps is None else steps, kind=grid)
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
    log_q = composer.initial_log_q(x, t0)
    log_w = torch.zeros(n, K, dtype=torch.float64, device=x.device)
    lineage = torch.arange(K, device=x.device).expand(n, K).clone()
    ess, resampled = [], []
    iterator = range(len(ts) - 1)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"compose.sample_smc (K={K})")
    for k in iterator:
        t_cur, t_next = float(ts[k]), float(ts[k + 1])
        t = torch.tensor(t_cur, dtype=torch.float64)
        eps = torch.stack([model_eps(m, x, t) for m in composer.leaves])
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.dtype)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        st = particle_step(
            composer, expr, x, t_cur, t_next, eps, log_q, log_w, noise, u,
            ess_threshold=ess_threshold, resample_window=window,
        )  # fmt: skip
        x, log_q, log_w = st.x, st.log_q, st.log_w
        lineage = torch.gather(lineage, 1, st.ancestors)
        ess.append(st.ess)
        resampled.append(st.resampled)
        if callback is not None:
            callback(k, t_next, x.reshape(n, K, *x.shape[1:]), log_w)
    t_last = torch.tensor(float(ts[-1]), dtype=torch.float64)
    final_eps = torch.stack([model_eps(m, x, t_last) for m in composer.leaves])
    eps_bar = torch.einsum("nl,ln...->n...", st.coeffs.to(final_eps.dtype), final_eps)
    denoised = (x - bcast(sch.sigma(t_last), x) * eps_bar) / bcast(sch.alpha(t_last), x)
    log_w = log_w - torch.logsumexp(log_w, -1, keepdim=True)
    if final == "resample":
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        idx = systematic_resample(log_w, u)
        flat = (idx + K * torch.arange(n, device=idx.device)[:, None]).reshape(-1)
        x, denoised, log_q = x[flat], denoised[flat], log_q[flat]
        lineage = torch.gather(lineage, 1, idx)
        log_w = torch.full_like(log_w, -math.log(K))
    res = torch.stack(resampled)
    return SMCResult(
        samples=x.reshape(n, K, *x.shape[1:]),
        denoised=denoised.reshape(n, K, *x.shape[1:]),
        log_weights=log_w,
        log_q=log_q.reshape(n, K, -1),
        ess=torch.stack(ess),
        resampled=res,
        num_resamples=res.sum(0),
        ancestors=lineage,
        timesteps=ts,
    )
