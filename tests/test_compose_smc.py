"""compose.PoE / sample_smc: products of experts by particles against exact products of Gaussian mixtures."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import mode_shares

import compose
from compose import AND, OR, PoE, Product, sample, sample_smc
from compose.smc import (
    choose_one,
    effective_sample_size,
    factor_increment,
    log_weight_increment,
    reweight_and_resample,
    systematic_resample,
)
from compose.toy import GaussianMixture, product_of_mixtures


def particle_step(composer, poe, x, t_cur, t_next, eps, log_q, log_w, noise, u, **kw):
    """One particle step by the sampler's own pieces: the move (`Composer.step`, what `compose.loop.run` calls), then
    `ParticleHooks.after_step`'s reweighting (`factor_increment`, `reweight_and_resample`)."""
    out = composer.step(x, t_cur, t_next, eps, log_q, noise=noise)
    dl = factor_increment(poe, eps, log_q, out.rates.rho)
    return reweight_and_resample(out.x, out.log_q, log_w, dl, u, t_next, **kw)


def gen(s: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(s)


def gaussian(mean, std, name) -> GaussianMixture:
    return GaussianMixture([mean], std, name=name)


def pooled(r) -> tuple[torch.Tensor, torch.Tensor]:
    """All particles (N, d) and their normalised weights (N,) pooled over groups (each group weighs the same)."""
    n, K = r.log_weights.shape
    w = (r.log_weights.exp() / n).reshape(-1)
    return r.samples.reshape(n * K, -1).double(), w


def weighted_moments(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = (w[:, None] * x).sum(0)
    var = (w[:, None] * (x - mean) ** 2).sum(0)
    return mean, var


# ---------------------------------------------------------------------- the target: exact closed-form products
def exact_product_of_two(a: GaussianMixture, b: GaussianMixture):
    """The product a x b written out component by component, independently of compose.toy (weights, means, vars)."""
    logw, means, variances = [], [], []
    for wi, mi, si in zip(a.weights, a.means, a.stds, strict=True):
        for wj, mj, sj in zip(b.weights, b.means, b.stds, strict=True):
            v = 1.0 / (1.0 / si**2 + 1.0 / sj**2)
            means.append(v * (mi / si**2 + mj / sj**2))
            variances.append(v)
            # integral of N(x; mi, si^2) N(x; mj, sj^2) dx = N(mi; mj, si^2 + sj^2)
            s2 = si**2 + sj**2
            d = mi.numel()
            logw.append(
                math.log(wi) + math.log(wj) - 0.5 * d * math.log(2 * math.pi * s2) - ((mi - mj) ** 2).sum() / (2 * s2)
            )
    w = torch.softmax(torch.tensor(logw, dtype=torch.float64), 0)
    return w, torch.stack(means), torch.tensor(variances, dtype=torch.float64)


def test_toy_product_of_mixtures_matches_the_hand_written_product(two_mixtures):
    a, b = two_mixtures()
    w, means, var = exact_product_of_two(a, b)
    p = product_of_mixtures(a, b)
    keep = w > 1e-12
    assert torch.allclose(p.weights, w[keep] / w[keep].sum(), atol=1e-12)
    assert torch.allclose(p.means, means[keep]) and torch.allclose(p.stds**2, var[keep])


def test_product_of_two_mixtures_matches_the_closed_form(two_mixtures):
    """A = {(-2,0),(2,0)}, B = {(2,0),(0,3)}: the product is N((2,0), 0.125 I) up to 3e-6 of mass elsewhere."""
    a, b = two_mixtures()
    w, means, var = exact_product_of_two(a, b)
    top = int(w.argmax())
    assert float(w[top]) > 0.9999
    r = sample(PoE(a, b), num_samples=2, num_particles=512, steps=200, generator=gen(0), final="weights")
    assert isinstance(r, compose.SMCResult) and r.samples.shape == (2, 512, 2)
    x, wt = pooled(r)
    share = float((wt * (torch.cdist(x, means[top : top + 1]).squeeze(1) < 1.2)).sum())
    assert share > 0.985
    mean, v = weighted_moments(x, wt)
    assert torch.allclose(mean, means[top], atol=0.12)
    assert torch.allclose(v, var[top].expand(2), rtol=0.3)
    # negligible product density: below the 0.1% quantile of exact product samples
    p = product_of_mixtures(a, b)
    low = torch.quantile(p.log_prob(p.sample(20000, gen(1), dtype=torch.float64), 0.0), 1e-3)
    assert float((wt * (p.log_prob(x, 0.0) < low)).sum()) < 0.01
    # ... where the plain sum of scores, the same drift without weights, is visibly biased
    base = sample(Product(a, b), num_samples=1024, steps=200, generator=gen(0)).samples
    assert float(mode_shares(base)[1]) < 0.95
    assert float((p.log_prob(base.double(), 0.0) < low).double().mean()) > 0.05


def test_two_mode_product_weights_match_the_closed_form():
    """A' and B' share two components with different weights: the product has modes 0.4 / 0.6 at (-2,0) / (2,0)."""
    modes = [[-2.0, 0.0], [2.0, 0.0]]
    a = GaussianMixture([*modes, [0.0, 3.0]], 0.5, [0.5, 0.3, 0.2], name="A")
    b = GaussianMixture([*modes, [0.0, -3.0]], 0.5, [0.2, 0.5, 0.3], name="B")
    w, means, _ = exact_product_of_two(a, b)
    left = float(w[0] / (w[0] + w[4]))
    assert abs(left - 0.4) < 1e-3
    r = sample(PoE(a, b), num_samples=8, num_particles=256, steps=200, generator=gen(0), final="weights")
    x, wt = pooled(r)
    share_left = float((wt * (x[:, 0] < 0)).sum())
    # 8 groups of 256: the between-group spread of a share is ~0.1 (resampling correlates particles), so 0.08 for
    # the pooled estimate is about 2.5 standard errors.
    assert abs(share_left - 0.4) < 0.08


def test_tempering_a_gaussian_is_exact():
    """q^beta of N(mu, s^2 I) is N(mu, s^2 / beta I): one model with exponent beta (no guidance).

    beta = 2 and 0.5, where the importance weights from the move (the plain scaled score, variance 0.12 and 4.4 here)
    to the target have finite variance. At beta = 3 they barely do and 16 x 64 particles underestimate the variance by
    ~15% (docs/benchmarks/smc.md: when the move is far narrower than the target, weights are heavy-tailed); at
    beta = 2 and 64 particles the estimate spreads 0.15-0.20 over seeds (target 0.18), at 256 particles 0.16-0.19."""
    q = gaussian([1.0, -1.0], 0.6, "q")
    for beta in (2.0, 0.5):
        r = sample(PoE(q, exponents=[beta]), num_samples=16, num_particles=256, steps=200, generator=gen(1),
                   final="weights")  # fmt: skip
        mean, var = weighted_moments(*pooled(r))
        assert torch.allclose(mean, torch.tensor([1.0, -1.0], dtype=torch.float64), atol=0.08)
        assert torch.allclose(var, torch.full((2,), 0.36 / beta, dtype=torch.float64), rtol=0.15), (beta, var)
        base = sample(Product(q, weights=[beta]), num_samples=1024, steps=200, generator=gen(1)).samples.double()
        assert not torch.allclose(base.var(0), torch.full((2,), 0.36 / beta, dtype=torch.float64), rtol=0.25)


def test_cfg_form_with_an_unconditional_model_is_exact():
    """PoE(c, exponents=[w], unconditional=u) targets q_u^(1-w) q_c^w; for Gaussians it is Gaussian in closed form."""
    c = gaussian([1.0, 0.0], 0.6, "c")
    u = gaussian([0.0, 0.0], 1.0, "u")
    w = 2.0
    prec = w / 0.36 + (1 - w) / 1.0
    target_mean = torch.tensor([(w * 1.0 / 0.36) / prec, 0.0], dtype=torch.float64)
    r = sample(PoE(c, exponents=[w], unconditional=u), num_samples=16, num_particles=64, steps=200, generator=gen(2),
               final="weights")  # fmt: skip
    mean, var = weighted_moments(*pooled(r))
    assert torch.allclose(mean, target_mean, atol=0.08)
    assert torch.allclose(var, torch.full((2,), 1 / prec, dtype=torch.float64), rtol=0.15)


def test_an_or_factor_multiplies_the_mixture():
    """PoE(OR(a, b), c): the product (q_a + q_b) / 2 x q_c, a mixture in closed form (OR's density is tracked)."""
    a = gaussian([-1.5, 0.0], 0.5, "a")
    b = gaussian([1.5, 0.0], 0.5, "b")
    c = GaussianMixture([[-1.5, 0.0], [1.5, 0.0]], 0.5, [0.25, 0.75], name="c")
    target = product_of_mixtures(GaussianMixture([[-1.5, 0.0], [1.5, 0.0]], 0.5), c)  # shares 0.25 / 0.75
    r = sample(PoE(OR(a, b), c), num_samples=8, num_particles=256, steps=200, generator=gen(3), final="weights")
    x, wt = pooled(r)
    right = float((wt * (x[:, 0] > 0)).sum())
    exact = float(target.weights[target.means[:, 0] > 0].sum())
    assert abs(exact - 0.75) < 1e-3
    assert abs(right - exact) < 0.08


# ---------------------------------------------------------------------- the log-weight increments
def test_log_weight_increments_match_their_formulas():
    torch.manual_seed(0)
    h, wsch = 0.01, 7.0  # g^2 / sigma^2
    e1, e2, eu = torch.randn(3, 5, 4, dtype=torch.float64)
    # product of two: h g^2 <s1, s2> = h (g^2 / sigma^2) <e1, e2>
    dl = log_weight_increment(torch.stack([e1, e2]), torch.tensor([1.0, 1.0]), h, wsch)
    assert torch.allclose(dl, h * wsch * (e1 * e2).sum(-1))
    # tempering: h g^2 beta (beta - 1) / 2 ||s||^2
    beta = 2.5
    dl = log_weight_increment(e1[None], torch.tensor([beta]), h, wsch)
    assert torch.allclose(dl, h * wsch * beta * (beta - 1) / 2 * (e1**2).sum(-1))
    # CFG with scale w, exponents (w, 1 - w): h g^2 w (w - 1) / 2 ||s_c - s_u||^2
    w = 4.0
    dl = log_weight_increment(torch.stack([e1, eu]), torch.tensor([w, 1 - w]), h, wsch)
    assert torch.allclose(dl, h * wsch * w * (w - 1) / 2 * ((e1 - eu) ** 2).sum(-1))
    # guided conjunction: (h g^2 / 2) (||sum_i w_i delta_i||^2 - sum_i w_i ||delta_i||^2)
    w1, w2 = 3.0, 1.5
    d1, d2 = e1 - eu, e2 - eu
    dl = log_weight_increment(torch.stack([e1, e2, eu]), torch.tensor([w1, w2, 1 - w1 - w2]), h, wsch)
    ref = 0.5 * h * wsch * (((w1 * d1 + w2 * d2) ** 2).sum(-1) - w1 * (d1**2).sum(-1) - w2 * (d2**2).sum(-1))
    assert torch.allclose(dl, ref)
    assert dl.dtype == torch.float64


def test_particle_step_adds_the_increment_and_moves_like_product(two_mixtures):
    a, b = two_mixtures()
    c = gaussian([0.0, 1.0], 1.0, "u")
    poe = PoE(a, b, exponents=[2.0, 1.5], unconditional=c)
    composer = compose.Composer(poe.product)
    n, K = 2, 3
    x = torch.randn(n * K, 2, generator=gen(4), dtype=torch.float64)
    t_cur, t_next = 0.5, 0.49
    eps = torch.stack([m.eps(x, t_cur) for m in composer.leaves])
    log_q = composer.initial_log_q(x, t_cur)
    noise = torch.randn(x.shape, generator=gen(5), dtype=torch.float64)
    st = particle_step(composer, poe, x, t_cur, t_next, eps, log_q, torch.zeros(n, K, dtype=torch.float64), noise,
                       torch.rand(n), ess_threshold=1e-9)  # fmt: skip
    sch = composer.schedule
    sa, sb, sc = (m.score(x, t_cur) for m in (a, b, c))
    s_bar = 2.0 * sa + 1.5 * sb + (1 - 3.5) * sc
    h, g2 = t_cur - t_next, float(sch.g2(t_cur))
    dl = 0.5 * h * g2 * ((s_bar**2).sum(-1) - 2.0 * (sa**2).sum(-1) - 1.5 * (sb**2).sum(-1) + 2.5 * (sc**2).sum(-1))
    dl = dl.reshape(n, K)
    assert torch.allclose(st.log_w, dl - dl.amax(-1, keepdim=True), atol=1e-9)
    x_ref = x + (-float(sch.f(t_cur)) * x + g2 * s_bar) * h + math.sqrt(g2 * h) * noise
    assert torch.allclose(st.x, x_ref, atol=1e-9) and not bool(st.resampled.any())


# ---------------------------------------------------------------------- ESS and systematic resampling
def test_effective_sample_size():
    K = 8
    assert torch.allclose(effective_sample_size(torch.zeros(1, K)), torch.tensor([8.0], dtype=torch.float64))
    one_hot = torch.full((1, K), -1e4)
    one_hot[0, 3] = 0.0
    assert torch.allclose(effective_sample_size(one_hot), torch.tensor([1.0], dtype=torch.float64))
    lw = torch.randn(5, K, generator=gen(0), dtype=torch.float64) * 3
    w = lw.exp()
    assert torch.allclose(effective_sample_size(lw), w.sum(-1) ** 2 / (w**2).sum(-1))
    assert torch.allclose(effective_sample_size(lw + 1000.0), effective_sample_size(lw))  # no overflow, shift-free


def test_systematic_resampling_counts_and_mean():
    K = 10
    lw = torch.log(torch.tensor([[0.05, 0.3, 0.0001, 0.2, 0.1, 0.15, 0.05, 0.05, 0.0999, 0.0]], dtype=torch.float64))
    w = torch.softmax(lw, -1)[0]
    m = 2000
    counts = torch.zeros(K, dtype=torch.float64)
    for j in range(m):
        idx = systematic_resample(lw, torch.tensor([(j + 0.5) / m]))
        assert idx.shape == (1, K) and bool((idx[0, 1:] >= idx[0, :-1]).all())
        c = torch.bincount(idx[0], minlength=K).double()
        assert bool((c >= torch.floor(K * w) - 1e-9).all() and (c <= torch.ceil(K * w) + 1e-9).all())
        counts += c
    assert torch.allclose(counts / m, K * w, atol=2e-3)
    assert int(torch.bincount(systematic_resample(lw, torch.tensor([0.999]))[0], minlength=K)[9]) == 0


def test_choose_one_draws_by_weight():
    lw = torch.log(torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)).expand(4000, 3)
    u = torch.rand(4000, generator=gen(0), dtype=torch.float64)
    freq = torch.bincount(choose_one(lw, u), minlength=3).double() / 4000
    assert torch.allclose(freq, torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64), atol=0.03)


