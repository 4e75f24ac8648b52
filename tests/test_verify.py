"""Density-verified composition on exact Gaussian mixtures (compose.verify, docs/MATH.md section 9): the tracked lift
against the exact log-density ratio, best-of-K against its exact answer, Feynman-Kac steering's weights, and the
refusals of bad settings before any model call."""

from __future__ import annotations

import math

import pytest
import torch

import compose
from compose.loop import TorchDraws, run
from compose.toy import GaussianMixture, toy_models
from compose.verify import LiftSteering, Verify, best_of, lifts, random_of, score

SHARED = torch.tensor([2.0, 0.0])


def models():
    """A = {(-2, 0), (2, 0)}, B = {(2, 0), (0, 3)} and their equal mixture U = (A + B) / 2, the 'unconditional' model
    both terms are read against: lift_A = log 2 on A's own mode, 0 on the shared mode, about -40 on B's own mode."""
    m = toy_models()
    A, B = m["A"], m["B"]
    U = GaussianMixture([[-2.0, 0.0], [2.0, 0.0], [0.0, 3.0]], 0.5, weights=[0.25, 0.5, 0.25], schedule=A.schedule,
                        name="U")  # fmt: skip
    return A, B, U


def on_shared(x: torch.Tensor) -> torch.Tensor:
    return (x.double() - SHARED).norm(dim=-1) < 1.5


@pytest.mark.slow
def test_lift_equals_the_exact_log_density_ratio():
    """OR(A, B) samples U; with U tracked as a zero-weight leaf (guidance scale 1), every sample's lift of A and B
    equals log p_A(x) - log p_U(x) and log p_B(x) - log p_U(x) at t = 0, up to the Ito estimator's noise."""
    A, B, U = models()
    expr = compose.Guided(compose.OR(A, B), U, 1.0)
    g = torch.Generator().manual_seed(0)
    res = compose.sample(expr, num_samples=600, steps=500, generator=g, dtype=torch.float64,
                         verify=Verify(terms=[A, B], refs=U))  # fmt: skip
    x = res.samples
    exact = torch.stack([A.log_prob(x, 0.0) - U.log_prob(x, 0.0), B.log_prob(x, 0.0) - U.log_prob(x, 0.0)], -1)
    err = res.lift - exact
    assert res.lift.shape == (600, 2) and res.scores.shape == (600, 1) and (res.candidate == 0).all()
    assert float(exact.max() - exact.min()) > 30  # the ratio spans its whole range: log 2 down to about -40 nats
    assert float(err.abs().median()) < 0.15, float(err.abs().median())
    assert float(err.abs().mean()) < 0.3, float(err.abs().mean())
    assert float(torch.corrcoef(torch.stack([res.lift.flatten(), exact.flatten()]))[0, 1]) > 0.999
    # the verdict "has the concept" (exact ratio above -1 nat) is read off the tracked lift, all but 1% right
    assert float(((res.lift > -1) != (exact > -1)).double().mean()) < 0.01
    # the lift of a single term on its own (no selection) is the log_q difference the result already holds
    leaves = compose.Composer(expr).leaves
    assert torch.equal(res.lift[:, 0], res.log_q[:, leaves.index(A)] - res.log_q[:, leaves.index(U)])


@pytest.mark.parametrize("K", [1, 2, 4])
def test_best_of_k_by_lift_concentrates_on_the_shared_mode_as_exactly_predicted(K):
    """OR(A, B) puts exactly half its samples on the shared mode (2, 0); a candidate elsewhere misses one concept by
    about 40 nats, so keeping the best of K by min(lift) lands on the shared mode with probability 1 - 2^-K."""
    A, B, U = models()
    n = 800
    verify = Verify([A, B], U, candidates=K)
    g = torch.Generator().manual_seed(K)
    expr = compose.Guided(compose.OR(A, B), U, 1.0)
    res = compose.sample(expr, num_samples=n, steps=100, generator=g, verify=verify)
    share = float(on_shared(res.samples).double().mean())
    exact = 1 - 0.5**K
    assert abs(share - exact) < 4 * math.sqrt(exact * (1 - exact) / n) + 0.01, (K, share, exact)
    assert res.samples.shape == (n, 2) and res.scores.shape == (n, K)
    kept = res.scores.gather(1, res.candidate[:, None])[:, 0]
    torch.testing.assert_close(kept, res.scores.amax(1))
    torch.testing.assert_close(kept, score(res.lift, "min"))


