"""ComposePipeline on tiny offline components (CPU, seconds per test)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import compose
from pipelines import ComposePipeline, ComposePipelineOutput
from pipelines.batching import Leaf, NetworkGroups

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LETTERS = "abcdefghijklmnopqrstuvwxyz"


# ---------------------------------------------------------------------- tiny components
def make_tokenizer(folder) -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer written to `folder` (vocab.json, merges.txt; model_max_length 77)."""
    os.makedirs(folder, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", *LETTERS, *(c + "</w>" for c in LETTERS)]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    with open(os.path.join(folder, "vocab.json"), "w") as fh:
        json.dump(vocab, fh)
    with open(os.path.join(folder, "merges.txt"), "w") as fh:
        fh.write("#version: 0.2\n")
    # transformers 5: the two files POSITIONALLY (keywords are ignored), and an explicit model_max_length.
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=77)


def text_config(hidden: int = 16, projection_dim: int = 8) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=2 + 2 * len(LETTERS),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def cond_unet(in_channels: int = 4, cross: int = 16, seed: int = 0, **kw) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross,
        attention_head_dim=4,
        norm_num_groups=4,
        **kw,
    )


def uncond_unet(seed: int = 0, sample_size: int = 8) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )


def tiny_vae(scaling_factor: float = 0.18215) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=scaling_factor,
    )


def text_encoder(seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(text_config()).eval()


def sd_scheduler(prediction_type: str = "epsilon", cls=DDPMScheduler, **kw):
    kw = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, **kw}
    return cls(num_train_timesteps=1000, prediction_type=prediction_type, **kw)


def sd_pipe(tmp, seed: int = 0, prediction_type: str = "epsilon", scaling_factor: float = 0.18215, **sched_kw):
    """A tiny SD-1.x-style latent text-to-image pipeline (16x16 images, 8x8 latents)."""
    return ComposePipeline(
        unet=cond_unet(seed=seed),
        scheduler=sd_scheduler(prediction_type, **sched_kw),
        vae=tiny_vae(scaling_factor),
        text_encoder=text_encoder(),
        tokenizer=make_tokenizer(os.path.join(tmp, "tok")),
    )


def pixel_text_pipe(tmp, seed: int = 0) -> ComposePipeline:
    """Like the shipped shapes-text model: pixel-space UNet2DConditionModel, no VAE."""
    return ComposePipeline(
        unet=cond_unet(in_channels=3, seed=seed),
        scheduler=DDPMScheduler(num_train_timesteps=1000),
        text_encoder=text_encoder(),
        tokenizer=make_tokenizer(os.path.join(tmp, "tok")),
    )


def uncond_pipe(seed: int = 0, sample_size: int = 8, **sched_kw) -> ComposePipeline:
    sched = DDPMScheduler(num_train_timesteps=1000, **sched_kw)
    return ComposePipeline(unet=uncond_unet(seed, sample_size), scheduler=sched)


def xl_pipe(tmp) -> ComposePipeline:
    """SDXL-style: two text encoders (the second with a projection), added time / text conditions."""
    torch.manual_seed(0)
    te2 = CLIPTextModelWithProjection(text_config(hidden=16, projection_dim=8)).eval()
    unet = cond_unet(
        cross=32,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 8,
    )
    return ComposePipeline(
        unet=unet,
        scheduler=sd_scheduler(cls=DDIMScheduler),
        vae=tiny_vae(0.13025),
        text_encoder=text_encoder(),
        tokenizer=make_tokenizer(os.path.join(tmp, "tok")),
        text_encoder_2=te2,
        tokenizer_2=make_tokenizer(os.path.join(tmp, "tok2")),
    )


