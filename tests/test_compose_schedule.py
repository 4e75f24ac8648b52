"""Noise schedules and prediction adapters against autograd, closed forms, and diffusers' own tables."""

from __future__ import annotations

import math

import pytest
import torch

import compose
from compose import NoiseSchedule

SCHEDULES = {
    "vp_linear": NoiseSchedule.vp_linear(),
    "cosine": NoiseSchedule.cosine(),
    "ot": NoiseSchedule.ot(),
    "discrete": NoiseSchedule.from_alphas_cumprod(torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)),
}


def _grad(fn, t):
    t = t.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(t).sum(), t)
    return g


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_derivatives_match_autograd(name):
    sch = SCHEDULES[name]
    # Away from the knots of the discrete table (its log alpha is piecewise linear, derivative one-sided there).
    t = torch.linspace(sch.t_min, sch.t_max, 37, dtype=torch.float64)[1:-1] + 3.7e-4
    torch.testing.assert_close(sch.d_alpha(t), _grad(sch.alpha, t), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(sch.d_sigma(t), _grad(sch.sigma, t), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(sch.f(t), _grad(sch.log_alpha, t), rtol=1e-6, atol=1e-9)
    # g^2 = d sigma^2/dt - 2 f sigma^2 = -sigma^2 d lambda / dt (the forward SDE's diffusion)
    dsig2 = _grad(lambda s: sch.sigma(s) ** 2, t)
    torch.testing.assert_close(sch.g2(t), dsig2 - 2 * sch.f(t) * sch.sigma(t) ** 2, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(sch.g2(t), -(sch.sigma(t) ** 2) * _grad(sch.log_snr, t), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_log_snr_inverse_round_trip(name):
    sch = SCHEDULES[name]
    t = torch.linspace(sch.t_min, sch.t_max, 101, dtype=torch.float64)
    lam = sch.log_snr(t)
    assert bool(torch.all(lam[1:] < lam[:-1])), "log-SNR must decrease in t"
    torch.testing.assert_close(sch.t_from_log_snr(lam), t, rtol=1e-7, atol=1e-9)


def test_closed_forms():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    ot = NoiseSchedule.ot()
    torch.testing.assert_close(ot.alpha(t), 1 - t)
    torch.testing.assert_close(ot.sigma(t), t)
    cos = NoiseSchedule.cosine()
    torch.testing.assert_close(cos.alpha(t), torch.cos(math.pi * t / 2))
    vp = NoiseSchedule.vp_linear(0.1, 20.0)
    log_alpha = -(19.9) * t**2 / 4 - 0.1 * t / 2
    torch.testing.assert_close(vp.alpha(t), log_alpha.exp())
    torch.testing.assert_close(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, torch.ones(3, dtype=torch.float64))


def _schedulers():
    import diffusers

    out = []
    for cls in ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"):
        for beta in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            kw = {"beta_start": 0.00085, "beta_end": 0.012} if beta == "scaled_linear" else {}
            out.append(getattr(diffusers, cls)(beta_schedule=beta, **kw))
    out.append(diffusers.UniPCMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    out.append(diffusers.DDIMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True))
    return out


@pytest.mark.parametrize("scheduler", _schedulers(), ids=lambda s: f"{type(s).__name__}-{s.config.beta_schedule}")
def test_from_scheduler_reproduces_alphas_cumprod(scheduler):
    expected = scheduler.alphas_cumprod.to(torch.float64).clamp_min(2.0**-24)
    n = expected.numel()
    t_i = torch.arange(1, n + 1, dtype=torch.float64) / n  # training index i sits at t_i = (i + 1) / N
    for source in (scheduler, dict(scheduler.config, _class_name=type(scheduler).__name__)):
        sch = NoiseSchedule.from_scheduler(source)
        assert sch.kind == "discrete"
        torch.testing.assert_close(sch.alpha(t_i) ** 2, expected, rtol=2e-6, atol=1e-12)
        torch.testing.assert_close(sch.timestep(t_i), torch.arange(n, dtype=torch.float64), rtol=0, atol=1e-9)


def test_from_flow_match_scheduler_is_ot():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = NoiseSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert sch == NoiseSchedule.ot()
    # FlowMatchEuler feeds the network sigma * N with sigma = t on this path.
    assert float(sch.timestep(0.25)) == pytest.approx(250.0)


def test_from_scheduler_bad_input():
    with pytest.raises(ValueError, match="scheduler_or_config"):
        NoiseSchedule.from_scheduler(42)
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule.from_scheduler({"beta_schedule": "exotic"})


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("kind", ["sample", "v_prediction", "flow", "epsilon"])
def test_prediction_adapters_round_trip(name, kind):
    sch = SCHEDULES[name]
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.linspace(0.05, 0.95, 5, dtype=torch.float64)
    a, s = sch.alpha(t)[:, None], sch.sigma(t)[:, None]
    x = a * x0 + s * eps
    # The network output each type would give for the true (x0, eps), from first principles.
    truth = {
        "epsilon": eps,
        "sample": x0,
        "v_prediction": a * eps - s * x0,
        "flow": sch.d_alpha(t)[:, None] * x0 + sch.d_sigma(t)[:, None] * eps,
    }[kind]
    torch.testing.assert_close(compose.to_eps(truth, x, t, sch, kind), eps)
    torch.testing.assert_close(compose.from_eps(eps, x, t, sch, kind), truth)
    torch.testing.assert_close(compose.predictions.eps_to_x0(eps, x, t, sch), x0)
    score = compose.predictions.eps_to_score(eps, t, sch)
    torch.testing.assert_close(score, -eps / s)
    torch.testing.assert_close(compose.predictions.score_to_eps(score, t, sch), eps)


def test_prediction_type_names():
    assert compose.normalize_prediction_type("v") == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type"):
        compose.normalize_prediction_type("noise_ish")


def test_grids_are_decreasing_and_bad_steps_refused():
    for sch in SCHEDULES.values():
        for kind in ("uniform", "log_snr"):
            ts = compose.make_grid(sch, 10, kind=kind)  # 10 evaluations from t_max to t_min, then the data
            assert ts.shape == (11,) and bool(torch.all(ts[1:] < ts[:-1]))
            assert float(ts[0]) == pytest.approx(sch.t_max) and float(ts[-2]) == pytest.approx(sch.t_min)
            assert float(ts[-1]) == 0.0
        lam = sch.log_snr(compose.make_grid(sch, 10, kind="log_snr")[:-1])
        torch.testing.assert_close(lam.diff(), torch.full((9,), float(lam.diff().mean()), dtype=torch.float64))
    with pytest.raises(ValueError, match="steps"):
        compose.make_grid(SCHEDULES["ot"], 0)
    with pytest.raises(ValueError, match="grid"):
        compose.make_grid(SCHEDULES["ot"], 5, kind="spiral")


def test_compose_does_not_import_diffusers():
    import subprocess
    import sys

    code = "import sys, compose; assert 'diffusers' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