def test_random_selection_is_the_plain_method_at_the_same_cost():
    A, B, U = models()
    n, K = 800, 4
    res = compose.sample(compose.Guided(compose.OR(A, B), U, 1.0), num_samples=n, steps=100,
                         generator=torch.Generator().manual_seed(5),
                         verify=Verify([A, B], U, candidates=K, select="random"))  # fmt: skip
    share = float(on_shared(res.samples).double().mean())
    assert abs(share - 0.5) < 4 * math.sqrt(0.25 / n)
    assert res.candidate.unique().numel() == K  # every slot gets picked


def _steered_run(strength: float, ess_threshold: float, n: int = 300, K: int = 4, seed: int = 0):
    A, B, U = models()
    expr = compose.Guided(compose.OR(A, B), U, 1.0)
    composer = compose.Composer(expr, method="sde")
    leaves = composer.leaves
    terms, refs = [leaves.index(A), leaves.index(B)], [leaves.index(U)] * 2
    sch = composer.schedule
    ts = compose.make_grid(sch, 100, "log_snr")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n * K, 2, generator=g, dtype=torch.float64) * float(sch.sigma(float(ts[0])))
    log_q = torch.stack([m.log_prob(x, float(ts[0])) for m in leaves], -1)

    def predict(x_, t, zeta):
        return torch.stack([m.eps(x_, t) for m in leaves]), None

    hooks = LiftSteering(n, K, terms, refs, strength=strength, ess_threshold=ess_threshold)
    tr = run(composer, predict, x, ts, log_q, draws=TorchDraws(g), hooks=hooks)
    return tr, hooks, terms, refs, log_q