def quiet(pipe: ComposePipeline) -> ComposePipeline:
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Checkpoint folders: two SD-style models sharing VAE / text encoder, a v_prediction one, pixel and uncond."""
    root = tmp_path_factory.mktemp("ckpts")
    tmp = str(root)
    out = {}
    specs = {
        "sd_a": lambda: sd_pipe(tmp, seed=0),
        "sd_b": lambda: sd_pipe(tmp, seed=1),
        "sd_v": lambda: sd_pipe(tmp, seed=2, prediction_type="v_prediction", cls=DDIMScheduler),
        "sd_other_vae": lambda: sd_pipe(tmp, seed=3, scaling_factor=0.13025),
        "pixel_text": lambda: pixel_text_pipe(tmp),
        "uncond_a": lambda: uncond_pipe(0),
        "uncond_b": lambda: uncond_pipe(1, beta_schedule="squaredcos_cap_v2"),
        "uncond_16": lambda: uncond_pipe(2, sample_size=16),
    }
    for name, build in specs.items():
        path = os.path.join(tmp, name)
        build().save_pretrained(path)
        out[name] = path
    return out


def load(paths) -> ComposePipeline:
    return quiet(ComposePipeline.from_pretrained(paths))


def seed(s: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(s)


class CallCounter:
    """Counts network forward calls (UNets, transformers) and their batch sizes."""

    def __init__(self, *unets) -> None:
        self.rows: list[int] = []
        for u in unets:
            u.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self.rows.append(int(sample.shape[0]))


# ---------------------------------------------------------------------- text to image, outputs
def test_text_to_image_outputs(folders):
    pipe = load(folders["sd_a"])
    kw = dict(prompt=["a cat", "a dog"], operator="and", guidance_scale=5.0, num_inference_steps=3)
    out = pipe(**kw, num_images_per_prompt=2, generator=seed())
    assert isinstance(out, ComposePipelineOutput)
    assert len(out.images) == 2 and out.images[0].size == (16, 16)
    assert out.kappa.shape == (3, 2, 2) and out.log_q.shape == (2, 2)
    assert torch.allclose(out.kappa.sum(-1), torch.ones(3, 2, dtype=torch.float64))
    assert out.timesteps.shape == (4,) and bool(torch.all(out.timesteps[1:] < out.timesteps[:-1]))
    arr = pipe(**kw, batch_size=2, generator=seed(), output_type="np").images
    assert arr.shape == (2, 16, 16, 3) and arr.min() >= 0 and arr.max() <= 1
    np.testing.assert_allclose(arr[0], np.asarray(out.images[0]) / 255.0, atol=1 / 255 + 1e-6)
    pt = pipe(**kw, generator=seed(), output_type="pt").images
    assert pt.shape == (1, 3, 16, 16)
    lat = pipe(**kw, generator=seed(), output_type="latent").images
    assert lat.shape == (1, 4, 8, 8)
    images, kappa, log_q = pipe(**kw, generator=seed(), output_type="pt", return_dict=False)
    assert torch.equal(images, pt) and kappa.shape == (3, 1, 2) and log_q.shape == (1, 2)


def test_loads_a_stable_diffusion_folder_layout(folders, tmp_path):
    """model_index.json of a StableDiffusionPipeline (safety checker, feature extractor): those are not loaded."""
    import shutil

    path = tmp_path / "sd_layout"
    shutil.copytree(folders["sd_a"], path)
    with open(path / "model_index.json") as fh:
        index = json.load(fh)
    index.update(
        _class_name="StableDiffusionPipeline",
        safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
        feature_extractor=["transformers", "CLIPImageProcessor"],
        image_encoder=[None, None],
        requires_safety_checker=False,
    )
    with open(path / "model_index.json", "w") as fh:
        json.dump(index, fh)
    pipe = load(str(path))
    out = pipe(prompt="a cat", num_inference_steps=2, generator=seed(), output_type="latent")
    assert out.images.shape == (1, 4, 8, 8)


def test_prompt_with_and_is_one_term(folders):
    pipe = load(folders["sd_a"])
    out = pipe(prompt="a cat and a dog", num_inference_steps=2, generator=seed(), output_type="latent")
    assert out.kappa.shape == (2, 1, 1) and out.log_q.shape == (1, 1)


# ---------------------------------------------------------------------- batching: UNet calls per step
def test_one_unet_call_per_step_with_cfg(folders):
    pipe = load(folders["sd_a"])
    calls = CallCounter(pipe.unet)
    pipe(
        prompt=["a", "b", "c"],
        operator="or",
        guidance_scale=3.0,
        num_inference_steps=3,
        batch_size=2,
        generator=seed(),
        output_type="latent",
    )
    assert calls.rows == [4 * 2] * 3  # 3 steps = 3 calls (the last lands on the data), 3 prompts + uncond in each
    calls.rows.clear()
    pipe(
        prompt=["a", "b"],
        operator="or",
        guidance_scale=1.0,
        num_inference_steps=2,
        generator=seed(),
        output_type="latent",
    )
    assert calls.rows == [2] * 2  # guidance_scale=1: no unconditional branch


def test_hutchinson_fd_probes_ride_in_the_main_call(folders):
    pipe = load(folders["sd_a"])
    calls = CallCounter(pipe.unet)
    pipe(
        prompt=["a", "b"],
        operator="and",
        guidance_scale=3.0,
        method="ode",
        divergence="hutchinson_fd",
        probes=2,
        num_inference_steps=2,
        batch_size=2,
        generator=seed(),
        output_type="latent",
    )
    # per step (the step to the data too: its density increment needs the divergence): 2 terms x 2 images x
    # (1 + 2 probes) + 2 unconditional rows
    assert calls.rows == [2 * 2 * 3 + 2] * 2


def test_several_checkpoints_one_call_each_and_shared_components(folders):
    pipe = load([folders["sd_a"], folders["sd_b"]])
    a, b = pipe.models
    assert a.unet is not b.unet
    assert a.vae is b.vae and a.text_encoder is b.text_encoder and a.tokenizer is b.tokenizer
    assert a.scheduler is b.scheduler
    calls_a, calls_b = CallCounter(a.unet), CallCounter(b.unet)
    out = pipe(
        prompt=["a cat", "a dog"],
        operator="and",
        guidance_scale=2.0,
        num_inference_steps=2,
        generator=seed(),
        output_type="latent",
    )
    assert calls_a.rows == [2] * 2 and calls_b.rows == [2] * 2  # term + its checkpoint's uncond row
    assert out.log_q.shape == (1, 2)
    same = load([folders["sd_a"], folders["sd_a"]])
    assert same.models[0].unet is same.models[1].unet
    calls = CallCounter(same.unet)
    same(
        prompt="a cat",
        operator="or",
        guidance_scale=1.0,
        num_inference_steps=2,
        generator=seed(),
        output_type="latent",
    )
    assert calls.rows == [2] * 2  # identical checkpoints share one UNet and one call


# ---------------------------------------------------------------------- determinism, generators, latents
def test_determinism_and_generators(folders):
    pipe = load(folders["sd_a"])
    kw = dict(prompt=["a cat", "a dog"], operator="or", guidance_scale=3.0, num_inference_steps=3, output_type="pt")
    a = pipe(**kw, generator=seed(0)).images
    b = pipe(**kw, generator=seed(0)).images
    c = pipe(**kw, generator=seed(1)).images
    assert torch.equal(a, b) and not torch.allclose(a, c)
    both = pipe(**kw, batch_size=2, generator=[seed(0), seed(1)]).images  # one generator per image
    torch.testing.assert_close(both[0], a[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1], c[0], atol=1e-5, rtol=0)
    g = seed(0)
    latents = torch.randn((1, 4, 8, 8), generator=g)
    d = pipe(**kw, latents=latents, generator=g).images  # the generator continues as inside the pipeline
    torch.testing.assert_close(d, a, atol=1e-6, rtol=0)


def test_save_load_round_trip(folders, tmp_path):
    pipe = load(folders["sd_a"])
    kw = dict(prompt=["a cat", "a dog"], operator="and", guidance_scale=3.0, num_inference_steps=2, output_type="pt")
    ref = pipe(**kw, generator=seed()).images
    pipe.save_pretrained(tmp_path / "one")
    again = load(str(tmp_path / "one"))
    assert torch.equal(again(**kw, generator=seed()).images, ref)
    multi = load([folders["uncond_a"], folders["uncond_b"]])
    kw = dict(operator="or", num_inference_steps=2, output_type="pt", batch_size=2)
    ref = multi(**kw, generator=seed()).images
    multi.save_pretrained(tmp_path / "multi")
    assert os.path.isfile(tmp_path / "multi" / "compose_models.json")
    again = load(str(tmp_path / "multi"))
    assert len(again.models) == 2
    assert torch.equal(again(**kw, generator=seed()).images, ref)


# ---------------------------------------------------------------------- checkpoint kinds
def test_unconditional_checkpoints(folders):
    pipe = load([folders["uncond_a"], folders["uncond_b"]])
    assert pipe.models[0].scheduler is not pipe.models[1].scheduler  # linear vs cosine betas: not shared
    calls = CallCounter(pipe.models[0].unet, pipe.models[1].unet)
    out = pipe(operator="or", batch_size=3, num_inference_steps=2, generator=seed(), output_type="np")
    assert out.images.shape == (3, 8, 8, 3) and out.kappa.shape == (2, 3, 2)
    assert calls.rows == [3] * 4  # 2 checkpoints x 2 steps
    single = load(folders["uncond_a"])
    out = single(batch_size=2, num_inference_steps=2, generator=seed(), output_type="pil")
    assert len(out.images) == 2 and out.images[0].size == (8, 8)


def test_pixel_space_text_checkpoint_with_negative_prompt(folders):
    pipe = load(folders["pixel_text"])
    assert pipe.vae is None
    kw = dict(
        prompt=["red", "blue"],
        operator="product",
        weights=[1.0, -0.5],
        guidance_scale=4.0,
        num_inference_steps=2,
        output_type="np",
    )
    a = pipe(**kw, generator=seed()).images
    b = pipe(**kw, negative_prompt="green", generator=seed()).images
    assert a.shape == (1, 8, 8, 3) and not np.allclose(a, b)


def test_epsilon_and_v_prediction_in_one_or(folders):
    pipe = load([folders["sd_a"], folders["sd_v"]])
    assert [m.prediction_type for m in pipe.models] == ["epsilon", "v_prediction"]
    out = pipe(
        prompt="a cat",
        operator="or",
        guidance_scale=2.0,
        num_inference_steps=2,
        generator=seed(),
        output_type="latent",
    )
    assert torch.isfinite(out.images).all() and out.log_q.shape == (1, 2)


def test_prediction_type_and_schedule_conversion():
    """A v_prediction / other-schedule twin of a checkpoint gives the same eps as the checkpoint itself."""
    unet = uncond_unet(0)
    base = ComposeModel_for(unet, DDPMScheduler(num_train_timesteps=1000))
    sch = base.schedule
    x = torch.randn(2, 3, 8, 8, generator=seed())
    t = 0.6

    class VTwin(torch.nn.Module):
        """Outputs v = alpha eps - sigma x0 on a cosine schedule, from the base UNet's eps at equal log-SNR."""

        def __init__(self, base_unet, own):
            super().__init__()
            self.inner, self.own, self.config, self.dtype = base_unet, own, base_unet.config, torch.float32

        def forward(self, x_m, timestep, return_dict=False):
            t_m = (timestep.double() + 1.0) / 1000  # cosine table: discrete, t = (index + 1) / N
            t_b = sch.t_from_log_snr(self.own.log_snr(t_m))
            x_b = x_m * (sch.alpha(t_b) / self.own.alpha(t_m)).float()[:, None, None, None]
            eps = self.inner(x_b, sch.timestep(t_b).float(), return_dict=False)[0]
            return (compose.from_eps(eps, x_m, t_m, self.own, "v_prediction"),)

    cos = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    twin = ComposeModel_for(VTwin(unet, compose.NoiseSchedule.from_scheduler(cos)), cos)
    pipe = ComposePipeline.from_models([base, twin])
    leaves = [pipeline_leaf(sch, m) for m in pipe.models]
    eps, _ = NetworkGroups(leaves, leaves, [], {}, None).predict(x, t, sch)
    torch.testing.assert_close(eps[1], eps[0], atol=2e-3, rtol=1e-3)


