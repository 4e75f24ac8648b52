"""Named grids, the DPM-Solver++(2M) ODE solver and sampling along the OT path, against exact Gaussian flows."""

from __future__ import annotations

import math

import pytest
import torch

import compose
from compose.grids import AYS_SIGMAS, GRIDS, loglinear_interp, make_grid
from compose.schedule import alphas_cumprod_from_config
from compose.toy import GaussianMixture


def sd15_schedule() -> compose.NoiseSchedule:
    cfg = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    return compose.NoiseSchedule.from_alphas_cumprod(alphas_cumprod_from_config(cfg))


SCHEDULES = {
    "vp_linear": compose.NoiseSchedule.vp_linear,
    "cosine": compose.NoiseSchedule.cosine,
    "ot": compose.NoiseSchedule.ot,
    "sd15": sd15_schedule,
}


@pytest.mark.parametrize("sched", list(SCHEDULES))
@pytest.mark.parametrize("kind", GRIDS)
@pytest.mark.parametrize("steps", [1, 4, 10, 37])
def test_named_grids_are_decreasing_between_the_endpoints(sched, kind, steps):
    sch = SCHEDULES[sched]()
    ts = make_grid(sch, steps, kind)  # `steps` evaluations from t_max to t_min, then the step to the data
    assert ts.shape == (steps + 1,) and ts.dtype == torch.float64
    assert float(ts[0]) == sch.t_max and float(ts[-1]) == 0.0
    assert steps == 1 or float(ts[-2]) == sch.t_min
    assert bool(torch.all(ts[1:] < ts[:-1]))


def ve_sigma(sch, ts):
    return (sch.sigma(ts) / sch.alpha(ts)).to(torch.float64)


