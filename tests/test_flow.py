"""Flow-matching paths (issue 21) at the compose level: sampling from t = 1 (alpha = 0, diffusers' first flow sigma)
with exact Gaussian mixtures on the rectified-flow path alpha = 1 - t, sigma = t.

At t = 1 every model's marginal is N(0, I) and its eps_hat is x: the step from there needs the models' data
predictions (x0_hat cannot be had from eps_hat), moves every log q alike, and leaves OR at its weights and AND at 1/M.
A published port of SuperDiff to a flow scheduler got NaN kappa at that step (super-diffusion issue #3)."""

from __future__ import annotations

import pytest
import torch

import compose
from compose.toy import GaussianMixture

OT = compose.NoiseSchedule.ot(t_max=1.0)


@pytest.fixture
def flow_mixtures():
    a = GaussianMixture([[-2.0, 0.0], [2.0, 0.0]], 0.5, schedule=OT, name="A")
    b = GaussianMixture([[2.0, 0.0], [0.0, 3.0]], 0.5, schedule=OT, name="B")
    return a, b


def exact_log_q(models, x, t=0.0):
    return torch.stack([m.log_prob(x, t) for m in models], -1)


def test_data_prediction_of_a_mixture_is_its_posterior_mean(flow_mixtures):
    a, _ = flow_mixtures
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in (0.2, 0.7, 0.999):
        from_eps = (x - OT.sigma(t) * a.eps(x, t)) / OT.alpha(t)
        torch.testing.assert_close(a.x0(x, t), from_eps)
    torch.testing.assert_close(a.x0(x, 1.0), torch.zeros(6, 2, dtype=torch.float64))  # the data mean
    torch.testing.assert_close(a.eps(x, 1.0), x)  # every model's eps_hat at t = 1 is x


@pytest.mark.parametrize(
    "method, solver", [("sde", "euler"), ("sde", "ddim"), ("ode", "euler"), ("ode", "ddim"), ("ode", "dpm2m"),
                       ("ode", "unipc")],  # fmt: skip
)
def test_or_and_are_finite_from_step_one(flow_mixtures, method, solver):
    a, b = flow_mixtures
    kw = dict(num_samples=200, steps=40, method=method, solver=solver, divergence="exact", dtype=torch.float64)
    for expr, first in ((compose.OR(a, b, weights=[3, 1]), [0.75, 0.25]), (compose.AND(a, b), [0.5, 0.5])):
        res = compose.sample(expr, generator=torch.Generator().manual_seed(0), **kw)
        assert float(res.timesteps[0]) == 1.0 and float(res.timesteps[-1]) == 0.0
        assert bool(torch.isfinite(res.kappa).all()) and bool(torch.isfinite(res.samples).all())
        assert bool(torch.isfinite(res.log_q).all())
        want = torch.tensor(first, dtype=torch.float64).expand(200, 2)
        torch.testing.assert_close(res.kappa[0], want)  # OR: its weights; AND: 1/M (no model differs at t = 1)


def test_density_tracking_on_the_flow_path_from_t_equal_1(flow_mixtures):
    """Exact log q_0 at the samples: the ODE (exact divergence) to 0.1 nats at 200 steps; the SDE's difference of the
    two models (what OR and AND use) to 0.5 nats and its AND gap to 0.1 (its absolute value carries a common offset
    from the steps near t = 1)."""
    a, b = flow_mixtures
    g = torch.Generator
    ode = compose.sample(compose.OR(a, b), num_samples=1000, steps=200, method="ode", divergence="exact",
                         generator=g().manual_seed(0), dtype=torch.float64)  # fmt: skip
    assert float((ode.log_q - exact_log_q((a, b), ode.samples)).abs().mean()) < 0.1
    for expr, tol in ((compose.OR(a, b), 0.5), (compose.AND(a, b), 0.1)):
        sde = compose.sample(expr, num_samples=1000, steps=200, generator=g().manual_seed(0), dtype=torch.float64)
        ex = exact_log_q((a, b), sde.samples)
        diff_err = ((sde.log_q[:, 0] - sde.log_q[:, 1]) - (ex[:, 0] - ex[:, 1])).abs().mean()
        assert float(diff_err) < tol, (repr(expr), float(diff_err))
    assert float((ex[:, 0] - ex[:, 1]).abs().median()) < 0.1  # the last run is AND: equal exact densities


def test_what_cannot_start_from_pure_noise_is_refused(flow_mixtures):
    a, b = flow_mixtures

    class NoData:  # eps only: no data prediction at t = 1
        schedule, name, sample_shape = OT, "eps-only", (2,)

        def eps(self, x, t):
            return a.eps(x, t)

    with pytest.raises(ValueError, match="has no x0"):
        compose.sample(NoData(), num_samples=2, steps=4)
    # a grid that starts below t = 1 needs no data prediction
    ts = torch.tensor([0.99, 0.5, 0.0], dtype=torch.float64)
    assert bool(torch.isfinite(compose.sample(NoData(), num_samples=2, timesteps=ts).samples).all())
    with pytest.raises(ValueError, match="do not sum to 1"):  # an unguided product has no finite x0 at t = 1
        compose.sample(compose.Product(a, b), num_samples=2, steps=4)