def ComposeModel_for(unet, scheduler):  # noqa: N802 - reads like the class it builds
    from pipelines import ComposeModel

    return ComposeModel(name=f"m{id(unet)}", unet=unet, scheduler=scheduler)


def pipeline_leaf(schedule, model):
    return Leaf(schedule, model.name, model, None)


def test_sdxl_style_components(folders, tmp_path):
    pipe = quiet(xl_pipe(str(tmp_path)))
    seen = {}

    def hook(module, args, kwargs):
        seen["ehs"] = kwargs["encoder_hidden_states"].shape
        seen["added"] = {k: v.shape for k, v in kwargs["added_cond_kwargs"].items()}

    pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    out = pipe(
        prompt=["a cat", "a dog"],
        operator="and",
        guidance_scale=3.0,
        num_inference_steps=2,
        generator=seed(),
        output_type="np",
    )
    assert out.images.shape == (1, 16, 16, 3) and out.kappa.shape == (2, 1, 2)
    assert seen["ehs"] == (3, 77, 32)  # both encoders' penultimate states concatenated
    assert seen["added"] == {"text_embeds": (3, 8), "time_ids": (3, 6)}
    pipe.save_pretrained(tmp_path / "xl")
    again = load(str(tmp_path / "xl"))
    assert again.text_encoder_2 is not None and again.tokenizer_2 is not None


