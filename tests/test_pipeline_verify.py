"""Per-image lifts and the candidates they choose between, in `ComposePipeline` (`pipelines.verify`): the "renoise"
estimator against exact log-density ratios, best-of-K against the same candidates drawn in one plain run, the rows it
costs (counted on the network), the tracked lift against the sampler's own log q, LoRA terms, the flow transformer,
and the refusals of bad options before any network call."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compose.loop import TorchDraws
from compose.toy import GaussianMixture, toy_models
from pipelines import ComposePipeline
from pipelines.verify import DEFAULT_LEVELS, renoise_lifts

LEVELS = len(DEFAULT_LEVELS)

CARDS = Path(__file__).resolve().parents[1] / "model_cards"
PROMPTS = ["a red shape", "a circle"]


@pytest.fixture(scope="module")
def pipe():
    p = ComposePipeline.from_pretrained(str(CARDS / "shapes-text"))
    p.set_progress_bar_config(disable=True)
    return p


class Rows:
    """Counts the rows every forward call of a network gets."""

    def __init__(self, net):
        self.rows, self.calls = 0, 0
        self.h = net.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self.rows += int(x.shape[0])
        self.calls += 1

    def close(self):
        self.h.remove()


class ToyRows:
    """`renoise_lifts`' view of the rows: exact mixtures as the verification rows."""

    def __init__(self, models):
        self.leaves = models

    def predict(self, x, t, schedule):
        return (torch.stack([m.eps(x, t) for m in self.leaves]),)


