"""Rejuvenation of the particle product (compose.smc.langevin_move, sample_smc(langevin_steps=...)) against exact
Gaussian and Gaussian-mixture products, whose intermediate targets p_t ~ prod_i q_{i,t}^{a_i} are closed-form."""

from __future__ import annotations

import math

import pytest
import torch

from compose import OR, PoE, sample, sample_smc
from compose.smc import langevin_move, rejuvenate
from compose.toy import GaussianMixture, product_of_mixtures


def gen(s: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(s)


def noised_gaussian_product(poe: PoE, factors: list[GaussianMixture], t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (d,) and variance (scalar) of p_t ~ prod_i q_{i,t}^{a_i} for one-component factors N(m_i, s_i^2 I)."""
    sch = factors[0].schedule
    alpha, sigma = float(sch.alpha(t)), float(sch.sigma(t))
    prec, lin = 0.0, 0.0
    for f, a in zip(factors, poe.factor_exponents.tolist(), strict=True):
        v = alpha**2 * float(f.stds[0]) ** 2 + sigma**2
        prec, lin = prec + a / v, lin + a * alpha * f.means[0] / v
    return lin / prec, torch.tensor(1.0 / prec, dtype=torch.float64)


def eps_fn_of(poe: PoE):
    leaves = poe.product.compile()
    return lambda x, t: torch.stack([m.eps(x, t) for m in leaves])


def run_moves(poe: PoE, x: torch.Tensor, t: float, moves: int, step: float, seed: int = 0):
    leaves = poe.product.compile()
    sigma = float(leaves[0].schedule.sigma(t))
    g = gen(seed)
    noises = [torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(moves)]
    us = [torch.rand(x.shape[0], generator=g, dtype=torch.float64) for _ in range(moves)]
    fn = eps_fn_of(poe)
    log_q = torch.stack([m.log_prob(x, t) for m in leaves], -1)
    return langevin_move(poe, fn, x, t, sigma, fn(x, t), log_q, noises, us, step)


# ---------------------------------------------------------------------- the move against exact targets
def test_langevin_move_leaves_a_gaussian_product_invariant():
    """Exact samples of p_t stay p_t-distributed after 10 moves at step 0.5 sigma^2 / A, where unadjusted Langevin
    would widen the variance by 1 / (1 - tau / (2 v)) ~ 1.3 (tau / v ~ 0.5 here): the tolerance of 8% (4 standard
    errors with 4000 samples) separates the two. The moves do move the particles (correlation with the start < 0.5)."""
    a = GaussianMixture([[1.0, -0.5, 0.0]], 0.5, name="a")
    b = GaussianMixture([[0.0, 0.5, 0.5]], 0.7, name="b")
    poe = PoE(a, b, exponents=[1.0, 2.0])
    t, N = 0.5, 4000
    mean, var = noised_gaussian_product(poe, [a, b], t)
    x0 = mean + var.sqrt() * torch.randn(N, 3, generator=gen(1), dtype=torch.float64)
    mv = run_moves(poe, x0, t, moves=10, step=0.5)
    assert torch.allclose(mv.x.mean(0), mean, atol=4 * math.sqrt(float(var) / N))
    assert torch.allclose(mv.x.var(0), var.expand(3), rtol=0.08), (mv.x.var(0), var)
    assert 0.6 < float(mv.accepted.mean()) < 1.0
    corr = float(((mv.x - mean) * (x0 - mean)).sum() / ((mv.x - mean).norm() * (x0 - mean).norm()))
    assert corr < 0.5
    # log q moves by the trapezoid rule on the scores, exact for Gaussians
    exact = torch.stack([m.log_prob(mv.x, t) for m in poe.leaves()], -1)
    assert torch.allclose(mv.log_q, exact, atol=1e-8)


def test_langevin_moves_converge_to_the_product_from_a_wrong_start():
    """Started far from p_t (N(0, 4 I)), 40 moves bring the particles to p_t's mean and variance: the moves target
    the product of the noised factors (not, e.g., one factor or their sum)."""
    a = GaussianMixture([[1.5, 0.0]], 0.5, name="a")
    b = GaussianMixture([[-0.5, 1.0]], 0.5, name="b")
    poe = PoE(a, b)
    t, N = 0.3, 4000
    mean, var = noised_gaussian_product(poe, [a, b], t)
    x0 = 2.0 * torch.randn(N, 2, generator=gen(2), dtype=torch.float64)
    mv = run_moves(poe, x0, t, moves=40, step=0.5, seed=3)
    assert torch.allclose(mv.x.mean(0), mean, atol=4 * math.sqrt(float(var) / N))
    assert torch.allclose(mv.x.var(0), var.expand(2), rtol=0.08), (mv.x.var(0), var)


def test_langevin_moves_track_log_q_of_mixtures():
    """On mixtures the trapezoid update of each leaf's log q is off by O(|dx|^3 grad^3 log q): small on average, larger
    for the few particles that cross between components of one factor (measured at t = 0.2: mean 0.006, 99% quantile
    0.13, max 1.6; at t = 0.05: max 0.004)."""
    a = GaussianMixture([[-2.0, 0.0], [2.0, 0.0]], 0.5, name="A")
    b = GaussianMixture([[2.0, 0.0], [0.0, 3.0]], 0.5, name="B")
    poe = PoE(a, b)
    for t, mean_tol, q99_tol in ((0.05, 1e-4, 1e-4), (0.2, 0.02, 0.3)):
        sch = a.schedule
        x0 = product_of_mixtures(a, b).sample(4000, gen(4), dtype=torch.float64)  # ~ p_t: the product, noised
        z = torch.randn(x0.shape, generator=gen(9), dtype=torch.float64)
        x0 = float(sch.alpha(t)) * x0 + float(sch.sigma(t)) / math.sqrt(2) * z
        mv = run_moves(poe, x0, t, moves=1, step=0.5, seed=5)
        err = (mv.log_q - torch.stack([m.log_prob(mv.x, t) for m in poe.leaves()], -1)).abs()
        assert float(err.mean()) < mean_tol and float(err.quantile(0.99)) < q99_tol, (t, err.mean(), err.max())
        assert float((mv.x - x0).norm(dim=-1).mean()) > 0.05


def test_rejuvenate_moves_only_the_marked_groups():
    a = GaussianMixture([[1.0, 0.0]], 0.5, name="a")
    poe = PoE(a, exponents=[2.0])
    n, K, t = 3, 5, 0.4
    x = torch.randn(n * K, 2, generator=gen(6), dtype=torch.float64)
    g = gen(7)
    noises = [torch.randn(x.shape, generator=g, dtype=torch.float64)]
    us = [torch.zeros(n * K, dtype=torch.float64)]  # log u = -inf: every proposal accepted
    log_q = a.log_prob(x, t)[:, None]
    groups = torch.tensor([False, True, False])
    rj = rejuvenate(poe, eps_fn_of(poe), x, t, float(a.schedule.sigma(t)), log_q, groups, noises, us, 0.5)
    rows = groups.repeat_interleave(K)
    assert torch.equal(rj.x[~rows], x[~rows]) and bool((rj.x[rows] != x[rows]).all())
    assert torch.equal(rj.eps.rows, rows) and torch.allclose(rj.eps.eps[:, rows], a.eps(rj.x[rows], t)[None])
    assert rj.accepted.tolist() == [0.0, 1.0, 0.0]
    assert torch.allclose(rj.eps.complete(eps_fn_of(poe), rj.x, t), a.eps(rj.x, t)[None])


# ---------------------------------------------------------------------- the sampler with rejuvenation
def test_tempering_beta_3_with_rejuvenation():
    """q^3 of N(mu, 0.36 I) in 16-D is N(mu, 0.12 I). 16 groups x 64 particles, 100 steps: without moves the
    weighted particles end ~14% narrow (heavy-tailed weights; 0.86-0.87 of the target variance over 3 seeds), with 2
    Langevin moves per step within 5% (0.98-0.99). The variance is averaged over the 16 dimensions."""
    q = GaussianMixture([[1.0, -1.0] + [0.0] * 14], 0.6, name="q")
    mu = q.means[0]
    ratio = {}
    for L in (0, 2):
        r = sample(PoE(q, exponents=[3.0]), num_samples=16, num_particles=64, steps=100, generator=gen(1),
                   final="weights", langevin_steps=L)  # fmt: skip
        n, K = r.log_weights.shape
        w = (r.log_weights.exp() / n).reshape(-1)
        x = r.samples.reshape(n * K, -1).double()
        mean = (w[:, None] * x).sum(0)
        ratio[L] = float((w[:, None] * (x - mean) ** 2).sum(0).mean() / 0.12)
        assert float((mean - mu).abs().max()) < 0.1
        # 100 evaluations (99 reweighted steps and the step to the data), L more after each reweighted step
        assert torch.allclose(r.evaluations, torch.full((n,), 100.0 + L * 99, dtype=torch.float64))
    assert abs(ratio[2] - 1) < 0.05, ratio
    assert ratio[0] < 0.92, ratio  # the plain sampler fails the same check


def shared_toy(d: int) -> tuple[GaussianMixture, GaussianMixture]:
    pad = lambda m: torch.nn.functional.pad(torch.tensor(m, dtype=torch.float64), (0, d - 2))  # noqa: E731
    return (
        GaussianMixture(pad([[-2.0, 0.0], [2.0, 0.0]]), 0.5, name="A"),
        GaussianMixture(pad([[2.0, 0.0], [0.0, 3.0]]), 0.5, name="B"),
    )


def test_rejuvenation_lowers_the_16d_mean_error():
    """The 16-D shared toy (product N((2, 0, ..), 0.125 I)): same seed, 8 groups of 128 particles, 200 steps. Without
    moves the weights degenerate and a group's mean is off by ~0.45; with one Langevin move per step by ~0.15 (K
    independent exact samples: 0.125)."""
    a, b = shared_toy(16)
    target = torch.zeros(16, dtype=torch.float64)
    target[0] = 2.0
    kw = dict(num_samples=8, num_particles=128, steps=200, final="weights", dtype=torch.float64)
    errs, res = {}, {}
    for L in (0, 1):
        r = sample(PoE(a, b), generator=gen(0), langevin_steps=L, **kw)
        m = torch.einsum("nk,nkd->nd", r.log_weights.exp(), r.samples)
        errs[L] = float((m - target).norm(dim=-1).mean())
        res[L] = r
    indep = math.sqrt(16 * 0.125 / 128)
    assert errs[1] < 0.6 * errs[0], errs
    assert errs[1] < 1.6 * indep, (errs, indep)
    assert int(res[1].num_resamples.sum()) < int(res[0].num_resamples.sum())
    assert float(res[1].unique_ancestors().double().mean()) > float(res[0].unique_ancestors().double().mean())
    assert bool(res[0].acceptance.isnan().all()) and 0.5 < float(res[1].acceptance.mean()) < 1.0


def test_an_or_factor_with_rejuvenation():
    """PoE(OR(a, b), c) = (q_a + q_b) / 2 x q_c has shares 0.25 / 0.75; the moves use OR's tracked log q."""
    a = GaussianMixture([[-1.5, 0.0]], 0.5, name="a")
    b = GaussianMixture([[1.5, 0.0]], 0.5, name="b")
    c = GaussianMixture([[-1.5, 0.0], [1.5, 0.0]], 0.5, [0.25, 0.75], name="c")
    r = sample(PoE(OR(a, b), c), num_samples=8, num_particles=128, steps=100, generator=gen(3), final="weights",
               langevin_steps=1)  # fmt: skip
    w = (r.log_weights.exp() / 8).reshape(-1)
    right = float((w * (r.samples.reshape(-1, 2)[:, 0] > 0)).sum())
    assert abs(right - 0.75) < 0.06  # 8 x 128 particles: seeds 3-8 gave 0.69-0.76


def test_after_resample_moves_only_resampled_groups(two_mixtures):
    """langevin_after="resample": without resampling nothing moves (the output is the plain sampler's, bit for bit);
    with it every resampling event costs langevin_steps evaluations."""
    a, b = two_mixtures()
    kw = dict(num_samples=3, num_particles=32, steps=60, final="weights")
    plain = sample_smc(PoE(a, b), generator=gen(0), ess_threshold=1e-6, **kw)
    none = sample_smc(PoE(a, b), generator=gen(0), ess_threshold=1e-6, langevin_steps=3, langevin_after="resample",
                      **kw)  # fmt: skip
    assert torch.equal(plain.samples, none.samples) and torch.equal(plain.log_weights, none.log_weights)
    r = sample_smc(PoE(a, b), generator=gen(0), langevin_steps=3, langevin_after="resample", **kw)
    assert int(r.num_resamples.sum()) > 0
    assert torch.equal(r.evaluations, 60 + 3 * r.num_resamples.double())


def test_same_seed_same_output_with_rejuvenation(two_mixtures):
    a, b = two_mixtures()
    kw = dict(num_samples=2, num_particles=16, steps=30, langevin_steps=2)
    r1 = sample(PoE(a, b), generator=gen(7), **kw)
    r2 = sample(PoE(a, b), generator=gen(7), **kw)
    r0 = sample(PoE(a, b), generator=gen(7), num_samples=2, num_particles=16, steps=30)
    assert torch.equal(r1.samples, r2.samples) and torch.equal(r1.log_q, r2.log_q)
    assert not torch.equal(r1.samples, r0.samples)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"langevin_steps": -1}, "langevin_steps must be an integer >= 0"),
        ({"langevin_steps": 1.5}, "langevin_steps"),
        ({"langevin_steps": True}, "langevin_steps"),
        ({"langevin_steps": 1, "langevin_step": 0.0}, "langevin_step must lie in"),
        ({"langevin_steps": 1, "langevin_step": -0.1}, "langevin_step must lie in"),
        ({"langevin_steps": 1, "langevin_step": 2.0}, "langevin_step must lie in"),
        ({"langevin_steps": 1, "langevin_step": "big"}, "langevin_step"),
        ({"langevin_steps": 1, "langevin_after": "sometimes"}, "langevin_after"),
    ],
)
def test_bad_langevin_options_name_the_argument(two_mixtures, kwargs, match):
    a, b = two_mixtures()
    with pytest.raises(ValueError, match=match):
        sample(PoE(a, b), num_samples=1, num_particles=4, steps=2, **kwargs)
