"""Prediction adapters (docs/MATH.md section 2): every prediction type becomes eps_hat; nothing downstream branches.

Shapes: `x` and predictions are (n, ...); `t` is a float, a 0-d tensor or a (n,) tensor of times.
"""

from __future__ import annotations

from typing import Any

import torch

from .schedule import NoiseSchedule, Tensorish, is_flow_matching

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow")
_ALIASES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction", "velocity": "flow", "flow_prediction": "flow"}


def normalize_prediction_type(prediction_type: str) -> str:
    """Canonical name of a prediction type; raises ValueError for unknown names."""
    name = _ALIASES.get(prediction_type, prediction_type)
    if name not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type={prediction_type!r} is not supported; use one of {PREDICTION_TYPES} "
            f"(aliases: {sorted(_ALIASES)})."
        )
    return name


def scheduler_prediction_type(scheduler: Any) -> str:
    """The prediction type of the network a diffusers scheduler (or its config) belongs to: "flow" for flow matching
    (whose config names none: the network predicts the velocity), else the config's `prediction_type`."""
    if is_flow_matching(scheduler):
        return "flow"
    config = scheduler.config if hasattr(scheduler, "config") else scheduler
    return normalize_prediction_type(config.get("prediction_type", "epsilon"))


def bcast(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or per-sample (n,) coefficient against x (n, ...), in x's dtype and device."""
    coef = coef.to(device=x.device, dtype=x.dtype)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def _coefs(schedule: NoiseSchedule, t: Tensorish, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    t = torch.as_tensor(t, dtype=torch.float64)
    return tuple(bcast(c, x) for c in (schedule.alpha(t), schedule.sigma(t), schedule.d_alpha(t), schedule.d_sigma(t)))


def to_eps(pred: torch.Tensor, x: torch.Tensor, t: Tensorish, schedule: NoiseSchedule, prediction_type: str):
    """eps_hat from a network output of the given prediction type."""
    kind = normalize_prediction_type(prediction_type)
    if kind == "epsilon":
        return pred
    alpha, sigma, d_alpha, d_sigma = _coefs(schedule, t, x)
    if kind == "sample":  # eps = (x - alpha x0) / sigma
        return (x - alpha * pred) / sigma
    if kind == "v_prediction":  # v = alpha eps - sigma x0, x = alpha x0 + sigma eps (general, not only VP)
        return (sigma * x + alpha * pred) / (alpha**2 + sigma**2)
    # flow velocity u = alpha' x0 + sigma' eps
    return (alpha * pred - d_alpha * x) / (alpha * d_sigma - d_alpha * sigma)


def from_eps(eps: torch.Tensor, x: torch.Tensor, t: Tensorish, schedule: NoiseSchedule, prediction_type: str):
    """The network output of the given prediction type that corresponds to eps_hat (inverse of `to_eps`)."""
    kind = normalize_prediction_type(prediction_type)
    if kind == "epsilon":
        return eps
    alpha, sigma, d_alpha, d_sigma = _coefs(schedule, t, x)
    x0 = (x - sigma * eps) / alpha
    if kind == "sample":
        return x0
    if kind == "v_prediction":
        return alpha * eps - sigma * x0
    return d_alpha * x0 + d_sigma * eps


def to_x0(pred: torch.Tensor, x: torch.Tensor, t: Tensorish, schedule: NoiseSchedule, prediction_type: str):
    """x0_hat from a network output, computed from the output itself: finite at alpha = 0 (t = 1 of a flow path) for
    sample, v_prediction and flow outputs, where x0 = (x - sigma eps) / alpha would be 0 / 0."""
    kind = normalize_prediction_type(prediction_type)
    alpha, sigma, d_alpha, d_sigma = _coefs(schedule, t, x)
    if kind == "epsilon":
        return (x - sigma * pred) / alpha
    if kind == "sample":
        return pred
    if kind == "v_prediction":  # x0 = (alpha x - sigma v) / (alpha^2 + sigma^2)
        return (alpha * x - sigma * pred) / (alpha**2 + sigma**2)
    return (d_sigma * x - sigma * pred) / (alpha * d_sigma - d_alpha * sigma)  # flow velocity


def eps_to_x0(eps: torch.Tensor, x: torch.Tensor, t: Tensorish, schedule: NoiseSchedule) -> torch.Tensor:
    """x0_hat = (x - sigma eps_hat) / alpha."""
    alpha, sigma, _, _ = _coefs(schedule, t, x)
    return (x - sigma * eps) / alpha


def eps_to_score(eps: torch.Tensor, t: Tensorish, schedule: NoiseSchedule) -> torch.Tensor:
    """score = -eps_hat / sigma."""
    return -eps / bcast(schedule.sigma(torch.as_tensor(t, dtype=torch.float64)), eps)


def score_to_eps(score: torch.Tensor, t: Tensorish, schedule: NoiseSchedule) -> torch.Tensor:
    """eps_hat = -sigma score."""
    return -score * bcast(schedule.sigma(torch.as_tensor(t, dtype=torch.float64)), score)
