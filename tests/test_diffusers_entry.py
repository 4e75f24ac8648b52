"""diffusers' ways in (issue 31): `ComposePipeline.from_pipe` from a loaded StableDiffusionPipeline,
StableDiffusionXLPipeline, StableDiffusion3Pipeline and FluxPipeline shares their modules (the same objects) and, with
one prompt, reproduces the source pipeline's output to the equivalence tolerances of tests/test_pipeline.py and
tests/test_flow_pipelines.py (the tiny offline components are theirs); saved and shipped folders load through
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` as the hub's custom pipelines do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


# ---------------------------------------------------------------------- DiffusionPipeline.from_pretrained
ROOT = Path(__file__).resolve().parents[1]
CARDS = ROOT / "model_cards"


def test_saved_folders_take_the_custom_pipeline_layout_and_load_without_running_it(tmp_path):
    """save_pretrained writes model_index.json's `_class_name` as the hub's [module, class] pair and the module;
    ComposePipeline.from_pretrained reads such a folder itself: a module that would fail is never run."""
    from test_pipeline import sd_pipe

    from pipelines.loading import CLASS_NAME, PIPELINE_MODULE

    folder = tmp_path / "sd"
    quiet(sd_pipe(str(tmp_path))).save_pretrained(folder)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == CLASS_NAME
    module = folder / f"{PIPELINE_MODULE}.py"
    assert "from pipelines.compose_pipeline import ComposePipeline" in module.read_text()
    module.write_text("raise RuntimeError('this module must not run')\n")
    pipe = quiet(ComposePipeline.from_pretrained(str(folder)))
    assert type(pipe) is ComposePipeline
    assert pipe(prompt="a cat", num_inference_steps=2, output_type="latent").images.shape == (1, 4, 8, 8)


DIFFUSERS_LOAD = """
import json, sys, torch
from diffusers import DiffusionPipeline
from pipelines import ComposePipeline
for folder in sys.argv[1:]:
    try:
        DiffusionPipeline.from_pretrained(folder)
        refused = ""
    except ValueError as err:
        refused = str(err)
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    ref = ComposePipeline.from_pretrained(folder)
    kw = dict(prompt=["a red shape", "a circle"], operator="and", num_inference_steps=3, output_type="pt")
    a, b = (p(generator=torch.Generator().manual_seed(0), **kw).images for p in (pipe, ref))
    print(json.dumps({"same_class": type(pipe) is ComposePipeline, "diff": float((a - b).abs().max()),
                      "refused": refused}))
"""
SHIPPED = [CARDS / name for name in ("shapes-text", "shapes-text-flow")]


@pytest.mark.skipif(not all((f / "model_index.json").is_file() for f in SHIPPED),
                    reason="shipped models missing (restore with `git checkout -- model_cards/`)")  # fmt: skip
def test_shipped_folders_load_through_diffusion_pipeline_as_hub_custom_pipelines(tmp_path):
    """`DiffusionPipeline.from_pretrained("model_cards/shapes-text", trust_remote_code=True)` gives ComposePipeline
    (the package's class itself, not a copy) and the same images as ComposePipeline.from_pretrained (the UNet and
    the flow transformer folders); without trust_remote_code diffusers refuses and says so. A fresh process, with
    diffusers' module cache in a temporary folder."""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", DIFFUSERS_LOAD, *map(str, SHIPPED)], env=env, capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    outs = [json.loads(line) for line in res.stdout.strip().splitlines()[-len(SHIPPED) :]]
    for out in outs:
        assert out["same_class"] and out["diff"] == 0.0
        assert "trust_remote_code=True" in out["refused"]
