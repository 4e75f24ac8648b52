"""Exact "pretrained models": mixtures of isotropic Gaussians, with closed-form score and log q_t at every t."""

from __future__ import annotations

import math
from typing import Any

import torch

from .predictions import bcast
from .schedule import NoiseSchedule, Tensorish


class GaussianMixture:
    """Data distribution sum_k w_k N(mu_k, s_k^2 I) in R^d, noised by `schedule`.

    q_t(x) = sum_k w_k N(x; alpha_t mu_k, (alpha_t^2 s_k^2 + sigma_t^2) I), so `score`, `eps` and `log_prob` are
    exact at every t. Works in the dtype and on the device of `x`.

    Args:
        means: (K, d) component means.
        stds: a float or (K,) standard deviations.
        weights: (K,) positive mixture weights (normalised here); uniform if None.
        schedule: the noise schedule (default `NoiseSchedule.vp_linear()`).
    """

    def __init__(self, means, stds=1.0, weights=None, schedule: NoiseSchedule | None = None, name: str | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must have shape (K, d); got {tuple(self.means.shape)}.")
        k = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        if bool(torch.any(self.stds <= 0)):
            raise ValueError("stds must be positive.")
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (k,) or bool(torch.any(w <= 0)):
            raise ValueError(f"weights must be {k} positive numbers, one per component; got {w.tolist()}.")
        self.weights = w / w.sum()
        self.schedule = schedule if schedule is not None else NoiseSchedule.vp_linear()
        self.name = name or f"GaussianMixture(K={k}, d={self.dim})"

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def sample_shape(self) -> tuple[int]:
        return (self.dim,)

    def _component_terms(self, x: torch.Tensor, t: Tensorish):
        """Per-component log(w_k N(x; alpha mu_k, var_k I)) (n, K), the centred x (n, K, d) and var_k (n, K)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        alpha = bcast(self.schedule.alpha(t), x)
        sigma = bcast(self.schedule.sigma(t), x)
        # alpha, sigma are scalars or (n, 1); component-wise quantities are (n, K).
        mu = self.means.to(x)
        var = alpha**2 * self.stds.to(x) ** 2 + sigma**2  # (K,) or (n, K)
        var = var.expand(x.shape[0], -1) if var.ndim == 2 else var.expand(x.shape[0], self.means.shape[0])
        diff = x[:, None, :] - alpha[..., None] * mu[None] if alpha.ndim else x[:, None, :] - alpha * mu[None]
        d = self.dim
        log_comp = self.weights.to(x).log() - 0.5 * d * torch.log(2 * math.pi * var) - 0.5 * (diff**2).sum(-1) / var
        return log_comp, diff, var

    def log_prob(self, x: torch.Tensor, t: Tensorish) -> torch.Tensor:
        """Exact log q_t(x), shape (n,)."""
        log_comp, _, _ = self._component_terms(x, t)
        return torch.logsumexp(log_comp, dim=1)

    def responsibilities(self, x: torch.Tensor, t: Tensorish = 0.0) -> torch.Tensor:
        """Posterior probability of each component given x_t, shape (n, K)."""
        log_comp, _, _ = self._component_terms(x, t)
        return torch.softmax(log_comp, dim=1)

    def score(self, x: torch.Tensor, t: Tensorish) -> torch.Tensor:
        """Exact grad_x log q_t(x), shape (n, d)."""
        log_comp, diff, var = self._component_terms(x, t)
        r = torch.softmax(log_comp, dim=1)
        return -(r[..., None] * diff / var[..., None]).sum(1)

    def x0(self, x: torch.Tensor, t: Tensorish) -> torch.Tensor:
        """Exact x0_hat = E[x_0 | x_t] (finite at alpha = 0, where it is the data mean), shape (n, d)."""
        log_comp, diff, var = self._component_terms(x, t)
        r = torch.softmax(log_comp, dim=1)
        t = torch.as_tensor(t, dtype=torch.float64)
        alpha = bcast(self.schedule.alpha(t), x)
        s2 = self.stds.to(x) ** 2
        gain = alpha * s2 / var  # (n, K): alpha s_k^2 / (alpha^2 s_k^2 + sigma^2)
        post = self.means.to(x)[None] + gain[..., None] * diff  # E[x0 | x, k] = mu_k + gain (x - alpha mu_k)
        return (r[..., None] * post).sum(1)

    def eps(self, x: torch.Tensor, t: Tensorish) -> torch.Tensor:
        """Exact eps_hat = -sigma_t score."""
        sigma = bcast(self.schedule.sigma(torch.as_tensor(t, dtype=torch.float64)), x)
        return -sigma * self.score(x, t)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
        """n exact data samples (t = 0), shape (n, d)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[comp] + self.stds[comp, None] * z).to(dtype)

    def __repr__(self) -> str:
        return self.name


