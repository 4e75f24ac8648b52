"""diffusers' ways in (issue 31): `ComposePipeline.from_pipe` from a loaded StableDiffusionPipeline,
StableDiffusionXLPipeline, StableDiffusion3Pipeline and FluxPipeline shares their modules (the same objects) and, with
one prompt, reproduces the source pipeline's output to the equivalence tolerances of tests/test_pipeline.py and
tests/test_flow_pipelines.py (the tiny offline components are theirs)."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from test_flow_pipelines import T5_LEN, flux_components, sd3_components
from test_pipeline import cond_unet, make_tokenizer, seed, text_encoder, tiny_vae, xl_pipe

from compose.schedule import NoiseSchedule
from pipelines import ComposePipeline

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ddim() -> DDIMScheduler:
    """DDIM with eta = 0 landing on x0_hat at the last step (set_alpha_to_one): the pipeline's "ddim" ODE step."""
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         set_alpha_to_one=True, clip_sample=False)  # fmt: skip


def sd_source(tmp) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(vae=tiny_vae(), text_encoder=text_encoder(), tokenizer=make_tokenizer(tmp + "/tok"),
                                   unet=cond_unet(), scheduler=ddim(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip


def sdxl_source(tmp) -> StableDiffusionXLPipeline:
    comps = {k: v for k, v in xl_pipe(tmp).components.items() if v is not None}
    return StableDiffusionXLPipeline(**{**comps, "scheduler": ddim()})


SHARED = {  # the modules from_pipe must carry over (the same objects)
    "sd": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
    "sd3": ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer_3", "scheduler"),
    "flux": ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer_2", "scheduler"),
}


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_from_pipe_of_a_unet_pipeline_shares_its_modules_and_output(tmp_path, family, guidance):
    """From SD / SDXL: the same module objects, and one prompt by the DDIM ODE on the source scheduler's timesteps
    equals the source pipeline's latents to 1e-4 (test_and_fidelity's pipeline tolerance)."""
    source = quiet((sd_source if family == "sd" else sdxl_source)(str(tmp_path)))
    latents = torch.randn(2, 4, 8, 8, generator=seed(1))
    kw = dict(num_inference_steps=4, guidance_scale=guidance, height=16, width=16, output_type="latent")
    ref = source(prompt=["a cat"] * 2, latents=latents, **kw).images
    pipe = quiet(ComposePipeline.from_pipe(source))
    for name in SHARED[family]:
        assert getattr(pipe, name) is getattr(source, name), name
    ts = source.scheduler.timesteps.tolist()
    sigma0 = float(NoiseSchedule.from_scheduler(source.scheduler).sigma(torch.tensor((ts[0] + 1) / 1000.0)))
    # diffusers starts DDIM from the latents as they are; the pipeline from sigma(t_0) * latents
    out = pipe(prompt="a cat", latents=latents / sigma0, timesteps=ts, method="ode", solver="ddim", batch_size=2,
               **{k: v for k, v in kw.items() if k != "num_inference_steps"})  # fmt: skip
    torch.testing.assert_close(out.images, ref, atol=1e-4, rtol=1e-4)


def test_from_pipe_of_sd3_shares_its_modules_and_output(tmp_path):
    source = quiet(StableDiffusion3Pipeline(**sd3_components(str(tmp_path))))
    latents = torch.randn(2, 4, 8, 8, generator=seed(1))
    kw = dict(num_inference_steps=4, guidance_scale=4.0, height=16, width=16, output_type="latent",
              max_sequence_length=T5_LEN)  # fmt: skip
    ref = source(prompt=["a red circle"] * 2, latents=latents, **kw).images
    pipe = quiet(ComposePipeline.from_pipe(source))
    for name in SHARED["sd3"]:
        assert getattr(pipe, name) is getattr(source, name), name
    out = pipe(prompt="a red circle", latents=latents, method="ode", solver="euler", batch_size=2, **kw)
    torch.testing.assert_close(out.images, ref, atol=1e-4, rtol=1e-4)  # test_flow_pipelines' tolerance


def test_from_pipe_of_flux_shares_its_modules_and_output(tmp_path):
    source = quiet(FluxPipeline(**flux_components(str(tmp_path))))
    latents, _ = source.prepare_latents(2, 1, 8, 8, torch.float32, "cpu", seed(1))  # packed (2, 16, 4)
    kw = dict(num_inference_steps=4, guidance_scale=3.0, height=8, width=8, output_type="latent",
              max_sequence_length=T5_LEN)  # fmt: skip
    ref = source(prompt=["a blue square"] * 2, latents=latents, **kw).images
    pipe = quiet(ComposePipeline.from_pipe(source))
    for name in SHARED["flux"]:
        assert getattr(pipe, name) is getattr(source, name), name
    out = pipe(prompt="a blue square", latents=latents, method="ode", batch_size=2, **kw)
    torch.testing.assert_close(out.images, ref, atol=1e-4, rtol=1e-4)