def test_steering_potentials_telescope_to_the_final_score():
    """Without resampling, the product of the potentials exp(lam (s_k - s_{k-1})) is exp(lam (s_N - s_0)): every
    particle's normalised final log-weight is lam times its score's change, normalised within its group."""
    lam = 0.3
    tr, hooks, terms, refs, log_q0 = _steered_run(lam, ess_threshold=0.0)
    assert not torch.stack(hooks.resampled).any()
    s_final = score(lifts(tr.log_q, terms, refs), "min").reshape(hooks.n, hooks.K)
    # the step to the data is not reweighted: the weights hold the score of the last grid time before it
    s_last = score(lifts(tr.log_q_trace[-2], terms, refs), "min").reshape(hooks.n, hooks.K)
    s_0 = score(lifts(log_q0, terms, refs), "min").reshape(hooks.n, hooks.K)  # ~0: the models' priors nearly agree
    assert float(s_0.abs().max()) < 0.05
    want = lam * (s_last - s_0) - torch.logsumexp(lam * (s_last - s_0), -1, keepdim=True)
    got = hooks.log_w - torch.logsumexp(hooks.log_w, -1, keepdim=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    assert not torch.equal(s_final, s_last)


def test_steering_concentrates_on_the_shared_mode():
    """Steered particles resample towards the candidates whose lifts rise: the kept sample is on the shared mode at
    least as often as best-of-K's exact 1 - 2^-K, and far more often than the plain sampler's 1/2."""
    tr, hooks, terms, refs, _ = _steered_run(1.0, ess_threshold=0.5, n=400, K=4, seed=3)
    kept = tr.x[hooks.pick(tr.log_q)]
    share = float(on_shared(kept).double().mean())
    assert torch.stack(hooks.resampled).any()
    assert share > 1 - 0.5**4 - 0.04, share


def test_selection_helpers():
    s = torch.tensor([0.0, 2.0, 1.0, -1.0, -3.0, -2.0])
    assert best_of(s, 3).tolist() == [1, 3] and best_of(s, 2).tolist() == [1, 2, 5]
    assert random_of(torch.tensor([0.0, 0.99]), 3).tolist() == [0, 5]
    lift = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    assert score(lift, "min").tolist() == [-2.0, 0.25] and score(lift, "max").tolist() == [1.0, 0.5]
    assert score(lift, "mean").tolist() == [-0.5, 0.375]
    with pytest.raises(ValueError, match="groups of K"):
        best_of(s, 4)


def test_zmin_is_blind_to_each_terms_scale_where_min_is_not():
    # two images x 3 candidates; term 0 on a small scale, term 1 on a large one (a LoRA merge's purple and outline)
    g = torch.Generator().manual_seed(0)
    lift = torch.randn(6, 2, generator=g, dtype=torch.float64)
    scaled = lift * torch.tensor([0.1, 50.0], dtype=torch.float64) + torch.tensor([3.0, -7.0], dtype=torch.float64)
    z = score(lift, "zmin", K=3)
    assert torch.allclose(score(scaled, "zmin", K=3), z)  # per-term affine maps leave it unchanged
    by_hand = lift.reshape(2, 3, 2)
    by_hand = ((by_hand - by_hand.mean(1, keepdim=True)) / by_hand.std(1, unbiased=False, keepdim=True)).amin(-1)
    assert torch.allclose(z, by_hand.reshape(-1))
    # min on the scaled lifts follows term 1 alone; on this draw it picks other candidates than zmin does
    assert torch.equal(best_of(score(scaled, "min"), 3), best_of(scaled[:, 1], 3))
    assert not torch.equal(best_of(score(scaled, "min"), 3), best_of(z, 3))
    # a term equal on every candidate says nothing: it counts 0, not a division by zero
    flat = torch.tensor([[1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    assert score(flat, "zmin", K=2).tolist() == [-1.0, 0.0]
    with pytest.raises(ValueError, match="give K"):
        score(lift, "zmin")


class Counting:
    """A model that counts its calls (bad settings must be refused before the first)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.schedule, self.sample_shape = inner.schedule, inner.sample_shape

    def eps(self, x, t):
        self.calls += 1
        return self.inner.eps(x, t)


@pytest.mark.parametrize(
    ("kwargs", "sample_kw", "match"),
    [
        ({"candidates": 0}, {}, "candidates must be an integer in"),
        ({"candidates": 65}, {}, "candidates must be an integer in"),
        ({"candidates": 2.0}, {}, "candidates must be an integer in"),
        ({"candidates": True}, {}, "candidates must be an integer in"),
        ({"steer": -1.0}, {}, "steer must be a finite number"),
        ({"steer": float("nan"), "candidates": 2}, {}, "steer must be a finite number"),
        ({"steer": 1.0}, {}, "give candidates >= 2"),
        ({"steer": 1.0, "candidates": 2}, {"method": "ode"}, "needs method='sde'"),
        ({"steer": 1.0, "candidates": 2, "ess_threshold": 2}, {}, "ess_threshold must be"),
        ({"steer": 1.0, "candidates": 2, "window": (0.5, 0.2)}, {}, "steering window"),
        ({"select": "best"}, {}, "select='best' is not known"),
        ({"rule": "median"}, {}, "score rule 'median' is not known"),
        ({"rule": "zmin", "steer": 1.0, "candidates": 2}, {}, "which steering cannot"),
        ({"refs": "U2"}, {}, "is not a model of the expression"),
        ({"refs": ["U", "U", "U"]}, {}, "3 refs for 2 terms"),
        ({"candidates": 2}, {"x_T": torch.zeros(3, 2)}, "does not match x_T"),
    ],
)
def test_bad_settings_are_refused_before_any_model_call(kwargs, sample_kw, match):
    A, B, U = (Counting(m) for m in models())
    other = Counting(models()[2])
    refs = kwargs.pop("refs", "U")
    refs = {"U": U, "U2": other}[refs] if isinstance(refs, str) else [U] * len(refs)
    verify = Verify([A, B], refs, **kwargs)
    sample_kw = {"num_samples": 3, **sample_kw}
    with pytest.raises(ValueError, match=match):
        compose.sample(compose.Guided(compose.OR(A, B), U, 1.0), steps=10, verify=verify, **sample_kw)
    assert A.calls == B.calls == U.calls == other.calls == 0


def test_verify_refuses_particle_products():
    A, B, _ = models()
    with pytest.raises(ValueError, match="not to particle products"):
        compose.sample(compose.PoE(A, B), num_samples=2, steps=10, verify=Verify([A], B), num_particles=2)
