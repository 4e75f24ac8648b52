"""Flow-matching transformer checkpoints (issue 21): SD3 and Flux through ComposePipeline, on tiny offline components
(the configs of diffusers' own tests; tokenizers built in code, see docs/notes.md).

With one prompt and no operator, ComposePipeline equals diffusers' own StableDiffusion3Pipeline / FluxPipeline from
the same latents (FlowMatchEuler steps: our "euler" ODE on the rectified-flow path, the checkpoint's own sigmas) to
1e-4; composed calls (OR / AND, SDE / ODE) are finite from the first step (sigma = 1)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from test_pipeline import CallCounter, make_tokenizer, seed
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from pipelines import ComposePipeline

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
T5_LEN = 48


def t5_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    words = ["a", "cat", "dog", "red", "blue", "circle", "square", "shape"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words]
    vocab += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           model_max_length=T5_LEN, extra_ids=0)  # fmt: skip


def t5_encoder():
    torch.manual_seed(0)
    return T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4)).eval()


def clip_config(projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=54, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=projection_dim,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu")  # fmt: skip


def sd3_components(tmp, t5: bool = True) -> dict:
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)  # fmt: skip
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4, sample_size=16,
                        scaling_factor=1.5305, shift_factor=0.0609)  # fmt: skip
    torch.manual_seed(2)
    enc1 = CLIPTextModelWithProjection(clip_config()).eval()
    torch.manual_seed(3)
    enc2 = CLIPTextModelWithProjection(clip_config()).eval()
    tok = make_tokenizer(os.path.join(tmp, "tok"))
    return dict(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                text_encoder=enc1, tokenizer=tok, text_encoder_2=enc2, tokenizer_2=tok,
                text_encoder_3=t5_encoder() if t5 else None, tokenizer_3=t5_tokenizer() if t5 else None)  # fmt: skip


def flux_components(tmp, guidance_embeds: bool = True) -> dict:
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=guidance_embeds)  # fmt: skip
    torch.manual_seed(1)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)  # fmt: skip
    torch.manual_seed(2)
    clip = CLIPTextModel(clip_config()).eval()
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    return dict(transformer=transformer, vae=vae, scheduler=sched, text_encoder=clip,
                tokenizer=make_tokenizer(os.path.join(tmp, "tok")), text_encoder_2=t5_encoder(),
                tokenizer_2=t5_tokenizer())  # fmt: skip


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance, t5", [(1.0, True), (4.0, True), (4.0, False)])
def test_sd3_one_prompt_equals_diffusers_pipeline(tmp_path, guidance, t5):
    comps = sd3_components(str(tmp_path), t5=t5)
    latents = torch.randn(2, 4, 8, 8, generator=seed(1))
    kw = dict(num_inference_steps=4, guidance_scale=guidance, height=16, width=16, output_type="latent",
              max_sequence_length=T5_LEN)  # fmt: skip
    ref = quiet(StableDiffusion3Pipeline(**comps))(prompt=["a red circle"] * 2, latents=latents, **kw).images
    pipe = quiet(ComposePipeline(**comps))
    calls = CallCounter(comps["transformer"])
    out = pipe(prompt="a red circle", latents=latents, method="ode", solver="euler", batch_size=2, **kw)
    torch.testing.assert_close(out.images, ref, atol=1e-4, rtol=1e-4)
    assert len(calls.rows) == 4  # 4 steps = 4 transformer calls (CFG rows and probe rows in the same call)
    assert float(out.timesteps[0]) == 1.0 and float(out.timesteps[-1]) == 0.0


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_flux_one_prompt_equals_diffusers_pipeline(tmp_path, guidance_embeds):
    comps = flux_components(str(tmp_path), guidance_embeds)
    ref_pipe = quiet(FluxPipeline(**comps))
    latents, _ = ref_pipe.prepare_latents(2, 1, 8, 8, torch.float32, "cpu", seed(1))  # packed (2, 16, 4)
    kw = dict(num_inference_steps=4, guidance_scale=3.0, height=8, width=8, output_type="latent",
              max_sequence_length=T5_LEN)  # fmt: skip
    ref = ref_pipe(prompt=["a blue square"] * 2, latents=latents, **kw).images
    out = quiet(ComposePipeline(**comps))(prompt="a blue square", latents=latents, method="ode", batch_size=2, **kw)
    assert out.images.shape == latents.shape
    torch.testing.assert_close(out.images, ref, atol=1e-4, rtol=1e-4)


def test_flux_true_cfg_with_a_negative_prompt_equals_diffusers(tmp_path):
    comps = flux_components(str(tmp_path))
    ref_pipe = quiet(FluxPipeline(**comps))
    latents, _ = ref_pipe.prepare_latents(1, 1, 8, 8, torch.float32, "cpu", seed(2))
    kw = dict(num_inference_steps=3, guidance_scale=2.0, height=8, width=8, output_type="latent",
              max_sequence_length=T5_LEN, negative_prompt="a dog", true_cfg_scale=3.0)  # fmt: skip
    ref = ref_pipe(prompt="a cat", latents=latents, **kw).images
    pipe = quiet(ComposePipeline(**comps))
    calls = CallCounter(comps["transformer"])
    out = pipe(prompt="a cat", latents=latents, method="ode", **kw)
    torch.testing.assert_close(out.images, ref, atol=1e-4, rtol=1e-4)
    assert len(calls.rows) == 3  # the negative prompt rides in the same call (diffusers makes two)


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("operator, method", [("and", "sde"), ("and", "ode"), ("or", "sde"), ("or", "ode"),
                                              ("product", "sde")])  # fmt: skip
def test_composed_flow_calls_are_finite_from_step_one(tmp_path, family, operator, method):
    comps = sd3_components(str(tmp_path)) if family == "sd3" else flux_components(str(tmp_path))
    pipe = quiet(ComposePipeline(**comps))
    extra = dict(guidance_scale=3.0) if family == "sd3" else dict(true_cfg_scale=2.0, negative_prompt="a dog")
    size = 16 if family == "sd3" else 8
    out = pipe(prompt=["a red shape", "a circle"], operator=operator, method=method, num_inference_steps=4,
               height=size, width=size, batch_size=2, generator=seed(0), output_type="pt", max_sequence_length=T5_LEN,
               **extra)  # fmt: skip
    assert bool(torch.isfinite(out.images).all()) and bool(torch.isfinite(out.kappa).all())
    assert bool(torch.isfinite(out.log_q).all())
    if operator == "and":
        torch.testing.assert_close(out.kappa[0], torch.full((2, 2), 0.5, dtype=torch.float64))  # 1/M at sigma = 1


def test_flow_checkpoints_save_load_and_refuse_other_latent_spaces(tmp_path):
    comps = sd3_components(str(tmp_path))
    pipe = quiet(ComposePipeline(**comps))
    pipe.save_pretrained(tmp_path / "sd3")
    again = quiet(ComposePipeline.from_pretrained(str(tmp_path / "sd3")))
    assert type(again.transformer).__name__ == "SD3Transformer2DModel" and again.unet is None
    kw = dict(prompt="a cat", num_inference_steps=2, height=16, width=16, output_type="latent",
              max_sequence_length=T5_LEN)  # fmt: skip
    torch.testing.assert_close(again(**kw, generator=seed(3)).images, pipe(**kw, generator=seed(3)).images)
    flux = quiet(ComposePipeline(**flux_components(str(tmp_path))))
    flux.save_pretrained(tmp_path / "flux")
    with pytest.raises(ValueError, match="do not share a latent space"):
        ComposePipeline.from_pretrained([str(tmp_path / "sd3"), str(tmp_path / "flux")])
    with pytest.raises(ValueError, match="true_cfg_scale"):
        pipe(prompt="a cat", true_cfg_scale=2.0, num_inference_steps=2, height=16, width=16)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_custom_sigmas_are_shifted_once_as_in_diffusers(tmp_path, family):
    """`sigmas=` goes through the checkpoint's shift (SD3: shift 3; Flux: dynamic mu) exactly once, as diffusers'
    pipelines do: the same argument gives the same latents in both."""
    sigmas = [1.0, 0.8, 0.45, 0.2]
    if family == "sd3":
        comps = sd3_components(str(tmp_path))
        ref_pipe = StableDiffusion3Pipeline(**comps)
        latents = torch.randn(1, 4, 8, 8, generator=seed(4))
        size = 16
    else:
        comps = flux_components(str(tmp_path))
        ref_pipe = FluxPipeline(**comps)
        latents, _ = ref_pipe.prepare_latents(1, 1, 8, 8, torch.float32, "cpu", seed(4))
        size = 8
    kw = dict(sigmas=sigmas, guidance_scale=2.0, height=size, width=size, output_type="latent",
              max_sequence_length=T5_LEN)  # fmt: skip
    ref = quiet(ref_pipe)(prompt="a red circle", latents=latents, **kw).images
    out = quiet(ComposePipeline(**comps))(prompt="a red circle", latents=latents, method="ode", solver="euler", **kw)
    torch.testing.assert_close(out.images, ref, atol=1e-4, rtol=1e-4)
    assert float(out.timesteps[1]) != pytest.approx(0.8, abs=1e-3)  # shifted (SD3 shift 3: 0.923), not used as given
    with pytest.raises(ValueError, match=r"sigmas of a flow-matching checkpoint must lie in \(0, 1\]"):
        ComposePipeline(**comps)(prompt="a cat", sigmas=[14.6, 7.0, 1.0], height=size, width=size)


def _two_checkpoints(tmp_path, family: str, second_seed: int | None):
    """Two folders of one family sharing the latent space: the second a copy (None) or re-initialised weights."""
    make = sd3_components if family == "sd3" else flux_components
    paths = []
    for k, s in enumerate([None, second_seed]):
        comps = make(str(tmp_path / f"tok{k}")) if family == "sd3" else make(str(tmp_path / f"tok{k}"), k == 0)
        if s is not None:
            torch.manual_seed(s)
            for p in comps["transformer"].parameters():
                p.data.add_(0.02 * torch.randn_like(p))  # a "fine-tune" of the first
        quiet(ComposePipeline(**comps)).save_pretrained(tmp_path / f"{family}{k}")
        paths.append(str(tmp_path / f"{family}{k}"))
    return paths


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_several_flow_checkpoints_compose_as_terms(tmp_path, family):
    """SD3.5 Large + Medium, Flux dev + schnell, a base and its fine-tune: one term per checkpoint. OR of a
    checkpoint and its exact copy samples that checkpoint (SDE, same noise); a fine-tune composes finitely with
    every operator, SDE and ODE; Flux dev (guidance embedding) and schnell-like (none) sit in one expression, with
    true CFG and a negative prompt."""
    (tmp_path / "tok0").mkdir()
    (tmp_path / "tok1").mkdir()
    size = 16 if family == "sd3" else 8
    kw = dict(num_inference_steps=3, height=size, width=size, output_type="latent", max_sequence_length=T5_LEN,
              batch_size=2)  # fmt: skip
    guide = dict(guidance_scale=2.0) if family == "sd3" else dict(true_cfg_scale=2.0, negative_prompt="a dog")
    kw.update(guide)
    base, tuned = _two_checkpoints(tmp_path, family, 7)
    single = quiet(ComposePipeline.from_pretrained(base))
    ref = single(prompt="a red circle", generator=seed(5), **kw)
    if family == "sd3":  # an exact copy (Flux: the second folder has no guidance embedding, so it is not a copy)
        twin = quiet(ComposePipeline.from_pretrained([base, base]))
        out = twin(prompt=["a red circle", "a red circle"], operator="or", generator=seed(5), **kw)
        torch.testing.assert_close(out.images, ref.images, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.kappa, torch.full_like(out.kappa, 0.5))
    pair = quiet(ComposePipeline.from_pretrained([base, tuned]))
    assert [type(m.network).__name__ for m in pair.models] == [type(single.transformer).__name__] * 2
    for operator in ("or", "and", "average", "product"):
        for method in ("sde", "ode"):
            res = pair(prompt=["a red circle", "a blue square"], operator=operator, method=method, generator=seed(5),
                       **kw)  # fmt: skip
            assert bool(torch.isfinite(res.images).all()) and bool(torch.isfinite(res.kappa).all()), (operator, method)
            assert bool(torch.isfinite(res.log_q).all())
    assert not torch.allclose(res.images, ref.images)


SHIPPED_FLOW = Path(__file__).resolve().parents[1] / "model_cards" / "shapes-text-flow"


@pytest.mark.skipif(not (SHIPPED_FLOW / "model_index.json").is_file(), reason="model_cards/shapes-text-flow missing")
def test_shipped_flow_model_through_jobs_and_the_space(monkeypatch):
    """The shipped flow transformer runs through a job (no schedule: the checkpoint's own sigmas, as the pipeline
    defaults) and through the Space (which read the UNet's config for its size check and crashed on a transformer)."""
    import importlib.util

    from pipelines import jobs as J

    pipe = quiet(ComposePipeline.from_pretrained(str(SHIPPED_FLOW)))
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel" and pipe.unet is None
    job = J.parse_job({"models": ["shapes-text-flow"], "prompts": ["a red shape", "a circle"], "operator": "and",
                       "steps": 2, "images": 1, "seed": 3, "guidance": 4.0})  # fmt: skip
    assert job.schedule is None and J.pipeline_kwargs(job)["schedule"] is None
    res = J.run_job(pipe, job)
    ref = pipe(prompt=["a red shape", "a circle"], operator="and", num_inference_steps=2, guidance_scale=4.0,
               schedule="scheduler", generator=[seed(3)], output_type="np")  # fmt: skip
    got = np.asarray(res.images[0], dtype=np.float64) / 255
    np.testing.assert_allclose(got, ref.images[0], atol=1 / 255 + 1e-6)
    torch.testing.assert_close(res.timesteps, ref.timesteps)
    with pytest.raises(ValueError, match="schedule='nope' is not known"):
        J.parse_job({**job.__dict__, "schedule": "nope", "models": ["shapes-text-flow"]})
    gr = pytest.importorskip("gradio")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    spec = importlib.util.spec_from_file_location("space_app_flow", SHIPPED_FLOW.parents[1] / "examples/space/app.py")
    app_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app_mod)
    app = app_mod.App(J.Limits(max_steps=4, max_images=2, max_terms=3, max_side=48))
    assert "shapes-text-flow" in J.shipped_models() and "scheduler" in app.schedules
    fields = dict(models=["shapes-text-flow"], other="", prompts="a red shape\na circle", operator="and", steps=2,
                  schedule="scheduler", guidance=4.0, seed=3, images=1, size=0)  # fmt: skip
    gallery, _fig, summary = app.generate(*fields.values())
    shown = np.asarray(gallery[0][0])[:: gallery[0][0].width // 24, :: gallery[0][0].width // 24]
    np.testing.assert_array_equal(shown, np.asarray(res.images[0]))
    assert "(scheduler)" in summary
    with pytest.raises(gr.Error, match="applies to SD3 / Flux checkpoints"):  # a UNet checkpoint refuses it, clearly
        app.generate(*{**fields, "models": ["shapes-text"]}.values())
