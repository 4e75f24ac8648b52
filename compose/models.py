"""What a composable model is, and the conversion of a model onto another noise schedule.

A model (a leaf of an expression) is any object with
  - `schedule`: a NoiseSchedule,
  - `eps(x, t)` -> eps_hat (n, ...), or `score(x, t)` -> grad log q_t (n, ...),
  - optionally `x0(x, t)` -> its data prediction x0_hat (n, ...), needed only at alpha = 0 (t = 1 of a flow path),
    where it cannot be had from eps_hat,
  - optionally `log_prob(x, t)` -> exact log q_t(x) (n,), used to start density tracking exactly,
  - optionally `sample_shape`, the shape of one sample (used when `compose.sample` draws x_T itself).
"""

from __future__ import annotations

from typing import Any

import torch

from .predictions import bcast, score_to_eps
from .schedule import NoiseSchedule, Tensorish


def model_eps(model: Any, x: torch.Tensor, t: Tensorish) -> torch.Tensor:
    """eps_hat of a model (its `eps` or, failing that, its `score`)."""
    if hasattr(model, "eps"):
        return model.eps(x, t)
    if hasattr(model, "score"):
        return score_to_eps(model.score(x, t), t, model.schedule)
    raise ValueError(f"model {model!r} has neither eps(x, t) nor score(x, t); give it one of them.")


def model_x0(model: Any, x: torch.Tensor, t: Tensorish) -> torch.Tensor:
    """x0_hat of a model: its `x0` where it has one, else (x - sigma eps_hat) / alpha (ValueError at alpha = 0)."""
    if hasattr(model, "x0"):
        return model.x0(x, t)
    alpha = model.schedule.alpha(torch.as_tensor(t, dtype=torch.float64))
    if bool((alpha == 0).any()):
        raise ValueError(
            f"model {model_name(model)} has no x0(x, t) (data prediction), needed at alpha = 0 (t = 1 of a flow "
            "path); give it one, or start the grid below t = 1."
        )
    sigma = model.schedule.sigma(torch.as_tensor(t, dtype=torch.float64))
    return (x - bcast(sigma, x) * model_eps(model, x, t)) / bcast(alpha, x)


def model_name(model: Any) -> str:
    return str(getattr(model, "name", None) or type(model).__name__)


def schedule_change(model_schedule: NoiseSchedule, schedule: NoiseSchedule, t: Tensorish):
    """(t_m, log_scale): where a model trained on `model_schedule` answers for time t of `schedule` (`OnSchedule`).

    t_m is the time of `model_schedule` with the log-SNR `schedule` has at t, lambda_m(t_m) = lambda(t), and
    log_scale = log(alpha_m(t_m) / alpha(t)): the state x at t is x_m = exp(log_scale) x for the model, with the same
    noise eps. Equal schedules give (t, 0) exactly. Float64 tensors shaped like t.
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    if model_schedule == schedule:
        return t, torch.zeros_like(t)
    t_m = model_schedule.t_from_log_snr(schedule.log_snr(t))
    return t_m, model_schedule.log_alpha(t_m) - schedule.log_alpha(t)


class OnSchedule:
    """`model` (trained on its own schedule) answering on `schedule` instead.

    The state x at time t of `schedule` carries the same signal-to-noise ratio as the model's state
    x_m = (alpha_m(t_m) / alpha(t)) x at the time t_m with lambda_m(t_m) = lambda(t); eps is the same noise in
    both, so eps(x, t) = model.eps(x_m, t_m). Densities follow by the change of variables
    log q(x, t) = log q_m(x_m, t_m) + d log(alpha_m / alpha).
    """

    def __init__(self, model: Any, schedule: NoiseSchedule) -> None:
        self.model = model
        self.schedule = schedule
        self.name = f"{model_name(model)}@{schedule!r}"
        if hasattr(model, "sample_shape"):
            self.sample_shape = model.sample_shape
        if hasattr(model, "log_prob"):
            self.log_prob = self._log_prob
        if hasattr(model, "x0"):  # x0 is the same data in both parametrisations (equal SNR, rescaled state)
            self.x0 = lambda x, t: self.model.x0(*self._convert(x, t)[:2])

    def _convert(self, x: torch.Tensor, t: Tensorish):
        t_m, log_scale = schedule_change(self.model.schedule, self.schedule, t)
        return x * bcast(log_scale.exp(), x), t_m, log_scale

    def eps(self, x: torch.Tensor, t: Tensorish) -> torch.Tensor:
        x_m, t_m, _ = self._convert(x, t)
        return model_eps(self.model, x_m, t_m)

    def _log_prob(self, x: torch.Tensor, t: Tensorish) -> torch.Tensor:
        x_m, t_m, log_scale = self._convert(x, t)
        d = x[0].numel()
        return self.model.log_prob(x_m, t_m) + d * log_scale.to(x)


def on_schedule(model: Any, schedule: NoiseSchedule) -> Any:
    """Make `model` usable on `schedule` (a no-op when it already uses it)."""
    return model if model.schedule == schedule else OnSchedule(model, schedule)
