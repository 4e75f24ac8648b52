"""Operators against their exact targets on Gaussian mixtures (MATH.md section 5), and every bad input."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import mode_shares

import compose
from compose import AND, OR, Average, Composer, Guided, NoiseSchedule, Product, sample
from compose.toy import GaussianMixture


@pytest.mark.parametrize(
    ("weights", "expected"), [(None, [0.25, 0.5, 0.25]), ([3.0, 1.0], [0.375, 0.5, 0.125])], ids=["equal", "3:1"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_or_samples_the_mixture(weights, expected, dtype, two_mixtures):
    a, b = two_mixtures()
    res = sample(
        OR(a, b, weights=weights), num_samples=8000, steps=300, generator=torch.Generator().manual_seed(0), dtype=dtype
    )
    assert res.samples.dtype == dtype and res.log_q.dtype == torch.float64
    assert res.kappa.shape == (300, 8000, 2)
    torch.testing.assert_close(res.kappa.sum(-1), torch.ones(300, 8000, dtype=torch.float64))
    shares = mode_shares(res.samples)
    assert (shares - torch.tensor(expected, dtype=torch.float64)).abs().max() < 0.03, shares


def test_or_ode_samples_the_mixture(two_mixtures):
    a, b = two_mixtures()
    res = sample(OR(a, b), num_samples=8000, steps=200, method="ode", generator=torch.Generator().manual_seed(0))
    shares = mode_shares(res.samples)
    assert (shares - torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)).abs().max() < 0.03, shares


def test_or_three_models_with_weights():
    models = [GaussianMixture([m], 0.5) for m in ([-3.0, 0.0], [3.0, 0.0], [0.0, 3.0])]
    res = sample(
        OR(*models, weights=[1, 2, 3]), num_samples=6000, steps=300, generator=torch.Generator().manual_seed(0)
    )
    shares = mode_shares(res.samples, torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]], dtype=torch.float64))
    assert (shares - torch.tensor([1, 2, 3], dtype=torch.float64) / 6).abs().max() < 0.03, shares


def test_or_in_64_dimensions():
    d = 64
    e = torch.eye(d, dtype=torch.float64)
    a = GaussianMixture(torch.stack([-2 * e[0], 2 * e[0]]), 0.5)
    b = GaussianMixture(torch.stack([2 * e[0], 3 * e[1]]), 0.5)
    res = sample(OR(a, b), num_samples=2000, steps=400, generator=torch.Generator().manual_seed(0))
    shares = mode_shares(res.samples, torch.stack([-2 * e[0], 2 * e[0], 3 * e[1]]))
    assert (shares - torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)).abs().max() < 0.03, shares
    exact = torch.stack([m.log_prob(res.samples.double(), res.timesteps[-1]) for m in (a, b)], -1)
    for i in range(2):
        assert float(torch.corrcoef(torch.stack([res.log_q[:, i], exact[:, i]]))[0, 1]) > 0.99


def test_and_lands_on_the_shared_component_with_equal_densities(two_mixtures):
    a, b = two_mixtures()
    res = sample(AND(a, b), num_samples=2000, steps=400, generator=torch.Generator().manual_seed(0))
    x = res.samples.double()
    on_shared = (x - torch.tensor([2.0, 0.0], dtype=torch.float64)).norm(dim=1) < 1.5
    assert float(on_shared.double().mean()) > 0.6
    # Tracked and exact densities are equal (AND's very definition), and the tracking is right about it.
    assert float((res.log_q[:, 0] - res.log_q[:, 1]).abs().median()) < 0.1
    exact = torch.stack([m.log_prob(x, res.timesteps[-1]) for m in (a, b)], -1)
    assert float((exact[:, 0] - exact[:, 1]).abs().median()) < 0.5
    assert bool(torch.isfinite(res.kappa).all())
    torch.testing.assert_close(res.kappa.sum(-1), torch.ones_like(res.kappa[..., 0]))


def test_and_of_three_models():
    a = GaussianMixture([[-2.0, 0.0], [2.0, 0.0]], 0.5)
    b = GaussianMixture([[2.0, 0.0], [0.0, 3.0]], 0.5)
    c = GaussianMixture([[2.0, 0.0], [-2.0, -3.0]], 0.5)
    res = sample(AND(a, b, c), num_samples=1000, steps=400, generator=torch.Generator().manual_seed(0))
    lq = res.log_q
    assert float((lq - lq.mean(-1, keepdim=True)).abs().max(-1).values.median()) < 0.1
    on_shared = (res.samples.double() - torch.tensor([2.0, 0.0], dtype=torch.float64)).norm(dim=1) < 1.5
    assert float(on_shared.double().mean()) > 0.5


def test_singular_and_system_gives_equal_weights():
    a = GaussianMixture([[1.0, 0.0]], 0.5)
    a_copy = GaussianMixture([[1.0, 0.0]], 0.5)
    res = sample(AND(a, a_copy), num_samples=64, steps=50, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res.kappa, torch.full_like(res.kappa, 0.5))
    # All-zero predictions (Q = 0): still finite.
    comp = Composer(AND(a, a_copy, GaussianMixture([[0.0, 1.0]], 0.5)))
    out = comp.step(torch.zeros(3, 2), 0.5, 0.4, torch.zeros(3, 3, 2), torch.zeros(3, 3), noise=torch.zeros(3, 2))
    assert bool(torch.isfinite(out.kappa["root"]).all()) and bool(torch.isfinite(out.x).all())


def test_and_bias_prescribes_density_offsets():
    """The bias moves the tracked log q_1 - log q_2 by exactly l_1 - l_2 over the grid (every sample).

    At the start (t ~ 1, alpha ~ 0.007) the two predictions differ by under 1% and equal increments need |kappa| in
    the hundreds to thousands; the solve leaves such a well-posed system alone (it used to damp it) and the samples
    stay finite."""
    a, b = GaussianMixture([[-1.0, 0.0]], 0.5), GaussianMixture([[1.0, 0.0]], 0.5)
    x_T = torch.randn(500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    moved = {}
    for bias in (None, (1.0, -1.0), (0.0, 3.0)):
        expr = AND(a, b, bias=bias)
        res = sample(expr, x_T=x_T, steps=200, generator=torch.Generator().manual_seed(0))
        start = Composer(expr).initial_log_q(x_T, float(res.timesteps[0]))
        moved[bias] = (res.log_q[:, 0] - res.log_q[:, 1]) - (start[:, 0] - start[:, 1])
        assert bool(torch.isfinite(res.samples).all()) and float(res.kappa.abs().max()) > 100
    torch.testing.assert_close(moved[None], torch.zeros(500, dtype=torch.float64), atol=1e-8, rtol=0)
    torch.testing.assert_close(moved[(1.0, -1.0)], torch.full((500,), 2.0, dtype=torch.float64), atol=1e-8, rtol=0)
    torch.testing.assert_close(moved[(0.0, 3.0)], torch.full((500,), -3.0, dtype=torch.float64), atol=1e-8, rtol=0)


def _leaf_eps(seed=0, L=3, n=4, d=5):
    return torch.randn(L, n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _composed(expr, eps):
    comp = Composer(expr)
    n = eps.shape[1]
    out = comp.step(
        torch.zeros(n, eps.shape[2], dtype=torch.float64),
        0.5,
        0.49,
        eps,
        torch.zeros(n, eps.shape[0], dtype=torch.float64),
        noise=torch.zeros(n, eps.shape[2]),
    )
    return out.eps


def test_baseline_operators_combine_predictions_as_documented():
    a, b, u = (GaussianMixture([[float(i)] * 5], 1.0, name=f"m{i}") for i in range(3))
    e = _leaf_eps()
    torch.testing.assert_close(_composed(Average(a, b), e[:2]), e[:2].mean(0))
    torch.testing.assert_close(_composed(Product(a, b, weights=[1.0, -0.5]), e[:2]), e[0] - 0.5 * e[1])
    # Composable Diffusion: eps_u + w sum_i w_i (eps_i - eps_u); negation through a negative weight.
    w = 7.5
    expected = e[2] + w * (1.0 * (e[0] - e[2]) - 0.5 * (e[1] - e[2]))
    torch.testing.assert_close(_composed(Guided(Product(a, b, weights=[1.0, -0.5]), u, w), e), expected)
    # CFG around a mixture: eps_u + w (eps_bar - eps_u) with eps_bar the OR combination.
    comp = Composer(OR(a, b))
    n = e.shape[1]
    log_q = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64).expand(n, -1)
    kappa = torch.tensor([0.25, 0.75], dtype=torch.float64)
    out = Composer(Guided(OR(a, b), u, w)).step(
        torch.zeros(n, 5, dtype=torch.float64),
        0.5,
        0.49,
        e,
        torch.cat([log_q, log_q[:, :1]], 1),
        noise=torch.zeros(n, 5),
    )
    e_or = kappa[0] * e[0] + kappa[1] * e[1]
    torch.testing.assert_close(out.eps, e[2] + w * (e_or - e[2]))
    assert comp.num_leaves == 2


def test_average_and_product_of_one_model_sample_that_model():
    b = GaussianMixture([[2.0, 0.0], [0.0, 3.0]], 0.5)
    b_copy = GaussianMixture([[2.0, 0.0], [0.0, 3.0]], 0.5)
    ref = sample(b, num_samples=200, steps=50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for expr in (Average(b, b_copy), Product(b, b_copy, weights=[0.5, 0.5]), OR(b, b_copy)):
        res = sample(expr, num_samples=200, steps=50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        torch.testing.assert_close(res.samples, ref.samples)


def test_product_of_gaussians_lands_on_the_product_mean():
    """Sum of scores of N(-1, .5^2) and N(1, .5^2): the product N(0, .5^2 / 2) at t = 0 (its mean is exact)."""
    a, b = GaussianMixture([[-1.0, 0.0]], 0.5), GaussianMixture([[1.0, 0.0]], 0.5)
    res = sample(Product(a, b), num_samples=4000, steps=200, generator=torch.Generator().manual_seed(0))
    assert float(res.samples[:, 0].mean().abs()) < 0.05
    # Negation pushes away from the negated model.
    neg = sample(
        Product(a, b, weights=[1.0, -0.5]), num_samples=2000, steps=200, generator=torch.Generator().manual_seed(0)
    )
    assert float(neg.samples[:, 0].mean()) < -1.0


def test_nested_or_of_and_uses_documented_inner_log_density(two_mixtures):
    """OR(AND(a, b), c): the AND node's tracked log q is the mean of its children's."""
    a, b = two_mixtures()
    c = GaussianMixture([[-2.0, -3.0]], 0.5, name="C")
    expr = OR(AND(a, b), c)
    seen = []
    res = sample(
        expr,
        num_samples=300,
        steps=100,
        generator=torch.Generator().manual_seed(0),
        callback=lambda k, t, x, lq: seen.append(lq.clone()),
    )
    comp = Composer(expr)
    start = [None] + seen[:-1]
    for k in (10, 50, 99):
        lq = start[k]
        z = torch.stack([lq[:, :2].mean(-1), lq[:, 2]], -1)
        torch.testing.assert_close(res.kappa[k], torch.softmax(z, -1))
    assert set(res.node_kappa) == {"root", "root.0"} and comp.num_leaves == 3
    assert bool(torch.isfinite(res.samples).all())


def test_same_seed_same_output(two_mixtures):
    a, b = two_mixtures()
    for method in ("sde", "ode"):
        r1, r2 = (
            sample(AND(a, b), num_samples=50, steps=20, method=method, generator=torch.Generator().manual_seed(3))
            for _ in range(2)
        )
        torch.testing.assert_close(r1.samples, r2.samples, rtol=0, atol=0)
        torch.testing.assert_close(r1.log_q, r2.log_q, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ bad input
class NaNModel:
    name = "broken-model"
    schedule = NoiseSchedule.vp_linear()
    sample_shape = (2,)

    def eps(self, x, t):
        return torch.full_like(x, float("nan"))


def test_bad_input_raises_value_error_naming_the_argument(two_mixtures):
    a, b = two_mixtures()
    c_cos = GaussianMixture([[0.0, 0.0]], 1.0, schedule=NoiseSchedule.cosine(), name="cos-model")
    cases = [
        (lambda: sample(OR(a, c_cos), num_samples=4, steps=5), "on_schedule"),
        (lambda: sample(OR(a, b), num_samples=4, timesteps=[0.5, 0.6, 0.1]), "timesteps"),
        (lambda: sample(OR(a, b), num_samples=4, timesteps=[0.5, 0.5, 0.1]), "timesteps"),
        (lambda: OR(a), "OR needs at least 2"),
        (lambda: AND(a), "AND needs at least 2"),
        (lambda: OR(a, b, weights=[1.0]), "weights"),
        (lambda: Product(a, b, weights=[1.0, 2.0, 3.0]), "weights"),
        (lambda: OR(a, b, weights=[1.0, -1.0]), "weights must be positive"),
        (lambda: OR(a, b, weights=[1.0, 0.0]), "weights must be positive"),
        (lambda: OR(a, b, temperature=0.0), "temperature"),
        (lambda: AND(a, b, bias=[1.0]), "bias"),
        (lambda: AND(a, b, clamp=(0.6, 0.9)), "clamp"),
        (lambda: sample(OR(NaNModel(), a), num_samples=4, steps=3), "broken-model"),
        (lambda: sample(OR(a, b), num_samples=4, steps=3, method="heun"), "method"),
        (lambda: sample(OR(a, b), num_samples=4, steps=3, method="ode", divergence="magic"), "divergence"),
        (lambda: sample(OR(a, b), num_samples=4, steps=3, probes=0), "probes"),
        (lambda: sample(OR(a, b), steps=3), "num_samples"),
        (lambda: sample(OR(a, b), num_samples=4, steps=3, timesteps=[0.9, 0.1]), "either timesteps"),
        (lambda: GaussianMixture([[0.0]], -1.0), "stds"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()


def test_public_names():
    for name in ("NoiseSchedule", "OR", "AND", "Average", "Product", "sample", "toy"):
        assert hasattr(compose, name)