# ---------------------------------------------------------------------- operators
def test_operators_and_weights(folders):
    pipe = load(folders["sd_a"])
    kw = dict(prompt=["a cat", "a dog"], guidance_scale=3.0, num_inference_steps=2, output_type="pt")
    avg = pipe(**kw, operator="average", generator=seed())
    prod = pipe(**kw, operator="product", weights=[0.5, 0.5], generator=seed())
    torch.testing.assert_close(avg.images, prod.images, atol=1e-6, rtol=0)  # same coefficients, same sample
    assert torch.allclose(avg.kappa, torch.full_like(avg.kappa, 0.5))
    neg = pipe(**kw, operator="product", weights=[1.0, -1.0], generator=seed())
    assert torch.allclose(neg.kappa[0, 0], torch.tensor([1.0, -1.0], dtype=torch.float64))
    orw = pipe(**kw, operator="or", weights=[3.0, 1.0], generator=seed())
    # the prior log q is the same for both terms at the start: kappa = the normalised weights
    torch.testing.assert_close(orw.kappa[0, 0], torch.tensor([0.75, 0.25], dtype=torch.float64))
    for op in ("or", "and", "average", "product", "OR"):
        out = pipe(**kw, operator=op, generator=seed())
        assert out.kappa.shape == (2, 1, 2) and torch.isfinite(out.images).all()


