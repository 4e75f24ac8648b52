"""The steps that move the shared state, given the composed prediction (docs/MATH.md sections 3 and 6).

A step goes from t_cur to t_next of the shared schedule. Two first-order steps, for the SDE and the ODE:
  - "euler": Euler (-Maruyama) in t,
        ODE  x' = x - f h x - (h g^2 / (2 sigma)) eps_bar
        SDE  x' = x - f h x - (h g^2 / sigma) eps_bar + sqrt(g^2 h) z;
  - "ddim": the same in the variance-exploding variable s = sigma / alpha, y = x / alpha = x0 + s eps,
        ODE  y' = y + (s' - s) eps_bar                        (DDIM with eta = 0; EulerDiscreteScheduler)
        SDE  y' = y + 2 (s' - s) eps_bar + sqrt(2 s (s - s')) z  (Euler-Maruyama in s: SuperDiff's reference update).
Both are written, for the density bookkeeping, with one rate rho in eps units (`StepRates`): the SDE moves x by
sigma (-rho eps_bar + sqrt(rho) z) and the ODE by -sigma rho eps_bar / 2 beside the linear part, with
rho = h g^2 / sigma^2 (euler) or rho = 2 (s - s') / s (ddim). Every density formula of `compose.composer` then holds
for both with that rho.

The step to the data (t_next = 0) is always x' = x0_hat of the composed prediction, the first-order step to
sigma = 0 (DDIM's last step; diffusers' multistep solvers also end with a first-order step): a grid of N + 1 times
ending at 0 is N network evaluations, the last one at t_{N-1}.

Multistep ODE solvers on the composed data prediction: "dpm2m" (DPM-Solver++(2M), Lu et al. 2022) and "unipc"
(UniPC bh2, Zhao et al. 2023: the 2M predictor, then the UniC corrector once the models have been called at the
predicted state; no extra call). `Multistep` carries their history explicitly.

`X0Clip` is the x0 clipping of a checkpoint's scheduler config (`clip_sample`, `thresholding`), applied to the
composed x0_hat with diffusers' semantics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .options import check_float, solver_record
from .predictions import bcast, eps_to_x0
from .schedule import NoiseSchedule


@dataclass(frozen=True)
class StepRates:
    """What the density bookkeeping needs from a first-order step, at t_cur.

    rho: the rate in eps units: h g^2 / sigma^2 ("euler") or 2 (s - s') / s ("ddim"; 2 for the step to the data).
    sigma, alpha: sigma(t_cur), alpha(t_cur).
    common: the per-dimension change of log q shared by every model (the Jacobian of the linear part of the step):
        f h ("euler") or log alpha(t_cur) - log alpha(t_next) ("ddim").
    """

    rho: float
    sigma: float
    alpha: float
    common: float


def step_rates(kind: str, schedule: NoiseSchedule, t_cur: float, t_next: float) -> StepRates:
    """`StepRates` of the first-order step `kind` ("euler" or "ddim") from t_cur to t_next (0: to the data).

    From alpha = 0 (t = 1 of a flow path) rho is infinite: every model's marginal there is N(0, sigma^2 I), so every
    eps_hat is x / sigma and the step moves every log q alike (`Composer.weigh` drops that common step)."""
    sigma, alpha = float(schedule.sigma(t_cur)), float(schedule.alpha(t_cur))
    if alpha == 0.0:
        return StepRates(math.inf, sigma, alpha, 0.0)
    if t_next == 0.0 or kind == "ddim":
        s_cur = sigma / alpha
        s_next = 0.0 if t_next == 0.0 else float(schedule.sigma(t_next) / schedule.alpha(t_next))
        log_alpha_next = 0.0 if t_next == 0.0 else float(schedule.log_alpha(t_next))
        common = float(schedule.log_alpha(t_cur)) - log_alpha_next
        return StepRates(2.0 * (s_cur - s_next) / s_cur, sigma, alpha, common)
    h = t_cur - t_next
    return StepRates(h * float(schedule.g2_over_sigma2(t_cur)), sigma, alpha, float(schedule.f(t_cur)) * h)


def first_order(
    kind: str,
    x: torch.Tensor,
    eps_bar: torch.Tensor,
    t_cur: Any,
    t_next: Any,
    schedule: NoiseSchedule,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One "euler" or "ddim" step (module docstring) from t_cur to t_next; with `noise` the SDE step.

    Times may be float64 tensors that carry gradients (learned grids); t_next = 0 gives x0_hat.
    """
    t_cur = torch.as_tensor(t_cur, dtype=torch.float64)
    t_next = torch.as_tensor(t_next, dtype=torch.float64)
    if float(t_next.detach()) == 0.0:
        return eps_to_x0(eps_bar, x, t_cur, schedule)
    c = lambda v: bcast(v, x).to(x.dtype)  # noqa: E731
    if kind == "euler":
        h = t_cur - t_next
        sigma = schedule.sigma(t_cur)
        g2_over_sigma = schedule.g2_over_sigma2(t_cur) * sigma
        if noise is None:
            return x + c(h * -schedule.f(t_cur)) * x - c(h * 0.5 * g2_over_sigma) * eps_bar
        drift = x + c(h * -schedule.f(t_cur)) * x - c(h * g2_over_sigma) * eps_bar
        return drift + c((schedule.g2(t_cur) * h).sqrt()) * noise
    if kind != "ddim":
        raise ValueError(f"first_order: kind={kind!r} is not a first-order step; use 'euler' or 'ddim'.")
    a_cur, a_next = schedule.alpha(t_cur), schedule.alpha(t_next)
    s_cur, s_next = schedule.sigma(t_cur) / a_cur, schedule.sigma(t_next) / a_next
    if noise is None:
        return c(a_next / a_cur) * x + c(a_next * (s_next - s_cur)) * eps_bar
    return (
        c(a_next / a_cur) * x
        + c(2.0 * a_next * (s_next - s_cur)) * eps_bar
        + c(a_next * (2.0 * s_cur * (s_cur - s_next)).sqrt()) * noise
    )


def dpm2m_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    x0_prev: torch.Tensor | None,
    t_cur: Any,
    t_next: Any,
    schedule: NoiseSchedule,
    h_prev: Any = None,
    rho_offset: Any = None,
) -> torch.Tensor:
    """One DPM-Solver++(2M) step (Lu et al. 2022, Alg. 2) from t_cur to t_next on data predictions.

    x, x0, x0_prev: (n, ...) state, x0_hat at (x, t_cur), and x0_hat of the previous step (None: first order).
    With lambda = log(alpha / sigma) (half the log-SNR), h = lambda_next - lambda_cur and r = h_prev / h:
        x_next = (sigma_next / sigma_cur) x - alpha_next expm1(-h) D,  D = (1 + rho/r) x0 - (rho/r) x0_prev,
    rho = 1/2 (+ rho_offset: a learned solver coefficient, `compose.ld3`; 0 is the solver itself).
    t_cur / t_next may be tensors that carry gradients (learned grids).
    """
    lam_cur, lam_next = 0.5 * schedule.log_snr(t_cur), 0.5 * schedule.log_snr(t_next)
    h = lam_next - lam_cur
    d = x0
    if x0_prev is not None:
        r = h_prev / h
        rho = 0.5 if rho_offset is None else 0.5 + rho_offset
        d = (1.0 + rho / r) * x0 - (rho / r) * x0_prev
    ratio = schedule.sigma(t_next) / schedule.sigma(t_cur)
    coef = -schedule.alpha(t_next) * torch.expm1(-h)
    return bcast(ratio, x).to(x.dtype) * x + bcast(coef, x).to(x.dtype) * d


