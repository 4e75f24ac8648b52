"""ComposePipeline(operator="product_smc"): particles on tiny offline components (CPU, seconds per test)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from test_pipeline import CallCounter, pixel_text_pipe, quiet, sd_pipe, seed, uncond_pipe

import compose
from pipelines import ComposePipeline

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return quiet(sd_pipe(str(tmp_path_factory.mktemp("smc"))))


def test_particles_of_every_image_share_one_batched_call(sd):
    calls = CallCounter(sd.unet)
    out = sd(prompt=["a cat", "a dog"], operator="product_smc", num_particles=3, guidance_scale=3.0,
             num_inference_steps=4, batch_size=2, generator=seed(), output_type="pt")  # fmt: skip
    # every step: 2 images x 3 particles x (2 prompts + the unconditional branch) in ONE call
    assert calls.rows == [2 * 3 * 3] * 4
    assert out.images.shape == (2, 3, 16, 16)
    # every step but the step to the data is reweighted
    assert out.ess.shape == (3, 2) and bool((out.ess >= 1 - 1e-9).all() and (out.ess <= 3 + 1e-9).all())
    assert out.num_resamples.shape == (2,) and out.log_weights.shape == (2, 3)
    assert torch.allclose(torch.logsumexp(out.log_weights, -1), torch.zeros(2, dtype=torch.float64))
    assert out.kappa.shape == (4, 2, 3) and out.log_q.shape == (2, 2)
    # the exponents around the unconditional branch: guidance_scale * weights, 1 - their sum
    assert torch.allclose(out.kappa[0, 0], torch.tensor([3.0, 3.0, -5.0], dtype=torch.float64))


def test_weights_follow_the_guided_conjunction_formula(sd):
    """The log-weights the pipeline reports are the sum of (h g^2 / 2)(||sum w delta||^2 - sum w ||delta||^2)."""
    record = {}

    def grab(pipe, k, t, tensors):
        record[k] = tensors["latents"].clone()
        return {}

    kw = dict(prompt=["a cat", "a dog"], operator="product_smc", num_particles=4, guidance_scale=2.0,
              num_inference_steps=2, generator=seed(3), output_type="latent")  # fmt: skip
    out = sd(**kw, ess_threshold=1e-6, callback_on_step_end=grab, callback_on_step_end_tensor_inputs=["latents"])
    # recompute the increment of the one reweighted step (the step to the data is not reweighted) from the network
    # outputs at the first grid time
    sch = sd.models[0].schedule
    t0, t1 = float(out.timesteps[0]), float(out.timesteps[1])
    x = torch.randn((4, 4, 8, 8), generator=seed(3)) * float(sch.sigma(t0))  # the pipeline's initial draw (A = 1)
    m = sd.models[0]
    enc = {p: m.family.encode(m, p, "cpu")["encoder_hidden_states"] for p in ("a cat", "a dog", "")}
    T = sch.timestep(torch.tensor(t0, dtype=torch.float64)).float().expand(4)
    e = {p: sd.unet(x, T, encoder_hidden_states=h.expand(4, -1, -1)).sample.double() for p, h in enc.items()}
    d1, d2 = (e["a cat"] - e[""]).flatten(1), (e["a dog"] - e[""]).flatten(1)
    w = 2.0
    dl = 0.5 * (t0 - t1) * float(sch.g2_over_sigma2(t0))
    dl = dl * (((w * d1 + w * d2) ** 2).sum(-1) - w * (d1**2).sum(-1) - w * (d2**2).sum(-1))
    assert torch.allclose(out.log_weights[0], dl - torch.logsumexp(dl, 0), atol=1e-3)


def test_same_seed_same_images_and_generator_lists(sd):
    kw = dict(prompt=["a cat", "a dog"], operator="product_smc", num_particles=2, num_inference_steps=3,
              guidance_scale=2.0, batch_size=2, output_type="pt")  # fmt: skip
    a = sd(**kw, generator=seed(1)).images
    b = sd(**kw, generator=seed(1)).images
    c = sd(**kw, generator=seed(2)).images
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1 = sd(**kw, generator=[seed(5), seed(6)]).images
    g2 = sd(**kw, generator=[seed(5), seed(7)]).images
    assert torch.equal(g1[0], g2[0]) and not torch.equal(g1[1], g2[1])  # image i depends on generator i only


def test_resampling_events_are_counted(sd):
    kw = dict(prompt=["a cat", "a dog"], operator="product_smc", num_particles=4, num_inference_steps=4,
              guidance_scale=6.0, batch_size=2, generator=seed(0), output_type="latent")  # fmt: skip
    every = sd(**kw, ess_threshold=1.0)
    assert torch.equal(every.num_resamples, (every.ess < 4 - 1e-9).sum(0))
    assert int(every.num_resamples.sum()) > 0
    never = sd(**kw, resample_window=(0.999, 1.0))
    assert int(never.num_resamples.sum()) == 0


def test_unconditional_checkpoints_plain_product_and_pixel_text(tmp_path):
    """No guidance: the exponents are the weights; the prior is N(0, sigma^2 / A)."""
    pipe = quiet(ComposePipeline.from_models([*uncond_pipe(0).models, *uncond_pipe(1).models]))
    calls = CallCounter(pipe.unet, pipe.models[1].unet)
    out = pipe(operator="product_smc", num_particles=2, weights=[1.0, 2.0], num_inference_steps=2, batch_size=3,
               generator=seed(), output_type="np")  # fmt: skip
    assert out.images.shape == (3, 8, 8, 3) and calls.rows == [6] * 4  # 2 UNets x 2 steps, 3 x 2 rows
    assert torch.allclose(out.kappa[0, 0], torch.tensor([1.0, 2.0], dtype=torch.float64))
    # one prompt with guidance: CFG as a product (exponents w and 1 - w)
    text = quiet(pixel_text_pipe(str(tmp_path)))
    out = text(prompt="a red shape", operator="product_smc", num_particles=2, guidance_scale=3.0,
               num_inference_steps=2, generator=seed(), output_type="pt")  # fmt: skip
    assert out.images.shape == (1, 3, 8, 8)
    assert torch.allclose(out.kappa[0, 0], torch.tensor([3.0, -2.0], dtype=torch.float64))


def test_initial_particles_are_scaled_by_the_total_exponent(sd, monkeypatch):
    """No guidance, two prompts: the product of two N(0, sigma_T^2) priors is N(0, sigma_T^2 / 2)."""
    import pipelines.compose_pipeline as cp

    seen = []

    def spy(composer, predict, x, *args, **kwargs):
        seen.append(x.clone())
        return compose.loop.run(composer, predict, x, *args, **kwargs)

    monkeypatch.setattr(cp, "run", spy)
    lat = torch.randn(2 * 3, 4, 8, 8, generator=seed(0))
    out = sd(prompt=["a", "b"], operator="product_smc", num_particles=3, guidance_scale=1.0, latents=lat,
             num_inference_steps=2, output_type="latent")  # fmt: skip
    sigma = float(sd.models[0].schedule.sigma(out.timesteps[0]))
    assert out.images.shape == (2, 4, 8, 8)  # the number of images is read from the latents' rows / num_particles
    assert torch.allclose(seen[0], lat * sigma / math.sqrt(2.0))
    with pytest.raises(ValueError, match="num_particles=3"):
        sd(prompt=["a", "b"], operator="product_smc", num_particles=3, latents=torch.ones(2, 4, 8, 8), batch_size=2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_particles=1), "num_particles"),
        (dict(num_particles=None), "num_particles"),
        (dict(num_particles=4, ess_threshold=0.0), "ess_threshold"),
        (dict(num_particles=4, ess_threshold=2.0), "ess_threshold"),
        (dict(num_particles=4, method="ode"), "method='sde'"),
        (dict(num_particles=4, weights=[1.0, 0.0]), "exponent of 0"),
        (dict(num_particles=4, resample_window=(1.0, 0.5)), "resample_window"),
        (dict(operator="and", num_particles=4), "product_smc"),
        (dict(num_particles=4, langevin_steps=-1), "langevin_steps"),
        (dict(num_particles=4, langevin_steps=1, langevin_step=0.0), "langevin_step"),
        (dict(num_particles=4, langevin_steps=1, langevin_after="never"), "langevin_after"),
        (dict(operator="product", langevin_steps=1), "langevin_steps is used by operator='product_smc'"),
    ],
)
def test_bad_inputs_name_the_argument(sd, kwargs, match):
    kw = dict(prompt=["a", "b"], operator="product_smc", num_inference_steps=1, output_type="latent")
    with pytest.raises(ValueError, match=match):
        sd(**{**kw, **kwargs})


def test_guidance_one_and_negative_weight_without_unconditional_is_refused(sd):
    with pytest.raises(ValueError, match="positive"):
        sd(prompt=["a", "b"], operator="product_smc", num_particles=2, weights=[1.0, -1.0], guidance_scale=1.0,
           num_inference_steps=1)  # fmt: skip
    # with guidance a negative weight is a negative prompt (guided form): accepted
    out = sd(prompt=["a", "b"], operator="product_smc", num_particles=2, weights=[1.0, -0.25], guidance_scale=2.0,
             num_inference_steps=1, output_type="latent")  # fmt: skip
    assert torch.allclose(out.kappa[0, 0], torch.tensor([2.0, -0.5, -0.5], dtype=torch.float64))


def test_langevin_moves_are_batched_calls_and_reuse_the_last_prediction(sd):
    """langevin_steps=1 after every reweighted step (all but the step to the data): one call at the moved-from
    particles and one at the proposals, whose predictions the next step reuses: 1 + 2 x (steps - 1) calls of all rows
    (evaluations = steps + (steps - 1) per particle)."""
    kw = dict(prompt=["a cat", "a dog"], operator="product_smc", num_particles=3, guidance_scale=3.0,
              num_inference_steps=3, batch_size=2, output_type="pt")  # fmt: skip
    calls = CallCounter(sd.unet)
    out = sd(**kw, generator=seed(1), langevin_steps=1)
    assert calls.rows == [2 * 3 * 3] * (1 + 2 * 2)
    assert torch.equal(out.evaluations, torch.full((2,), 5.0, dtype=torch.float64))
    again = sd(**kw, generator=seed(1), langevin_steps=1).images
    plain = sd(**kw, generator=seed(1))
    assert torch.equal(out.images, again) and not torch.equal(out.images, plain.images)
    assert torch.equal(plain.evaluations, torch.full((2,), 3.0, dtype=torch.float64))
    # one generator per image: image i depends on generator i only, with the moves too
    g1 = sd(**kw, generator=[seed(5), seed(6)], langevin_steps=1).images
    g2 = sd(**kw, generator=[seed(5), seed(7)], langevin_steps=1).images
    assert torch.equal(g1[0], g2[0]) and not torch.equal(g1[1], g2[1])


def test_langevin_after_resample_moves_only_resampled_images(sd):
    kw = dict(prompt=["a cat", "a dog"], operator="product_smc", num_particles=4, num_inference_steps=4,
              guidance_scale=6.0, batch_size=2, generator=None, output_type="latent")  # fmt: skip
    never = sd(**{**kw, "generator": seed(0)}, ess_threshold=1e-6, langevin_steps=2, langevin_after="resample")
    plain = sd(**{**kw, "generator": seed(0)}, ess_threshold=1e-6)
    assert torch.equal(never.images, plain.images)  # nothing resampled, nothing moved, no extra draws
    moved = sd(**{**kw, "generator": seed(0)}, ess_threshold=1.0, langevin_steps=2, langevin_after="resample")
    assert int(moved.num_resamples.sum()) > 0
    assert torch.equal(moved.evaluations, 4 + 2 * moved.num_resamples.double())