def product_of_mixtures(*mixtures: GaussianMixture, exponents=None) -> GaussianMixture:
    """The normalised product prod_i q_i^{a_i} of isotropic mixtures at t = 0, in closed form.

    Every term of the expanded product is one Gaussian (one component of each factor, raised to its exponent), so
    the product is again a mixture; with non-integer exponents this is the product of the per-component powers,
    which equals prod_i q_i^{a_i} only when each factor has one component. The target of products of experts
    (docs/MATH.md section 8).
    """
    a = [1.0] * len(mixtures) if exponents is None else [float(e) for e in exponents]
    if len(a) != len(mixtures) or any(e <= 0 for e in a):
        raise ValueError("exponents must be positive, one per mixture.")
    prec = torch.zeros(1, dtype=torch.float64)
    lin = torch.zeros(1, mixtures[0].dim, dtype=torch.float64)
    logw = torch.zeros(1, dtype=torch.float64)
    quad = torch.zeros(1, dtype=torch.float64)
    d = mixtures[0].dim
    for m, e in zip(mixtures, a, strict=True):
        p_k = e / m.stds**2  # (K,)
        # Each factor component contributes w_k^e N(mu_k, s_k^2)^e ∝ w_k^e (2 pi s^2)^(-d e / 2) exp(-e|x-mu|^2/(2s^2))
        prec = (prec[:, None] + p_k[None]).reshape(-1)
        lin = (lin[:, None] + (p_k[:, None] * m.means)[None]).reshape(-1, d)
        quad = (quad[:, None] + (p_k * (m.means**2).sum(-1))[None]).reshape(-1)
        logw = (
            logw[:, None] + (e * m.weights.log() - 0.5 * d * e * torch.log(2 * math.pi * m.stds**2))[None]
        ).reshape(-1)
    means = lin / prec[:, None]
    variances = 1.0 / prec
    # Integrate exp(-0.5 (prec |x|^2 - 2 lin.x + quad)) over x: (2 pi / prec)^(d/2) exp(0.5 |lin|^2 / prec - 0.5 quad)
    logw = logw + 0.5 * d * torch.log(2 * math.pi * variances) + 0.5 * (lin**2).sum(-1) / prec - 0.5 * quad
    weights = torch.softmax(logw, 0)
    keep = weights > 1e-12
    return GaussianMixture(means[keep], variances[keep].sqrt(), weights[keep], schedule=mixtures[0].schedule)


def toy_models(schedule: str = "vp_linear") -> dict[str, Any]:
    """The two 2-D mixtures of the tests: A = {(-2, 0), (2, 0)}, B = {(2, 0), (0, 3)}, std 0.5."""
    sch = {"vp_linear": NoiseSchedule.vp_linear, "cosine": NoiseSchedule.cosine, "ot": NoiseSchedule.ot}[schedule]()
    return {
        "A": GaussianMixture([[-2.0, 0.0], [2.0, 0.0]], 0.5, schedule=sch, name="A"),
        "B": GaussianMixture([[2.0, 0.0], [0.0, 3.0]], 0.5, schedule=sch, name="B"),
    }