def unic_step(
    x_prev: torch.Tensor,
    m_prev: torch.Tensor,
    m_cur: torch.Tensor,
    m_prev2: torch.Tensor | None,
    t_prev2: Any,
    t_prev: Any,
    t_cur: Any,
    schedule: NoiseSchedule,
    rho_offsets: Any = None,
) -> torch.Tensor:
    """The UniC corrector (Zhao et al. 2023, arXiv 2302.04867; B(h) = expm1(-h), "bh2"; data prediction).

    Recomputes the state at t_cur from x_prev at t_prev with m_prev = x0_hat at t_prev, m_cur = x0_hat at the
    predicted state at t_cur and, for order 2, m_prev2 = x0_hat at t_prev2 (None: order 1). With lambda = half
    the log-SNR, h = lambda_cur - lambda_prev, phi = expm1(-h) and r = (lambda_prev2 - lambda_prev) / h:
        x = (sigma_cur / sigma_prev) x_prev - alpha_cur phi [m_prev + rho_0 (m_prev2 - m_prev) / r
                                                              + rho_1 (m_cur - m_prev)],
    order 1: rho_0 = 0, rho_1 = 1/2; order 2: rho_0 + rho_1 = b_1, r rho_0 + rho_1 = b_2 with
    b_1 = (phi / (-h) - 1) / phi and b_2 = 2 ((phi / (-h) - 1) / (-h) - 1/2) / phi.
    rho_offsets: None or (d_rho0, d_rho1) added to (rho_0, rho_1), learned solver coefficients (`compose.ld3`; at
    order 1 only d_rho1 is used). Times may be tensors that carry gradients (learned grids).
    """
    lam_prev, lam_cur = 0.5 * schedule.log_snr(t_prev), 0.5 * schedule.log_snr(t_cur)
    h = lam_cur - lam_prev
    phi = torch.expm1(-h)
    if m_prev2 is None:
        corr = (0.5 if rho_offsets is None else 0.5 + rho_offsets[1]) * (m_cur - m_prev)
    else:
        r = (0.5 * schedule.log_snr(t_prev2) - lam_prev) / h
        phi_1 = phi / -h - 1.0
        b1 = phi_1 / phi
        b2 = 2.0 * (phi_1 / -h - 0.5) / phi
        rho0 = (b1 - b2) / (1.0 - r)
        rho1 = b1 - rho0
        if rho_offsets is not None:
            rho0, rho1 = rho0 + rho_offsets[0], rho1 + rho_offsets[1]
        corr = bcast(rho0 / r, m_cur).to(m_cur.dtype) * (m_prev2 - m_prev) + bcast(rho1, m_cur).to(m_cur.dtype) * (
            m_cur - m_prev
        )
    ratio = schedule.sigma(t_cur) / schedule.sigma(t_prev)
    coef = -schedule.alpha(t_cur) * phi
    return bcast(ratio, x_prev).to(x_prev.dtype) * x_prev + bcast(coef, x_prev).to(x_prev.dtype) * (m_prev + corr)


