"""One noise schedule, one time convention: t in [0, 1], data at t = 0, noise at t = 1 (docs/MATH.md section 1).

x_t = alpha_t x_0 + sigma_t eps. Every quantity the samplers need (alpha, sigma, their t-derivatives, log-SNR and its
inverse, the forward-SDE drift f and diffusion g^2, and the network's timestep input) is answered here; every
diffusers scheduler config maps onto one of these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

Tensorish = float | torch.Tensor

_KINDS = ("vp_linear", "cosine", "ot", "discrete")


def _as_t(t: Tensorish) -> torch.Tensor:
    """t as a float64 tensor (schedules are evaluated in float64; callers cast the results)."""
    return torch.as_tensor(t, dtype=torch.float64)


class NoiseSchedule:
    """alpha_t, sigma_t and everything derived from them on t in [0, 1].

    Build one with `vp_linear`, `cosine`, `ot` or `from_scheduler`. All methods take a float or a tensor of times
    and return float64 tensors of the same shape.

    Families:
      - "vp_linear": log alpha = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2, sigma = sqrt(1 - alpha^2).
      - "cosine": alpha = cos(pi t / 2), sigma = sin(pi t / 2).
      - "ot" (conditional optimal transport / flow matching): alpha = 1 - t, sigma = t.
      - "discrete": a 1000-step (or N-step) DDPM table alphas_cumprod; log alpha is interpolated linearly in t
        between the knots t_i = (i + 1) / N (index i = 0 .. N-1) and t = 0 (alpha = 1); sigma = sqrt(1 - alpha^2).
    """

    def __init__(
        self,
        kind: str,
        *,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        alphas_cumprod: torch.Tensor | None = None,
        num_train_timesteps: int = 1000,
        t_min: float | None = None,
        t_max: float | None = None,
    ) -> None:
        if kind not in _KINDS:
            raise ValueError(f"kind={kind!r} is not a noise schedule; use one of {_KINDS}.")
        self.kind = kind
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)
        self.num_train_timesteps = int(num_train_timesteps)
        self._knots_t = self._knots_log_alpha = None
        if kind == "discrete":
            if alphas_cumprod is None:
                raise ValueError("alphas_cumprod is required for kind='discrete'.")
            ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
            if ac.numel() < 2 or not bool(torch.all(ac[1:] <= ac[:-1])) or not bool(torch.all(ac <= 1)):
                raise ValueError("alphas_cumprod must be a non-increasing sequence in (0, 1].")
            # A zero terminal SNR (rescale_betas_zero_snr) puts alpha = 0 at t = 1; keep it finite as diffusers does.
            ac = ac.clamp_min(2.0**-24)
            n = ac.numel()
            self.num_train_timesteps = n
            knots = torch.arange(0, n + 1, dtype=torch.float64) / n  # float64: near t = 1 log alpha is steep
            self._knots_t = knots
            self._knots_log_alpha = torch.cat([torch.zeros(1, dtype=torch.float64), 0.5 * ac.log()])
        default_t_min = 1.0 / self.num_train_timesteps if kind == "discrete" else 1e-3
        # Where alpha(1) = 0 (cosine, ot) the drift f is infinite at t = 1: start where log-SNR = -10, about the
        # log-SNR at which the usual VP-linear schedule starts.
        default_t_max = 1.0 if kind in ("vp_linear", "discrete") else float(self.t_from_log_snr(-10.0))
        self.t_min = float(default_t_min if t_min is None else t_min)
        self.t_max = float(default_t_max if t_max is None else t_max)
        if not 0.0 < self.t_min < self.t_max <= 1.0:
            raise ValueError(f"need 0 < t_min < t_max <= 1; got t_min={self.t_min}, t_max={self.t_max}.")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def vp_linear(cls, beta_min: float = 0.1, beta_max: float = 20.0, **kw: Any) -> NoiseSchedule:
        """Continuous VP schedule with beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021)."""
        if not 0 <= beta_min < beta_max:
            raise ValueError(f"need 0 <= beta_min < beta_max; got beta_min={beta_min}, beta_max={beta_max}.")
        return cls("vp_linear", beta_min=beta_min, beta_max=beta_max, **kw)

    @classmethod
    def cosine(cls, **kw: Any) -> NoiseSchedule:
        """VP cosine schedule alpha = cos(pi t / 2), sigma = sin(pi t / 2)."""
        return cls("cosine", **kw)

    @classmethod
    def ot(cls, **kw: Any) -> NoiseSchedule:
        """Conditional optimal-transport (flow-matching) path alpha = 1 - t, sigma = t."""
        return cls("ot", **kw)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor, **kw: Any) -> NoiseSchedule:
        """Discrete DDPM table -> continuous schedule (log alpha interpolated linearly in t)."""
        return cls("discrete", alphas_cumprod=alphas_cumprod, **kw)

    @classmethod
    def from_scheduler(cls, scheduler_or_config: Any) -> NoiseSchedule:
        """Map a diffusers scheduler (or its config dict) onto a NoiseSchedule.

        DDPM / DDIM / Euler / DPM-Solver / UniPC / PNDM / LMS configs with beta_schedule "linear", "scaled_linear",
        "squaredcos_cap_v2" or trained_betas become "discrete" schedules (rescale_betas_zero_snr honoured);
        FlowMatchEuler configs become "ot" starting at t = 1 (diffusers' first sigma; alpha = 0 there, the samplers
        take that step with the models' data predictions, docs/MATH.md section 3); its `shift` is a property of the
        time grid, not of the path (`compose.grids.flow_sigmas`).
        """
        config, _ = _config_of(scheduler_or_config)
        n = int(config.get("num_train_timesteps", 1000))
        if is_flow_matching(scheduler_or_config):
            return cls.ot(num_train_timesteps=n, t_max=1.0)
        ac = getattr(scheduler_or_config, "alphas_cumprod", None)
        if ac is None:
            ac = alphas_cumprod_from_config(config)
        return cls.from_alphas_cumprod(torch.as_tensor(ac, dtype=torch.float64))

    # ------------------------------------------------------------------ alpha, sigma and derivatives
    def log_alpha(self, t: Tensorish) -> torch.Tensor:
        t = _as_t(t)
        if self.kind == "vp_linear":
            return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        if self.kind == "cosine":
            return torch.log(torch.cos(0.5 * math.pi * t))
        if self.kind == "ot":
            return torch.log1p(-t)
        i, w = self._segment(t)
        la = self._knots_log_alpha
        return la[i] + w * (la[i + 1] - la[i])

    def d_log_alpha(self, t: Tensorish) -> torch.Tensor:
        """f(t) = d log(alpha_t) / dt."""
        t = _as_t(t)
        if self.kind == "vp_linear":
            return -0.5 * t * (self.beta_max - self.beta_min) - 0.5 * self.beta_min
        if self.kind == "cosine":
            return -0.5 * math.pi * torch.tan(0.5 * math.pi * t)
        if self.kind == "ot":
            return -1.0 / (1.0 - t)
        i, _ = self._segment(t)
        return (self._knots_log_alpha[i + 1] - self._knots_log_alpha[i]) / (self._knots_t[i + 1] - self._knots_t[i])

    def alpha(self, t: Tensorish) -> torch.Tensor:
        return self.log_alpha(t).exp()

    def sigma(self, t: Tensorish) -> torch.Tensor:
        t = _as_t(t)
        if self.kind == "ot":
            return t.clone()
        if self.kind == "cosine":
            return torch.sin(0.5 * math.pi * t)
        return (-torch.expm1(2.0 * self.log_alpha(t))).clamp_min(0).sqrt()

    def d_alpha(self, t: Tensorish) -> torch.Tensor:
        t = _as_t(t)
        if self.kind == "ot":  # alpha = 1 - t: also at t = 1, where alpha * d log(alpha) would be 0 * inf
            return -torch.ones_like(t)
        if self.kind == "cosine":
            return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)
        return self.alpha(t) * self.d_log_alpha(t)

    def d_sigma(self, t: Tensorish) -> torch.Tensor:
        t = _as_t(t)
        if self.kind == "ot":
            return torch.ones_like(t)
        if self.kind == "cosine":
            return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)
        # VP: sigma^2 = 1 - alpha^2  =>  sigma' = -alpha^2 f / sigma.
        return -(self.alpha(t) ** 2) * self.d_log_alpha(t) / self.sigma(t)

    # ------------------------------------------------------------------ SDE coefficients and log-SNR
    def f(self, t: Tensorish) -> torch.Tensor:
        """Drift coefficient of the forward SDE dx = f x dt + g dW (docs/MATH.md section 1)."""
        return self.d_log_alpha(t)

    def g2(self, t: Tensorish) -> torch.Tensor:
        """g(t)^2 = 2 sigma^2 d/dt log(sigma / alpha)."""
        return self.sigma(t) ** 2 * self.g2_over_sigma2(t)

    def g2_over_sigma2(self, t: Tensorish) -> torch.Tensor:
        """g^2 / sigma^2 = -d lambda / dt: finite as sigma -> 0, so density updates are computed in eps units."""
        return 2.0 * (self.d_sigma(t) / self.sigma(t) - self.d_log_alpha(t))

    def log_snr(self, t: Tensorish) -> torch.Tensor:
        """lambda(t) = log(alpha^2 / sigma^2), decreasing in t."""
        return 2.0 * (self.log_alpha(t) - self.sigma(t).log())

    def t_from_log_snr(self, lam: Tensorish) -> torch.Tensor:
        """Inverse of `log_snr` (closed form where one exists, bisection for tables)."""
        lam = _as_t(lam)
        if self.kind == "ot":
            return torch.sigmoid(-0.5 * lam)
        if self.kind == "cosine":
            return (2.0 / math.pi) * torch.atan(torch.exp(-0.5 * lam))
        log_alpha = -0.5 * torch.nn.functional.softplus(-lam)  # VP: alpha^2 = sigmoid(lambda)
        if self.kind == "vp_linear":
            a, b = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min
            return (-b + torch.sqrt(b * b - 4.0 * a * log_alpha)) / (2.0 * a)
        lo, hi = torch.zeros_like(lam), torch.ones_like(lam)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            above = self.log_alpha(mid) > log_alpha  # log alpha decreases in t: the root lies above mid
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    # ------------------------------------------------------------------ network time
    def timestep(self, t: Tensorish) -> torch.Tensor:
        """The network's (fractional) timestep input at time t.

        discrete: the training index i with t_i = (i + 1) / N, i.e. N t - 1; ot (flow matching): N t, as
        FlowMatchEuler feeds sigma * N; vp_linear / cosine: (N - 1) t.
        """
        t = _as_t(t)
        n = self.num_train_timesteps
        if self.kind == "discrete":
            return (n * t - 1.0).clamp_min(0.0)
        if self.kind == "ot":
            return n * t
        return (n - 1) * t

    def t_from_timestep(self, timestep: Tensorish) -> torch.Tensor:
        """Inverse of `timestep`: the time t at which the network is fed `timestep` (diffusers' `timesteps=`)."""
        v = _as_t(timestep)
        n = self.num_train_timesteps
        if self.kind == "discrete":
            return (v + 1.0) / n
        if self.kind == "ot":
            return v / n
        return v / (n - 1)

    # ------------------------------------------------------------------ helpers
    def _segment(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        knots = self._knots_t
        i = (torch.searchsorted(knots, t.detach().clamp(0, 1), right=True) - 1).clamp(0, knots.numel() - 2)
        w = (t - knots[i]) / (knots[i + 1] - knots[i])
        return i, w

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NoiseSchedule) or self.kind != other.kind:
            return False
        if self.kind == "discrete":
            return self._knots_log_alpha.shape == other._knots_log_alpha.shape and bool(
                torch.allclose(self._knots_log_alpha, other._knots_log_alpha, rtol=1e-6, atol=1e-9)
            )
        if self.kind == "vp_linear":
            return (self.beta_min, self.beta_max) == (other.beta_min, other.beta_max)
        return True

    __hash__ = None  # mutable-free but compared by value

    def __repr__(self) -> str:
        if self.kind == "vp_linear":
            return f"NoiseSchedule.vp_linear(beta_min={self.beta_min}, beta_max={self.beta_max})"
        if self.kind == "discrete":
            return f"NoiseSchedule(discrete, N={self.num_train_timesteps})"
        return f"NoiseSchedule.{self.kind}()"


def is_flow_matching(scheduler_or_config: Any) -> bool:
    """True for a flow-matching scheduler (diffusers' FlowMatch* classes, or a config whose prediction type is "flow"):
    the path alpha = 1 - t, sigma = t and a network that predicts the velocity. The one place a class name is read."""
    config, class_name = _config_of(scheduler_or_config)
    return "FlowMatch" in class_name or config.get("prediction_type") == "flow"


def _config_of(scheduler_or_config: Any) -> tuple[Mapping[str, Any], str]:
    if isinstance(scheduler_or_config, Mapping):
        config = scheduler_or_config
        return config, str(config.get("_class_name", ""))
    config = getattr(scheduler_or_config, "config", None)
    if config is None:
        raise ValueError(
            "scheduler_or_config must be a diffusers scheduler or its config dict; "
            f"got {type(scheduler_or_config).__name__}."
        )
    return config, type(scheduler_or_config).__name__


def alphas_cumprod_from_config(config: Mapping[str, Any]) -> torch.Tensor:
    """alphas_cumprod (float64, length N) of a DDPM-family scheduler config, computed as diffusers does."""
    n = int(config.get("num_train_timesteps", 1000))
    trained = config.get("trained_betas")
    kind = config.get("beta_schedule", "linear")
    b0, b1 = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    if trained is not None:
        betas = torch.as_tensor(trained, dtype=torch.float64)
    elif kind == "linear":
        betas = torch.linspace(b0, b1, n, dtype=torch.float32)
    elif kind == "scaled_linear":
        betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float32) ** 2
    elif kind == "squaredcos_cap_v2":

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=torch.float64
        )
    else:
        raise ValueError(
            f"beta_schedule={kind!r} is not supported; use 'linear', 'scaled_linear', 'squaredcos_cap_v2' or "
            "pass trained_betas."
        )
    # diffusers builds the table in float32 (betas, the rescale and the cumulative product); so do we, so that the
    # table is the one the network was trained with, to the last bit.
    betas = betas.to(torch.float32)
    if config.get("rescale_betas_zero_snr", False):
        betas = _rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, 0).to(torch.float64)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last one is 0 (Lin et al. 2024, Alg. 1)."""
    sqrt_ac = torch.cumprod(1.0 - betas, 0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac**2
    alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return 1.0 - alphas