def test_renoise_lift_over_the_whole_log_snr_range_is_the_exact_log_density_ratio():
    """The eps-form ELBO difference, integrated over the whole log-SNR range, is log p_A(x) - log p_U(x) for exact
    models (averaged over the noise draws); restricted to a window it is the part of it that window carries."""
    m = toy_models()
    A = m["A"]
    U = GaussianMixture([[-2.0, 0.0], [2.0, 0.0], [0.0, 3.0]], 0.5, weights=[0.25, 0.5, 0.25], schedule=A.schedule)
    x0 = U.sample(120, torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = A.log_prob(x0, 0.0) - U.log_prob(x0, 0.0)
    levels = torch.linspace(10.0, -8.0, 37).tolist()
    g, draws = torch.Generator().manual_seed(1), 24
    est = sum(renoise_lifts(ToyRows([A, U]), x0, A.schedule, levels, TorchDraws(g), [0], [1])[:, 0]
              for _ in range(draws)) / draws  # fmt: skip
    err = est - exact
    assert float(exact.max() - exact.min()) > 30
    assert float(err.abs().median()) < 0.1, float(err.abs().median())
    assert float(torch.corrcoef(torch.stack([est, exact]))[0, 1]) > 0.999
    # against the mean over the terms (unconditional checkpoints): the reference row is not needed
    both = renoise_lifts(ToyRows([A, U]), x0, A.schedule, levels, TorchDraws(g), [0, 1], [None, None])
    torch.testing.assert_close(both[:, 0], -both[:, 1])


def test_renoise_lift_with_several_draws_per_level_keeps_its_mean_and_divides_its_variance():
    """repeats=D averages D independent noise draws of every level: the same expectation (the window's part of the
    exact log-density ratio), 1/D of the variance across draws, and D=1 is the one-draw lift to the bit."""
    m = toy_models()
    A, B = m["A"], m["B"]
    x0 = A.sample(64, torch.Generator().manual_seed(0), dtype=torch.float64)
    levels, rows = (1.0, 0.0, -1.0, -2.0), ToyRows([A, B])

    def lifts(repeats: int, seed: int) -> torch.Tensor:
        draws = TorchDraws(torch.Generator().manual_seed(seed))
        return renoise_lifts(rows, x0, A.schedule, levels, draws, [0], [1], repeats)[:, 0]

    single = renoise_lifts(rows, x0, A.schedule, levels, TorchDraws(torch.Generator().manual_seed(5)), [0], [1])
    torch.testing.assert_close(lifts(1, 5), single[:, 0], rtol=0, atol=0)
    one = torch.stack([lifts(1, s) for s in range(40)])  # (seeds, images)
    four = torch.stack([lifts(4, 100 + s) for s in range(40)])
    ratio = float((four.var(0) / one.var(0)).median())
    assert 0.15 < ratio < 0.35, ratio  # 1/4 up to the spread of 40-sample variances
    mean_gap = (four.mean(0) - one.mean(0)).abs() / (one.var(0) / 40 + four.var(0) / 40).sqrt()
    assert float(mean_gap.median()) < 1.5  # the same expectation: differences of a few standard errors at most


def _latents(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 24, 24, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("lift", ["renoise", "tracked"])
def test_best_of_k_keeps_the_best_candidate_of_the_same_plain_run(pipe, lift):
    """candidates=K over n images is a run of n K images with the same latents and generator, keeping in each group
    of K the one with the highest min-lift: the same images, lifts and scores to the bit."""
    n, K, steps = 2, 3, 4
    kw = dict(prompt=PROMPTS, operator="product", guidance_scale=4.0, num_inference_steps=steps, output_type="pt",
              lift=lift, latents=_latents(n * K))  # fmt: skip
    plain = pipe(batch_size=n * K, generator=torch.Generator().manual_seed(0), **kw)
    best = pipe(batch_size=n, candidates=K, generator=torch.Generator().manual_seed(0), **kw)
    scores = plain.lift.min(-1).values.reshape(n, K)
    torch.testing.assert_close(best.lift_scores, scores, rtol=0, atol=0)
    kept = scores.argmax(1)
    assert torch.equal(best.candidate, kept)
    rows = kept + K * torch.arange(n)
    torch.testing.assert_close(best.images, plain.images[rows], rtol=0, atol=0)
    torch.testing.assert_close(best.lift, plain.lift[rows], rtol=0, atol=0)
    torch.testing.assert_close(best.log_q, plain.log_q[rows], rtol=0, atol=0)
    assert best.kappa.shape == (steps, n, 2)


def test_random_selection_and_the_rows_the_lift_costs(pipe):
    n, K, steps = 2, 4, 3
    net = pipe.models[0].network
    kw = dict(prompt=PROMPTS, operator="and", guidance_scale=4.0, num_inference_steps=steps, output_type="pt")
    counter = Rows(net)
    try:
        plain = pipe(batch_size=n, lift="tracked", **kw)
        sampling = counter.rows
        assert plain.verification_rows == 0 and sampling == n * steps * 3  # 2 terms + the unconditional row
        counter.rows = 0
        out = pipe(batch_size=n, candidates=K, select="random", generator=torch.Generator().manual_seed(1), **kw)
        # K candidates, and the renoise lift of each: the levels x (2 terms + 1 shared reference) rows
        assert out.verification_rows == K * LEVELS * 3
        assert counter.rows == n * K * steps * 3 + n * out.verification_rows
        counter.rows = 0
        two = pipe(batch_size=n, candidates=K, lift_draws=2, generator=torch.Generator().manual_seed(1), **kw)
        assert two.verification_rows == K * LEVELS * 2 * 3  # every level twice
        assert counter.rows == n * K * steps * 3 + n * two.verification_rows
    finally:
        counter.close()
    assert out.lift.shape == (n, 2) and out.lift_scores.shape == (n, K) and out.candidate.shape == (n,)
    kept = out.lift_scores.gather(1, out.candidate[:, None])[:, 0]
    torch.testing.assert_close(kept, out.lift.min(-1).values)


def test_renoise_steering_weighs_the_candidates_at_three_steps_and_counts_their_rows(pipe):
    """steer with the renoise lift: after 30%, 50% and 70% of the steps every candidate's composed x0_hat is scored
    (the levels x 3 rows each), the weights move by strength x the score's change, low-ESS groups are resampled;
    the image kept is the best final candidate; every row is counted in verification_rows."""
    from pipelines.verify import steering_steps

    n, K, steps = 2, 3, 10
    assert steering_steps(steps) == {2, 4, 6}
    counter = Rows(pipe.models[0].network)
    try:
        out = pipe(prompt=PROMPTS, operator="product", guidance_scale=4.0, num_inference_steps=steps, batch_size=n,
                   output_type="pt", candidates=K, steer=50.0, generator=torch.Generator().manual_seed(2))  # fmt: skip
    finally:
        counter.close()
    assert out.verification_rows == K * LEVELS * 3 * (1 + 3)
    assert counter.rows == n * K * steps * 3 + n * out.verification_rows
    kept = out.lift_scores.gather(1, out.candidate[:, None])[:, 0]
    torch.testing.assert_close(kept, out.lift_scores.amax(1))
    with pytest.raises(ValueError, match="needs method='sde'"):
        pipe(prompt=PROMPTS, operator="product", candidates=2, steer=1.0, method="ode", num_inference_steps=2)


def test_tracked_lift_is_the_sampler_log_q_against_the_unconditional_leaf(pipe):
    seen = {}

    def cb(p, k, t, tensors):
        seen["log_q"] = tensors["log_q"].clone()
        return {}

    out = pipe(prompt=PROMPTS, operator="average", guidance_scale=3.0, num_inference_steps=4, batch_size=2,
               output_type="pt", lift="tracked", callback_on_step_end=cb,
               callback_on_step_end_tensor_inputs=["log_q"])  # fmt: skip
    lq = seen["log_q"]  # (n, L): the two terms, then the unconditional leaf
    torch.testing.assert_close(out.lift, lq[:, :2] - lq[:, 2:3])
    torch.testing.assert_close(out.lift, out.log_q - lq[:, 2:3])
    none = pipe(prompt=PROMPTS, operator="average", guidance_scale=1.0, num_inference_steps=2, batch_size=1,
                output_type="pt", lift="tracked")  # fmt: skip
    assert none.lift is None  # no unconditional branch to read it against (lift="renoise" encodes one)
    renoise = pipe(prompt=PROMPTS, operator="average", guidance_scale=1.0, num_inference_steps=2, batch_size=1,
                   output_type="pt", lift="renoise")  # fmt: skip
    assert renoise.lift.shape == (1, 2) and bool(torch.isfinite(renoise.lift).all())


def test_lora_terms_are_read_against_the_base_and_a_merge_reports_each_lora(pipe):
    pipe.load_lora_experts({n: str(CARDS / f"shapes-lora-{n}") for n in ("purple", "outline")})
    try:
        net = pipe.models[0].network
        counter = Rows(net)
        try:
            merged = pipe(prompt="a circle", lora=["purple", "outline"], lora_mode="merge", guidance_scale=4.0,
                          num_inference_steps=2, batch_size=2, output_type="pt", lift="renoise")  # fmt: skip
        finally:
            counter.close()
        # one merged term, but a lift per merged LoRA: each LoRA's row and the base row on the prompt, per level
        assert merged.lift.shape == (2, 2) and merged.verification_rows == LEVELS * 3
        assert counter.rows == 2 * 2 * 2 + 2 * merged.verification_rows
        kw = dict(guidance_scale=4.0, num_inference_steps=2, batch_size=2, output_type="pt", lift="renoise")
        composed = pipe(prompt="a circle", lora=["purple", "outline"], operator="product", candidates=2, **kw)
        assert composed.lift.shape == (2, 2) and composed.lift_scores.shape == (2, 2)
    finally:
        pipe.unload_lora_experts()


def test_flow_transformer_lifts():
    flow = ComposePipeline.from_pretrained(str(CARDS / "shapes-text-flow"))
    flow.set_progress_bar_config(disable=True)
    out = flow(prompt=PROMPTS, operator="product", guidance_scale=4.0, num_inference_steps=3, batch_size=2,
               output_type="pt", candidates=2, generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.lift.shape == (2, 2) and bool(torch.isfinite(out.lift).all())
    assert out.verification_rows == 2 * LEVELS * 3


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(candidates=0), "candidates must be an integer in"),
        (dict(candidates=65), "candidates must be an integer in"),
        (dict(candidates=2.5), "candidates must be an integer in"),
        (dict(steer=1.0), "give candidates >= 2"),
        (dict(steer=1.0, candidates=2, lift="tracked", method="ode"), "needs method='sde'"),
        (dict(steer=1.0, candidates=2, lift=None, select="random"), "give lift='renoise' or 'tracked' with it"),
        (dict(steer=-2.0, candidates=2), "steer must be a finite number"),
        (dict(lift="best"), "lift='best' is not known"),
        (dict(lift_levels=()), "lift_levels must be 1 to 16"),
        (dict(lift_levels=(1.0, float("nan"))), "lift_levels must be 1 to 16"),
        (dict(lift_levels="low"), "lift_levels must be 1 to 16"),
        (dict(lift_draws=0), "lift_draws must be an integer from 1 to 16"),
        (dict(lift_draws=2.0), "lift_draws must be an integer from 1 to 16"),
        (dict(lift_draws=True), "lift_draws must be an integer from 1 to 16"),
        (dict(lift_draws=17), "lift_draws must be an integer from 1 to 16"),
        (dict(select="best"), "select='best' is not known"),
        (dict(score_rule="median"), "score rule 'median' is not known"),
        (dict(candidates=2, lift=None), "needs a lift"),
        (dict(operator="product_smc", num_particles=2, candidates=2), "has particles of its own"),
        (dict(batch_size=100, candidates=64), "num_images_per_prompt"),
        (dict(guidance_scale=1.0, candidates=2, lift="tracked"), "read against the unconditional branch"),
        (dict(guidance_scale=1.0, candidates=2, lift="tracked", steer=1.0), "read against the unconditional branch"),
    ],
)
def test_bad_options_are_refused_before_any_network_call(pipe, kw, match):
    counter = Rows(pipe.models[0].network)
    try:
        args = dict(prompt=PROMPTS, operator="product", guidance_scale=4.0, num_inference_steps=2, output_type="pt")
        with pytest.raises(ValueError, match=match):
            pipe(**{**args, **kw})
    finally:
        counter.close()
    assert counter.calls == 0