def test_nested_expression(folders):
    pipe = load(folders["sd_a"])
    out = pipe(
        prompt=["a", "b", "c"],
        operator=lambda a, b, c: compose.OR(compose.AND(a, b), c),
        guidance_scale=2.0,
        num_inference_steps=2,
        generator=seed(),
        output_type="latent",
    )
    assert out.kappa.shape == (2, 1, 2) and out.log_q.shape == (1, 3)
    assert set(out.node_kappa) >= {"root.0", "root.0.0"}


# ---------------------------------------------------------------------- ODE divergences, time grids, callbacks
def test_ode_jvp_and_finite_difference_agree(folders):
    pipe = load(folders["sd_a"])
    kw = dict(
        prompt=["a cat", "a dog"],
        operator="or",
        guidance_scale=2.0,
        method="ode",
        num_inference_steps=2,
        output_type="pt",
    )
    jvp = pipe(**kw, divergence="hutchinson", generator=seed())
    fd = pipe(**kw, divergence="hutchinson_fd", generator=seed())
    torch.testing.assert_close(jvp.images, fd.images, atol=1e-4, rtol=0)  # same path; only log q uses div
    assert torch.allclose(jvp.log_q, fd.log_q, atol=0.5, rtol=0)


def test_time_grids(folders):
    pipe = load(folders["uncond_a"])
    sch = pipe.models[0].schedule
    kw = dict(generator=seed(), output_type="latent")
    out = pipe(num_inference_steps=4, **kw)
    assert out.kappa.shape[0] == 4 and out.timesteps.shape == (5,)
    out = pipe(timesteps=[999, 600, 200], **kw)  # three evaluations, then the step to the data (as DDIM)
    torch.testing.assert_close(out.timesteps, torch.tensor([1.0, 0.601, 0.201, 0.0], dtype=torch.float64))
    t = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    sigmas = (sch.sigma(t) / sch.alpha(t)).tolist() + [0.0]
    out = pipe(sigmas=sigmas, **kw)
    torch.testing.assert_close(out.timesteps[:3], t, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.timesteps, torch.cat([t, torch.zeros(1, dtype=torch.float64)]), atol=1e-6, rtol=0)
    uniform = pipe(num_inference_steps=3, grid="uniform", **kw)
    zero = torch.zeros(1, dtype=torch.float64)
    want = torch.cat([torch.linspace(sch.t_max, sch.t_min, 3, dtype=torch.float64), zero])
    torch.testing.assert_close(uniform.timesteps, want)