class Multistep:
    """The history of "dpm2m" / "unipc" along one run (the state the step started from and the last x0_hats).

    `step(x, x0_bar, t_cur, t_next, schedule, offsets)` goes from t_cur to t_next given x0_bar, the composed x0_hat
    at (x, t_cur); the steps of one run come in grid order (the history holds the earlier times). For "unipc" the
    UniC corrector first recomputes the state at t_cur from that of the previous time with the new x0_bar; the 2M
    step then goes from it. offsets: None or this step's row (3,) of the (N, 3) learned solver coefficients of a
    schedule file (`compose.ld3`): the 2M step's rho offset from t_cur and the corrector's (d_rho0, d_rho1) at t_cur.
    """

    def __init__(self, solver: str) -> None:
        self.solver = solver
        self.corrector = solver_record(solver).corrector
        self.x_c = self.m_prev = self.m_prev2 = self.h_prev = self.t_prev = self.t_prev2 = None

    def step(
        self,
        x: torch.Tensor,
        x0_bar: torch.Tensor,
        t_cur: torch.Tensor,
        t_next: torch.Tensor,
        schedule: NoiseSchedule,
        offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        pred_off = corr_off = None
        if offsets is not None:
            pred_off, corr_off = offsets[0], offsets[1:]
        x_from = x
        if self.m_prev is not None and self.corrector:
            t_prev2 = self.t_prev2 if self.m_prev2 is not None else None
            x_from = unic_step(
                self.x_c, self.m_prev, x0_bar, self.m_prev2, t_prev2, self.t_prev, t_cur, schedule, corr_off
            )
        x_next = dpm2m_step(x_from, x0_bar, self.m_prev, t_cur, t_next, schedule, self.h_prev, pred_off)
        self.x_c, self.m_prev2, self.m_prev = x_from, self.m_prev, x0_bar
        self.t_prev2, self.t_prev = self.t_prev, t_cur
        self.h_prev = 0.5 * (schedule.log_snr(t_next) - schedule.log_snr(t_cur))
        return x_next


@dataclass(frozen=True)
class X0Clip:
    """Clipping of the composed x0_hat, as diffusers' DDPM / DDIM / DPM-Solver schedulers do (their config keys).

    clip_sample_range: clamp x0 to [-r, r] (`clip_sample: true`); None: no clamp.
    dynamic_thresholding_ratio: dynamic thresholding (Saharia et al. 2022, `thresholding: true`): per sample,
        s = the ratio-quantile of |x0| clamped to [1, sample_max_value], x0 -> clamp(x0, -s, s) / s. It takes
        precedence over clip_sample, as in diffusers.
    How a step uses the clipped x0_hat: `solver_step`. The operators' weights are solved for the unclipped step and
    every model's log q is then moved along the clipped step actually taken (`compose.loop`: the Ito and ODE
    increments hold for any displacement, to first order), so the tracked densities are those of the path the
    samples follow, not of the unclipped drift.
    """

    clip_sample_range: float | None = None
    dynamic_thresholding_ratio: float | None = None
    sample_max_value: float = 1.0

    def __post_init__(self) -> None:
        if self.clip_sample_range is not None:
            check_float(self.clip_sample_range, "clip_sample_range", 0.0, None, open_lo=True)
        if self.dynamic_thresholding_ratio is not None:
            check_float(self.dynamic_thresholding_ratio, "dynamic_thresholding_ratio", 0.0, 1.0, open_lo=True)
        check_float(self.sample_max_value, "sample_max_value", 0.0, None, open_lo=True)

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> X0Clip | None:
        """The clipping a diffusers scheduler config asks for (None: none). Overrides: clip_sample, clip_sample_range,
        thresholding, dynamic_thresholding_ratio, sample_max_value (None leaves the config's value)."""
        get = (lambda k, d: config.get(k, d)) if hasattr(config, "get") else (lambda k, d: getattr(config, k, d))
        val = {
            k: (get(k, d) if overrides.get(k) is None else overrides[k])
            for k, d in (
                ("clip_sample", False),
                ("clip_sample_range", 1.0),
                ("thresholding", False),
                ("dynamic_thresholding_ratio", 0.995),
                ("sample_max_value", 1.0),
            )
        }
        if val["thresholding"]:
            return cls(None, float(val["dynamic_thresholding_ratio"]), float(val["sample_max_value"]))
        if val["clip_sample"]:
            return cls(float(val["clip_sample_range"]))
        return None

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        if self.dynamic_thresholding_ratio is not None:
            work = x0.float() if x0.dtype in (torch.float16, torch.bfloat16) else x0
            flat = work.reshape(work.shape[0], -1).abs()
            s = torch.quantile(flat, self.dynamic_thresholding_ratio, dim=1).clamp(1.0, self.sample_max_value)
            s = bcast(s, work)
            return (torch.maximum(torch.minimum(work, s), -s) / s).to(x0.dtype)
        if self.clip_sample_range is not None:
            return x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0


def solver_step(
    solver: str,
    x: torch.Tensor,
    eps_bar: torch.Tensor,
    t_cur: torch.Tensor,
    t_next: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    noise: torch.Tensor | None = None,
    multistep: Multistep | None = None,
    offsets: torch.Tensor | None = None,
    clip: X0Clip | None = None,
    x0_bar: torch.Tensor | None = None,
) -> torch.Tensor:
    """The step `solver` takes from t_cur to t_next (float64 0-d tensors) with the composed eps_bar at (x, t_cur).

    multistep: the run's `Multistep` history (multistep solvers); offsets: this step's row (3,) of learned solver
    coefficients (`Multistep.step`).

    x0_bar: the composed data prediction, required where alpha(ts[k]) = 0 (t = 1 of a flow path), where it cannot be
    had from eps_bar; the step from there is x' = alpha' x0_bar + sigma' eps_bar (DDIM's, also for the SDE and the
    multistep solvers' first step), docs/MATH.md section 3.

    The step to the data (ts[k + 1] = 0) is x0_hat. With `clip`, x0_hat is clipped as diffusers' schedulers do:
      - a deterministic first-order step (method "ode") takes the clipped x0_hat and the unclipped eps_hat, i.e. it
        starts from alpha clip(x0_hat) + sigma eps_hat (DDIMScheduler, use_clipped_model_output=False:
        x' = alpha' clip(x0) + sigma' eps);
      - a stochastic step (method "sde") keeps x and takes the clipped model output eps_c = (x - alpha clip(x0_hat))
        / sigma, as DDPMScheduler does: its posterior mean c0 clip(x0) + ct x_t is DDIM's eta = 1 step with the
        clipped model output. Per step the clip then moves y = x / alpha by (1 - s'^2/s^2) (clip(x0) - x0) in
        DDPM and by 2 (1 - s'/s) (clip(x0) - x0) here (s = sigma / alpha): the same to first order in the step.
        Starting from alpha clip(x0_hat) + sigma eps_hat instead would move it by the whole clip(x0) - x0 at
        every step, which on 30 steps at guidance 4 loses most of the colours of a product on the shapes models
        (docs/MATH.md section 3);
      - the multistep solvers take the clipped x0_hat as their data prediction (as DPMSolverMultistep / UniPC do).
    """
    final = float(t_next.detach()) == 0.0
    alpha_zero = float(schedule.alpha(t_cur.detach())) == 0.0
    if alpha_zero and x0_bar is None:
        raise ValueError(
            f"the grid starts at t = {float(t_cur):.6g}, where alpha = 0 and x0_hat cannot be had from eps_hat; the "
            "models must give their data predictions there (flow-matching families do), or start the grid below it."
        )
    multistep_solver = solver_record(solver).multistep
    if clip is not None or final or alpha_zero or multistep_solver:
        x0 = x0_bar if alpha_zero else eps_to_x0(eps_bar, x, t_cur, schedule)
        x0_used = clip(x0) if clip is not None else x0
        if final:
            return x0_used
        if multistep_solver:
            if multistep is None:
                raise ValueError(f"solver={solver!r} keeps a history: pass multistep=Multistep({solver!r}).")
            return multistep.step(x, x0_used, t_cur, t_next, schedule, offsets)
        c = lambda v: bcast(v, x).to(x.dtype)  # noqa: E731
        if alpha_zero:
            return c(schedule.alpha(t_next)) * x0_used + c(schedule.sigma(t_next)) * eps_bar
        if noise is not None:  # DDPM's use: the clipped model output, eps from (x, clip(x0_hat))
            eps_bar = (x - c(schedule.alpha(t_cur)) * x0_used) / c(schedule.sigma(t_cur))
        else:  # DDIM's use (use_clipped_model_output=False): start from alpha clip(x0_hat) + sigma eps_hat
            x = x + c(schedule.alpha(t_cur)) * (x0_used - x0)
    return first_order(solver, x, eps_bar, t_cur, t_next, schedule, noise)


def is_final(t_next: Any) -> bool:
    """True for the step to the data (t_next = 0)."""
    return float(torch.as_tensor(t_next).detach()) == 0.0


__all__ = [
    "Multistep",
    "StepRates",
    "X0Clip",
    "dpm2m_step",
    "first_order",
    "is_final",
    "solver_step",
    "step_rates",
    "unic_step",
]