def test_karras_grid_follows_edm_eq5_in_the_ve_scale():
    sch = compose.NoiseSchedule.vp_linear()
    ts = make_grid(sch, 9, "karras")[:-1]  # the 9 evaluation times (the last step goes to the data)
    s = ve_sigma(sch, ts)
    s_max, s_min, rho = float(s[0]), float(s[-1]), 7.0
    i = torch.arange(9, dtype=torch.float64) / 8
    want = (s_max ** (1 / rho) + i * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    torch.testing.assert_close(s, want, rtol=1e-6, atol=0)


def test_log_snr_grid_is_uniform_in_log_snr():
    sch = compose.NoiseSchedule.cosine()
    lam = sch.log_snr(make_grid(sch, 8, "log_snr")[:-1])
    gaps = lam[1:] - lam[:-1]
    torch.testing.assert_close(gaps, gaps.mean().expand(7), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["ays_sd15", "ays_sdxl"])
def test_ays_presets_on_the_sd_table_are_the_published_sigmas(kind):
    """On the SD noise table (VE range [0.0292, 14.6146]) the 11 evaluation times of an 11-step grid are the published
    11 noise levels of diffusers' AysSchedules (its "10 steps" plus the last level, where our grid's last evaluation
    sits before the step to the data)."""
    sch = sd15_schedule()
    s = ve_sigma(sch, make_grid(sch, 11, kind)[:-1])
    torch.testing.assert_close(s, torch.tensor(AYS_SIGMAS[kind], dtype=torch.float64), rtol=1e-2, atol=0)


def test_loglinear_interpolation_keeps_the_knots():
    v = torch.tensor(AYS_SIGMAS["ays_sd15"], dtype=torch.float64)
    torch.testing.assert_close(loglinear_interp(v, 11), v)
    fine = loglinear_interp(v, 21)
    torch.testing.assert_close(fine[::2], v)
    torch.testing.assert_close(fine[1::2], (v[1:] * v[:-1]).sqrt())  # log-linear: geometric midpoints


def test_bad_grid_names_and_steps_are_refused():
    sch = compose.NoiseSchedule.vp_linear()
    with pytest.raises(ValueError, match="karras"):
        make_grid(sch, 4, "karas")
    with pytest.raises(ValueError, match="steps"):
        make_grid(sch, 0, "karras")
    with pytest.raises(ValueError, match="solver"):
        compose.sample(GaussianMixture([[0.0, 0.0]], 1.0), num_samples=2, steps=4, solver="heun", method="ode")
    with pytest.raises(ValueError, match="method='ode'"):
        compose.sample(GaussianMixture([[0.0, 0.0]], 1.0), num_samples=2, steps=4, solver="dpm2m")
    with pytest.raises(ValueError, match="at least 2 steps"):
        compose.sample(
            GaussianMixture([[0.0, 0.0]], 1.0),
            num_samples=2,
            steps=1,
            solver="dpm2m",
            method="ode",
            divergence="exact",
        )


MU, STD = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.5


def exact_flow(sch, x_T, t_from, t_to):
    """Probability-flow ODE of N(MU, STD^2 I): x_t = alpha mu + sqrt(v_t) z with z fixed."""

    def av(t):
        a, s = float(sch.alpha(t)), float(sch.sigma(t))
        return a, math.sqrt(a * a * STD**2 + s * s)

    a0, v0 = av(t_from)
    a1, v1 = av(t_to)
    return a1 * MU + (v1 / v0) * (x_T - a0 * MU)


@pytest.mark.parametrize("solver,order", [("euler", 1), ("dpm2m", 2), ("unipc", 3)])
def test_ode_solvers_converge_at_their_order_to_the_exact_flow(solver, order):
    sch = compose.NoiseSchedule.vp_linear()
    g = GaussianMixture(MU[None], STD, schedule=sch)
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * float(
        sch.sigma(sch.t_max)
    )
    errs, lq_errs = [], []
    for n in (20, 40, 80):  # n steps to t_min (the grid without its step to the data), the solver's own order
        ts = make_grid(sch, n + 1, "log_snr")[:-1]
        out = compose.sample(g, x_T=x_T, timesteps=ts, method="ode", solver=solver, divergence="exact")
        exact = exact_flow(sch, x_T, sch.t_max, sch.t_min)
        errs.append(float((out.samples - exact).norm(dim=1).mean()))
        # the tracked log-density follows the exact one along the step actually taken
        lq_errs.append(float((out.log_q[:, 0] - g.log_prob(out.samples, sch.t_min)).abs().mean()))
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(order - 0.35 < r < order + 0.6 for r in rates), (errs, rates)
    assert lq_errs[2] < lq_errs[0] / 1.8 and lq_errs[2] < 0.05, lq_errs


def test_dpm2m_beats_euler_at_equal_nfe_on_the_exact_flow():
    sch = compose.NoiseSchedule.vp_linear()
    g = GaussianMixture(MU[None], STD, schedule=sch)
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * float(
        sch.sigma(sch.t_max)
    )
    exact = exact_flow(sch, x_T, sch.t_max, sch.t_min)
    err = {}
    for solver in ("euler", "dpm2m"):
        ts = make_grid(sch, 11)[:-1]
        out = compose.sample(g, x_T=x_T, timesteps=ts, method="ode", solver=solver, divergence="exact")
        err[solver] = float((out.samples - exact).norm(dim=1).mean())
    assert err["dpm2m"] < 0.5 * err["euler"], err


def test_sampling_a_vp_model_along_the_ot_path_follows_the_ot_flow():
    """path='ot' re-parametrises a VP-trained model at equal log-SNR: the trajectory is the OT flow of the data."""
    vp, ot = compose.NoiseSchedule.vp_linear(), compose.NoiseSchedule.ot()
    g = GaussianMixture(MU[None], STD, schedule=vp)
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * float(
        ot.sigma(ot.t_max)
    )
    ts = make_grid(ot, 201)[:-1]  # to t_min: the OT flow itself
    out = compose.sample(g, x_T=x_T, timesteps=ts, method="ode", solver="dpm2m", divergence="exact", path="ot")
    assert out.timesteps[0] == ot.t_max and out.timesteps[-1] == ot.t_min
    exact = exact_flow(ot, x_T, ot.t_max, ot.t_min)
    assert float((out.samples - exact).norm(dim=1).max()) < 1e-3
    exact_lq = GaussianMixture(MU[None], STD, schedule=ot).log_prob(out.samples, ot.t_min)
    assert float((out.log_q[:, 0] - exact_lq).abs().mean()) < 0.04  # first-order density increments
    with pytest.raises(ValueError, match="path"):
        compose.sample(g, x_T=x_T, steps=4, path="edm")


def test_every_named_grid_samples_and_same_seed_same_output(two_mixtures):
    a, b = two_mixtures()
    for kind in GRIDS:
        r1 = compose.sample(
            compose.OR(a, b), num_samples=8, steps=6, grid=kind, generator=torch.Generator().manual_seed(3)
        )
        r2 = compose.sample(
            compose.OR(a, b), num_samples=8, steps=6, grid=kind, generator=torch.Generator().manual_seed(3)
        )
        assert torch.equal(r1.samples, r2.samples)
        torch.testing.assert_close(r1.timesteps, make_grid(a.schedule, 6, kind))