def test_callback_and_progress_bar(folders, capsys):
    pipe = load(folders["uncond_a"])
    seen = []

    def cb(p, i, timestep, tensors):
        seen.append((i, sorted(tensors)))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 2 else {}

    out = pipe(
        num_inference_steps=3,
        generator=seed(),
        output_type="latent",
        callback_on_step_end=cb,
        callback_on_step_end_tensor_inputs=["latents", "log_q"],
    )
    assert seen == [(0, ["latents", "log_q"]), (1, ["latents", "log_q"]), (2, ["latents", "log_q"])]
    plain = pipe(num_inference_steps=3, generator=seed(), output_type="latent")
    assert not torch.allclose(out.images, plain.images)
    pipe.set_progress_bar_config(disable=False)
    pipe(num_inference_steps=3, generator=seed(), output_type="latent")
    assert "3/3" in capsys.readouterr().err


def test_to_dtype_moves_every_checkpoint(folders):
    pipe = load([folders["uncond_a"], folders["uncond_b"]])
    ref = pipe(operator="average", num_inference_steps=2, generator=seed(), output_type="pt").images
    pipe.to(torch.float64)
    assert all(m.unet.dtype == torch.float64 for m in pipe.models)
    out = pipe(operator="average", num_inference_steps=2, generator=seed(), output_type="pt").images
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="model CPU offload needs an accelerator")
def test_model_cpu_offload(folders):  # pragma: no cover - runs on GPU machines only
    pipe = load([folders["sd_a"], folders["sd_b"]])
    pipe.enable_model_cpu_offload()
    out = pipe(prompt=["a", "b"], operator="and", num_inference_steps=2, generator=seed(), output_type="latent")
    assert torch.isfinite(out.images).all()


# ---------------------------------------------------------------------- bad inputs: ValueError naming the argument
def test_mismatched_latent_spaces_are_refused_at_load(folders):
    with pytest.raises(ValueError, match="pretrained_model_name_or_path.*scaling_factor"):
        ComposePipeline.from_pretrained([folders["sd_a"], folders["sd_other_vae"]])
    with pytest.raises(ValueError, match="pretrained_model_name_or_path.*space"):
        ComposePipeline.from_pretrained([folders["sd_a"], folders["pixel_text"]])
    with pytest.raises(ValueError, match="pretrained_model_name_or_path.*sample_size"):
        ComposePipeline.from_pretrained([folders["uncond_a"], folders["uncond_16"]])
    with pytest.raises(ValueError, match="pretrained_model_name_or_path"):
        ComposePipeline.from_pretrained([])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(prompt=["a", "b"], operator="xor"), "operator"),
        (dict(prompt="a", operator="and"), "operator"),
        (dict(prompt="a", operator="or"), "operator"),
        (dict(prompt=["a", "b"]), "operator"),
        (dict(prompt=["a", "b"], operator="or", weights=[1.0]), "weights"),
        (dict(prompt=["a", "b"], operator="product", weights=[1.0, 2.0, 3.0]), "weights"),
        (dict(prompt=["a", "b"], operator="and", weights=[1.0, 2.0]), "weights"),
        (dict(prompt=["a", "b"], operator="and", method="heun"), "method"),
        (dict(prompt=["a", "b"], operator="and", method="ode", divergence="exact2"), "divergence"),
        (dict(prompt=["a", "b"], operator="and", probes=0), "probes"),
        (dict(prompt="a", output_type="jpeg"), "output_type"),
        (dict(prompt="a", height=15), "height"),
        (dict(prompt="a", num_inference_steps=0), "num_inference_steps"),
        (dict(prompt="a", timesteps=[100, 500]), "timesteps"),
        (dict(prompt="a", timesteps=[900, 500], sigmas=[1.0, 0.5]), "sigmas"),
        (dict(prompt="a", sigmas=[1.0, -0.5]), "sigmas"),
        (dict(prompt="a", latents=torch.zeros(1, 4, 4, 4)), "latents"),
        (dict(prompt="a", batch_size=2, generator=[torch.Generator()]), "generator"),
        (dict(prompt="a", batch_size=2, num_images_per_prompt=3), "batch_size"),
        (dict(prompt="a", negative_prompt=["x", "y"]), "negative_prompt"),
        (dict(prompt=3), "prompt"),
        (dict(prompt="a", callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs"),
        (dict(prompt="a", guidance_scale=float("nan")), "guidance_scale"),
    ],
)
def test_bad_inputs_name_the_argument(folders, kwargs, name):
    pipe = load(folders["sd_a"])
    with pytest.raises(ValueError, match=name):
        pipe(
            num_inference_steps=kwargs.pop("num_inference_steps", 2),
            output_type=kwargs.pop("output_type", "latent"),
            **kwargs,
        )


