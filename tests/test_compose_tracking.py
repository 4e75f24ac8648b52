"""Density tracking along a composed trajectory against the exact log q_t of Gaussian mixtures (MATH.md section 4)."""

from __future__ import annotations

import pytest
import torch

import compose
from compose import OR, NoiseSchedule, sample
from compose.toy import GaussianMixture

SCHEDULES = {"vp_linear": NoiseSchedule.vp_linear(), "cosine": NoiseSchedule.cosine(), "ot": NoiseSchedule.ot()}


def _exact(models, result):
    t_end = result.timesteps[-1]
    x = result.samples.to(torch.float64)
    return torch.stack([m.log_prob(x, t_end) for m in models], dim=-1)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_ito_estimator_tracks_exact_log_density(name, two_mixtures):
    a, b = two_mixtures(SCHEDULES[name])
    res = sample(
        OR(a, b), num_samples=2000, steps=800, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    # 800 evaluations down to t_min = 1e-3, then the step to the data: log q is tracked to t = 0 (the data density)
    assert float(res.timesteps[-2]) == pytest.approx(1e-3) and float(res.timesteps[-1]) == 0.0
    exact = _exact([a, b], res)
    for i in range(2):
        assert _corr(res.log_q[:, i], exact[:, i]) > 0.999
    # What OR actually uses, the difference between the models, is tracked to a fraction of a nat.
    diff_err = (res.log_q[:, 0] - res.log_q[:, 1]) - (exact[:, 0] - exact[:, 1])
    assert float(diff_err.abs().mean()) < 0.3


def test_control_variate_only_reduces_the_variance(two_mixtures):
    """The common-mode term changes every model's log q by the same amount and leaves kappa untouched."""
    a, b = two_mixtures()
    runs = {
        cv: sample(
            OR(a, b),
            num_samples=1000,
            steps=400,
            generator=torch.Generator().manual_seed(1),
            dtype=torch.float64,
            control_variate=cv,
        )
        for cv in (False, True)
    }
    torch.testing.assert_close(runs[True].samples, runs[False].samples)
    torch.testing.assert_close(runs[True].kappa, runs[False].kappa)
    shift = runs[True].log_q - runs[False].log_q
    torch.testing.assert_close(shift[:, 0], shift[:, 1])
    exact = _exact([a, b], runs[True])
    err = {cv: float((r.log_q - exact).pow(2).mean()) for cv, r in runs.items()}
    assert err[True] < 0.5 * err[False]


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_ode_exact_divergence_tracks_within_005_nats(name, two_mixtures):
    a, b = two_mixtures(SCHEDULES[name])
    res = sample(
        OR(a, b),
        num_samples=300,
        steps=800,
        method="ode",
        divergence="exact",
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
    )
    err = res.log_q - _exact([a, b], res)
    assert float(err.abs().mean()) < 0.05


@pytest.mark.parametrize("kind", ["hutchinson", "hutchinson_fd"])
def test_hutchinson_estimates_are_unbiased(kind, two_mixtures):
    a, b = two_mixtures()
    res = sample(
        OR(a, b),
        num_samples=1000,
        steps=400,
        method="ode",
        divergence=kind,
        generator=torch.Generator().manual_seed(2),
        dtype=torch.float64,
    )
    err = res.log_q - _exact([a, b], res)
    assert float(err.mean(0).abs().max()) < 0.3
    # Noisy per sample, but far from useless: still tightly correlated with the truth.
    assert _corr(res.log_q[:, 0], _exact([a, b], res)[:, 0]) > 0.99


def test_divergence_helpers_against_closed_form():
    """div of a linear map A x is tr A: exact and Hutchinson_fd are exact, Hutchinson's mean is tr A."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, generator=g, dtype=torch.float64)

    def fn(x):
        return x @ A.T

    x = torch.randn(3, 5, generator=g, dtype=torch.float64)
    tr = torch.full((3,), float(torch.trace(A)), dtype=torch.float64)
    torch.testing.assert_close(compose.composer.divergence(fn, x, kind="exact"), tr)
    probes = compose.composer.rademacher((2000, 3, 5), g, torch.float64)
    hutch = compose.composer.divergence(fn, x, kind="hutchinson", probes=probes)
    torch.testing.assert_close(hutch, tr, atol=0.6, rtol=0)
    fd = compose.composer.divergence(fn, x, kind="hutchinson_fd", probes=probes, fd_eps=1e-3)
    torch.testing.assert_close(fd, compose.composer.divergence(fn, x, kind="hutchinson", probes=probes))


def test_tracking_starts_from_exact_log_q_or_from_the_prior(two_mixtures):
    a, b = two_mixtures()
    comp = compose.Composer(OR(a, b))
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(comp.initial_log_q(x, 0.9), torch.stack([a.log_prob(x, 0.9), b.log_prob(x, 0.9)], -1))

    class EpsOnly:  # a network: eps but no log_prob
        def __init__(self, m):
            self.m, self.schedule, self.name = m, m.schedule, m.name

        def eps(self, x, t):
            return self.m.eps(x, t)

    comp = compose.Composer(OR(EpsOnly(a), EpsOnly(b)))
    sigma = float(a.schedule.sigma(0.9))
    prior = torch.distributions.Normal(0.0, sigma).log_prob(x).sum(-1)
    torch.testing.assert_close(comp.initial_log_q(x, 0.9), torch.stack([prior, prior], -1))


def test_on_schedule_is_exact(two_mixtures):
    """A cosine-trained model answering on the VP schedule equals the same data noised by VP."""
    a_cos, _ = two_mixtures(NoiseSchedule.cosine())
    a_vp, _ = two_mixtures(NoiseSchedule.vp_linear())
    conv = compose.on_schedule(a_cos, a_vp.schedule)
    assert compose.on_schedule(a_vp, a_vp.schedule) is a_vp
    x = 2 * torch.randn(11, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.linspace(0.01, 0.99, 11, dtype=torch.float64)
    torch.testing.assert_close(conv.eps(x, t), a_vp.eps(x, t))
    torch.testing.assert_close(conv.log_prob(x, t), a_vp.log_prob(x, t))
    # ... and it composes with models on that schedule.
    res = sample(OR(conv, GaussianMixture([[0.0, 3.0]], 0.5)), num_samples=4, steps=5)
    assert bool(torch.isfinite(res.log_q).all())
