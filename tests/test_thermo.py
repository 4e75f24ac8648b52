"""Thermodynamic schedule diagnostics against closed forms (MATH.md section 7)."""

from __future__ import annotations

import math

import pytest
import torch

import compose
from compose import thermo
from compose.toy import GaussianMixture


def test_kinetic_action_of_the_simple_families():
    assert thermo.kinetic_action(compose.NoiseSchedule.ot()) == pytest.approx(2.0 * (1 - 1e-3), rel=1e-6)
    assert thermo.kinetic_action(compose.NoiseSchedule.cosine()) == pytest.approx(
        math.pi**2 / 4 * (1 - 1e-3), rel=1e-6
    )
    vp = compose.NoiseSchedule.vp_linear()
    assert thermo.kinetic_action(vp) == pytest.approx(3.65, abs=0.01)
    # independent check: central differences of alpha and sigma themselves
    t = torch.linspace(1e-3, 1.0, 100_001, dtype=torch.float64)
    e = 1e-6
    da = (vp.alpha(t + e) - vp.alpha(t - e)) / (2 * e)
    ds = (vp.sigma(t + e) - vp.sigma(t - e)) / (2 * e)
    assert thermo.kinetic_action(vp) == pytest.approx(float(torch.trapezoid(da**2 + ds**2, t)), rel=1e-4)
    with pytest.raises(ValueError, match="t_min"):
        thermo.kinetic_action(vp, t_min=0.0)


@pytest.mark.parametrize("kind", ["ot", "vp_linear", "cosine"])
def test_monte_carlo_dissipation_matches_the_gaussian_closed_form(kind):
    sch = getattr(compose.NoiseSchedule, kind)()
    mean = torch.tensor([1.0, -0.5], dtype=torch.float64)
    g = GaussianMixture(mean[None], 0.5, schedule=sch)
    est, se = thermo.dissipation(
        g,
        lambda n, gen: g.sample(n, gen, dtype=torch.float64),
        num_samples=16384,
        t_max=0.999,
        generator=torch.Generator().manual_seed(0),
    )
    exact = thermo.gaussian_dissipation(mean, 0.5, sch, t_max=0.999)
    assert abs(est - exact) < 4 * se and se < 0.03 * exact, (est, exact, se)


def test_dissipation_of_standard_normal_data_equals_the_kinetic_action():
    """For x0 ~ N(0, I) (d = 1 per dimension) the marginal speed is d/dt sqrt(alpha^2 + sigma^2): 0 on VP paths."""
    vp = compose.NoiseSchedule.cosine()
    assert thermo.gaussian_dissipation(torch.zeros(3), 1.0, vp, t_max=0.999) == pytest.approx(0.0, abs=1e-9)
    ot = compose.NoiseSchedule.ot()
    # OT with std 1: sqrt((1-t)^2 + t^2) has a non-zero derivative; the data-free action is an upper bound
    assert 0 < thermo.gaussian_dissipation(torch.zeros(3), 1.0, ot) < thermo.kinetic_action(ot)


def test_step_lengths_of_a_constant_speed_walk_are_uniform():
    traj = torch.linspace(0, 1, 6, dtype=torch.float64)[:, None, None] * torch.ones(1, 4, 2, dtype=torch.float64)
    rep = thermo.step_lengths(traj)
    torch.testing.assert_close(rep["lengths"], torch.full((5,), 0.2 * math.sqrt(2), dtype=torch.float64))
    assert rep["cv"] < 1e-12 and rep["ratio"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="trajectory"):
        thermo.step_lengths(torch.zeros(1, 3))


def test_teacher_trajectory_ends_where_the_teacher_does(two_mixtures):
    a, _ = two_mixtures()
    sch = a.schedule
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * float(
        sch.sigma(sch.t_max)
    )
    ts = compose.make_grid(sch, 5, "karras")
    traj = thermo.teacher_trajectory(a, x, ts, substeps=40)
    assert traj.shape == (6, 16, 2)
    ref = compose.ld3.solve(a, x, compose.make_grid(sch, 400, "log_snr"), "dpm2m")
    assert float((traj[-1] - ref).norm(dim=1).max()) < 5e-3