def test_bad_inputs_of_several_checkpoints(folders):
    pipe = load([folders["uncond_a"], folders["uncond_b"]])
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(operator="or", guidance_scale=7.5, num_inference_steps=2)
    with pytest.raises(ValueError, match="prompt"):
        pipe(prompt="a cat", operator="or", num_inference_steps=2)
    with pytest.raises(ValueError, match="prompt"):
        pipe(prompt=["a", "b", "c"], operator="or", num_inference_steps=2)
    with pytest.raises(ValueError, match="operator"):
        pipe(operator=lambda a, b: "not an expression", num_inference_steps=2)


def test_matches_the_reference_loop_of_compose(folders):
    """Batched pipeline == `compose.sample` calling the models one by one (other schedule via compose.on_schedule)."""
    pipe = load([folders["uncond_a"], folders["uncond_b"]])  # linear and cosine DDPM tables

    class UNetModel:
        def __init__(self, m):
            self.unet, self.schedule, self.name = m.unet, m.schedule, m.name

        def eps(self, x, t):
            t = torch.as_tensor(t, dtype=torch.float64)
            ts = self.schedule.timestep(t).float().reshape(-1).expand(x.shape[0])
            return self.unet(x, ts, return_dict=False)[0]

    a, b = (UNetModel(m) for m in pipe.models)
    expr = compose.OR(a, compose.on_schedule(b, a.schedule))
    latents = torch.randn(2, 3, 8, 8, generator=seed(5))
    ts = compose.make_grid(a.schedule, 3)
    clip = compose.X0Clip.from_config(pipe.scheduler.config)  # the DDPM config's clip_sample, as the pipeline reads it
    assert clip is not None and clip.clip_sample_range == 1.0
    with torch.no_grad():
        ref = compose.sample(
            expr,
            x_T=latents * float(a.schedule.sigma(ts[0])),
            timesteps=ts,
            method="ode",
            divergence="hutchinson_fd",
            generator=seed(1),
            clip=clip,
        )
    out = pipe(
        operator="or",
        latents=latents,
        num_inference_steps=3,
        method="ode",
        divergence="hutchinson_fd",
        generator=seed(1),
        output_type="latent",
    )
    # Batched and one-by-one convolutions round differently (~1e-7); the finite-difference divergence divides that by
    # e = 1e-3 sigma_t, so log q (thousands of nats) agrees to ~0.1 nats and kappa / the samples to ~1e-3.
    torch.testing.assert_close(out.log_q, ref.log_q, atol=0.2, rtol=0)
    torch.testing.assert_close(out.kappa, ref.kappa, atol=2e-3, rtol=0)
    torch.testing.assert_close(out.images, ref.samples, atol=1e-2, rtol=1e-3)
    assert (out.images - ref.samples).abs().mean() < 1e-5 * ref.samples.abs().mean() * 100


def test_scheduler_is_read_never_stepped(folders, monkeypatch):
    pipe = load([folders["sd_a"], folders["sd_b"]])

    def forbidden(*args, **kwargs):
        raise AssertionError("scheduler.step / set_timesteps must not be called")

    monkeypatch.setattr(type(pipe.scheduler), "step", forbidden)
    monkeypatch.setattr(type(pipe.scheduler), "set_timesteps", forbidden)
    out = pipe(prompt="a cat", operator="and", num_inference_steps=2, generator=seed(), output_type="latent")
    assert torch.isfinite(out.images).all()


SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_cards")


@pytest.mark.skipif(
    not all(os.path.isdir(os.path.join(SHIPPED, n, "unet")) for n in ("shapes-text", "shapes-uncond-a")),
    reason="the shipped shapes models are not in this checkout",
)
def test_shipped_shapes_models():
    """The shipped pixel-space 24x24 DDPM checkpoints: text-conditional with CFG, OR an unconditional one."""
    pipe = load([os.path.join(SHIPPED, "shapes-text"), os.path.join(SHIPPED, "shapes-uncond-a")])
    assert pipe.vae is None and pipe.models[1].text_encoder is None
    out = pipe(
        prompt=["red circle", None],
        operator="or",
        guidance_scale=3.0,
        num_inference_steps=2,
        generator=seed(),
        output_type="np",
    )
    assert out.images.shape == (1, 24, 24, 3) and out.kappa.shape == (2, 1, 2)