def test_resampling_respects_threshold_and_window(two_mixtures):
    a, b = two_mixtures()
    kw = dict(num_samples=2, num_particles=32, steps=60, generator=gen(0))
    never = sample_smc(PoE(a, b), ess_threshold=1e-6, **kw)
    assert int(never.num_resamples.sum()) == 0
    assert torch.allclose(never.log_weights, torch.full((2, 32), -math.log(32), dtype=torch.float64))  # final
    always = sample_smc(PoE(a, b), ess_threshold=1.0, final="weights", **kw)
    strict = always.ess < 32 * (1 - 1e-9)
    assert torch.equal(always.resampled, strict)
    late = sample_smc(PoE(a, b), ess_threshold=1.0, resample_window=(0.0, 0.3), final="weights", **kw)
    t_next = late.timesteps[1:-1]  # every step but the step to the data is reweighted
    assert not bool(late.resampled[t_next > 0.3].any()) and bool(late.resampled[t_next <= 0.3].any())
    assert torch.allclose(torch.logsumexp(always.log_weights, -1), torch.zeros(2, dtype=torch.float64))


def test_a_resampled_group_copies_its_ancestors_and_restarts_its_weights(two_mixtures):
    a, b = two_mixtures()
    poe = PoE(a, b)
    composer = compose.Composer(poe.product)
    n, K = 2, 4
    x = torch.randn(n * K, 2, generator=gen(1), dtype=torch.float64)
    eps = torch.stack([m.eps(x, 0.3) for m in composer.leaves])
    log_w = torch.tensor([[0.0, -30.0, -30.0, -30.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    noise = torch.zeros_like(x)
    st = particle_step(composer, poe, x, 0.3, 0.3 - 1e-6, eps, composer.initial_log_q(x, 0.3), log_w, noise,
                       torch.tensor([0.5, 0.5]), ess_threshold=0.5)  # fmt: skip
    assert st.resampled.tolist() == [True, False]
    assert st.ancestors[0].tolist() == [0, 0, 0, 0] and st.ancestors[1].tolist() == [0, 1, 2, 3]
    assert torch.equal(st.log_w[0], torch.zeros(K, dtype=torch.float64))
    assert torch.allclose(st.x[:K], st.x[0].expand(K, 2)) and not torch.allclose(st.x[K:], st.x[K].expand(K, 2))


def test_same_seed_same_output(two_mixtures):
    a, b = two_mixtures()
    kw = dict(num_samples=2, num_particles=16, steps=40)
    r1 = sample(PoE(a, b), generator=gen(7), **kw)
    r2 = sample(PoE(a, b), generator=gen(7), **kw)
    r3 = sample(PoE(a, b), generator=gen(8), **kw)
    assert torch.equal(r1.samples, r2.samples) and torch.equal(r1.ancestors, r2.ancestors)
    assert not torch.equal(r1.samples, r3.samples)


def test_starting_particles_and_progress(two_mixtures, capsys):
    a, b = two_mixtures()
    x_T = torch.zeros(3, 4, 2)
    seen = []
    r = sample_smc(PoE(a, b), x_T=x_T, steps=5, num_particles=4, generator=gen(0),
                   callback=lambda k, t, x, lw: seen.append((k, x.shape, lw.shape)))  # fmt: skip
    assert r.samples.shape == (3, 4, 2) and r.ess.shape == (4, 3) and r.log_q.shape == (3, 4, 2)
    assert seen[0] == (0, (3, 4, 2), (3, 4)) and len(seen) == 5
    # the default start is N(0, sigma_T^2 / A): the product of the factors' priors
    r = sample_smc(PoE(a, b, exponents=[2.0, 2.0]), num_samples=1, num_particles=4000, steps=1, generator=gen(0),
                   final="weights")  # fmt: skip
    assert r.samples.numel() == 8000


# ---------------------------------------------------------------------- nesting and bad input
def test_nesting(two_mixtures):
    a, b = two_mixtures()
    with pytest.raises(ValueError, match="outermost"):
        sample(OR(PoE(a, b), a), num_samples=4, steps=2)
    with pytest.raises(ValueError, match="no density"):
        PoE(AND(a, b), a)
    with pytest.raises(ValueError, match="unconditional"):
        PoE(compose.Guided(a, b, 2.0), a)
    with pytest.raises(ValueError, match="mixes products"):
        PoE(OR(Product(a, b), a), b)
    # linear factors flatten: PoE(Product(a, b, weights=[2, 1])) is PoE(a, b, exponents=[2, 1]); Average halves
    kw = dict(num_samples=1, num_particles=8, steps=20, final="weights")
    r1 = sample(PoE(Product(a, b, weights=[2.0, 1.0])), generator=gen(0), **kw)
    r2 = sample(PoE(a, b, exponents=[2.0, 1.0]), generator=gen(0), **kw)
    assert torch.allclose(r1.samples, r2.samples, atol=1e-5)
    assert torch.allclose(r1.log_weights, r2.log_weights, atol=1e-6)
    assert PoE(compose.Average(a, b), exponents=[2.0]).factor_exponents.tolist() == [1.0, 1.0]


@pytest.mark.parametrize(
    ("build", "kwargs", "match"),
    [
        (lambda a, b: PoE(a, b, exponents=[1.0, 0.0]), {}, "exponent of 0"),
        (lambda a, b: PoE(a, b, exponents=[1.0, -1.0]), {}, "positive"),
        (lambda a, b: PoE(a, exponents=[-2.0]), {}, "positive"),
        (lambda a, b: PoE(a, b, exponents=[1.0]), {}, "one exponent per factor"),
        (lambda a, b: PoE(Product(a, b, weights=[1.0, -1.0])), {}, "flattened exponents"),
        (lambda a, b: PoE(a, b, exponents=[1.0, float("nan")]), {}, "finite"),
        (lambda a, b: PoE(a, exponents=[2.0], unconditional=AND(a, b)), {}, "model, not an expression"),
        (lambda a, b: PoE(a, b), {"num_particles": 1}, "num_particles"),
        (lambda a, b: PoE(a, b), {"num_particles": 2.5}, "num_particles"),
        (lambda a, b: PoE(a, b), {"ess_threshold": 0.0}, "ess_threshold"),
        (lambda a, b: PoE(a, b), {"ess_threshold": 1.5}, "ess_threshold"),
        (lambda a, b: PoE(a, b), {"method": "ode"}, "method='sde'"),
        (lambda a, b: PoE(a, b), {"resample_window": (0.6, 0.2)}, "resample_window"),
        (lambda a, b: PoE(a, b), {"final": "best"}, "final"),
        (lambda a, b: Product(a, b), {"num_particles": 8}, "PoE"),
    ],
)
def test_bad_inputs_name_the_argument(two_mixtures, build, kwargs, match):
    a, b = two_mixtures()
    with pytest.raises(ValueError, match=match):
        expr = build(a, b)
        sample(expr, num_samples=1, steps=2, **kwargs)
