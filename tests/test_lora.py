"""LoRA experts (pipelines/lora.py): several LoRAs of one base composed in one batched call per step.

Tiny offline components (tests/test_pipeline.py's): a SD-1.x-style UNet with two random LoRAs ("alpha", "beta"),
saved in diffusers' LoRA format and loaded through `ComposePipeline.load_lora_experts`.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from test_pipeline import CallCounter, quiet, sd_pipe, seed, uncond_pipe

import compose
from pipelines import ComposePipeline
from pipelines import jobs as J

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
NAMES = ("alpha", "beta", "gamma")


def write_lora(folder: str, tmp: str, name: str, seed_: int, text_encoder: bool = False) -> str:
    """A random LoRA (rank 2, lora_B drawn so it is not a no-op) of the tiny UNet, in diffusers' format."""
    pipe = sd_pipe(tmp, seed=0)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS), adapter_name=name)
    g = torch.Generator().manual_seed(seed_)
    with torch.no_grad():
        for key, p in pipe.unet.named_parameters():
            if "lora_B" in key:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    te = None
    if text_encoder:  # a text-encoder part, as trainers write with --train_text_encoder
        q = "text_model.encoder.layers.0.self_attn.q_proj"
        te = {f"{q}.lora_A.weight": torch.zeros(2, 16), f"{q}.lora_B.weight": torch.zeros(16, 2)}
    layers = get_peft_model_state_dict(pipe.unet, adapter_name=name)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, text_encoder_lora_layers=te)
    return folder


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    tmp = str(root)
    out = {name: write_lora(str(root / name), tmp, name, k + 1) for k, name in enumerate(NAMES)}
    out["tmp"] = tmp
    out["with_text"] = write_lora(str(root / "with_text"), tmp, "delta", 9, text_encoder=True)
    return out


def lora_pipe(loras, names=("alpha", "beta")) -> ComposePipeline:
    pipe = quiet(sd_pipe(loras["tmp"], seed=0))
    pipe.load_lora_experts({n: loras[n] for n in names})
    return pipe


class Capture:
    """Records every UNet call: its inputs (sample, timestep, encoder states) and output."""

    def __init__(self, unet) -> None:
        self.calls: list[tuple] = []
        self.handle = unet.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        x = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        ehs = kwargs.get("encoder_hidden_states")
        self.calls.append((x.clone(), torch.as_tensor(t).clone(), ehs.clone(), output[0].clone()))

    def remove(self) -> None:
        self.handle.remove()


def reference(unet, spec, x, t, ehs, weights=None) -> torch.Tensor:
    """The UNet alone with only `spec` active through diffusers' own API (set_adapters / disable_adapters)."""
    if spec is None:
        unet.disable_adapters()
    else:
        unet.enable_adapters()
        names = list(spec) if isinstance(spec, (list, tuple)) else [spec]
        unet.set_adapters(names, weights)
    try:
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=ehs, return_dict=False)[0]
    finally:
        unet.disable_adapters()
        unet.set_adapters(list(unet.peft_config), [1.0] * len(unet.peft_config))
        unet.disable_adapters()


def check_chunks(unet, call, specs, n, atol=1e-5) -> float:
    """Every n-row chunk c of one captured call equals the UNet with only specs[c] active; returns the largest
    difference between chunks of different specs (to show the LoRAs do differ)."""
    x, t, ehs, out = call
    assert x.shape[0] == len(specs) * n
    t = t.expand(x.shape[0]) if t.ndim == 0 else t
    spread = 0.0
    for c, spec in enumerate(specs):
        rows = slice(c * n, (c + 1) * n)
        want = reference(unet, spec, x[rows], t[rows], ehs[rows])
        torch.testing.assert_close(out[rows], want, atol=atol, rtol=0)
        other = next((s for s in specs if s != spec), None)
        if other is not None or spec is not None:
            spread = max(spread, float((reference(unet, other, x[rows], t[rows], ehs[rows]) - want).abs().max()))
    return spread


KW = dict(guidance_scale=3.0, num_inference_steps=3, batch_size=2, output_type="latent")


# ---------------------------------------------------------------------- loading
def test_load_names_idempotent_and_unload(loras):
    pipe = lora_pipe(loras)
    assert set(pipe.lora_experts) == {"alpha", "beta"}
    assert pipe.lora_experts["alpha"].endswith("pytorch_lora_weights.safetensors")
    assert pipe.load_lora_experts({"alpha": loras["alpha"]}) == ["alpha"]  # same source: kept, not reloaded
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_lora_experts({"alpha": loras["beta"]})
    # a .safetensors file path works as well as its folder
    pipe.load_lora_experts({"gamma": os.path.join(loras["gamma"], "pytorch_lora_weights.safetensors")})
    assert set(pipe.unet.peft_config) == {"alpha", "beta", "gamma"}
    assert all(m.disable_adapters for m in _layers(pipe.unet))  # outside a call the network is the base
    pipe.unload_lora_experts(["gamma"])
    assert set(pipe.lora_experts) == set(pipe.unet.peft_config) == {"alpha", "beta"}
    pipe.unload_lora_experts()
    assert pipe.lora_experts == {}


def test_save_pretrained_writes_the_base_without_the_loras(loras, tmp_path):
    """save_pretrained with LoRA experts loaded writes the base network (PEFT wrappers would break the folder); the
    experts are loaded again afterwards, and unloading all of them restores the plain layers."""
    pipe = lora_pipe(loras)
    plain = quiet(sd_pipe(loras["tmp"], seed=0)).unet.state_dict()
    pipe.save_pretrained(tmp_path / "saved")
    assert set(pipe.lora_experts) == {"alpha", "beta"}
    back = ComposePipeline.from_pretrained(str(tmp_path / "saved")).unet.state_dict()
    assert back.keys() == plain.keys() and all(torch.equal(back[k], plain[k]) for k in plain)
    pipe.unload_lora_experts()
    assert pipe.unet.state_dict().keys() == plain.keys()


def _layers(unet):
    from pipelines.lora import lora_layers

    return lora_layers(unet)


# ---------------------------------------------------------------------- one call, each row its own LoRA
@pytest.mark.parametrize(
    "slices,fused", [(True, True), (True, False), (False, False)], ids=["fused", "slice-loop", "peft-mixed-batch"]
)
def test_each_term_equals_the_base_with_only_its_lora(loras, slices, fused, monkeypatch):
    """lora=["alpha", "beta", None] under CFG: ONE UNet call per step; chunk by chunk (3 terms, then each LoRA's own
    unconditional row) every row equals the UNet with only that LoRA active (diffusers set_adapters) to 1e-5. Every
    routing: the updates of all adapters in two stacked products per layer with a per-row mask (linear and conv
    layers), added on each adapter's row slice one adapter at a time, and PEFT's mixed adapter batch."""
    import pipelines.lora

    calls = {(True, True): "batched", (True, False): "batched_loop", (False, False): "batched_peft"}[(slices, fused)]
    n_fused = [0]
    real = pipelines.lora._fused_update

    def counted(*a, **k):
        hook = real(*a, **k)
        n_fused[0] += hook is not None
        return hook

    monkeypatch.setattr(pipelines.lora, "_fused_update", counted)
    pipe = lora_pipe(loras)
    cap = Capture(pipe.unet)
    pipe(prompt=["a cat", "a dog", "a cow"], lora=["alpha", "beta", None], operator="and", generator=seed(),
         lora_calls=calls, **KW)  # fmt: skip
    cap.remove()
    assert len(cap.calls) == 3  # 3 steps, one call each
    specs = ["alpha", "beta", None, "alpha", "beta", None]
    spreads = [check_chunks(pipe.unet, call, specs, n=2) for call in cap.calls]
    assert min(spreads) > 1e-3  # the LoRAs change the prediction (the test would pass vacuously otherwise)
    # state restored: outside a call the network is the base
    assert all(m.disable_adapters for m in _layers(pipe.unet))
    # the fused path covered every LoRA layer (linear and conv) when on, and nothing otherwise
    layers = _layers(pipe.unet)
    assert {type(m).__name__ for m in layers} == {"Linear", "Conv2d"}
    assert n_fused[0] == (len(layers) if fused else 0)


def _state(unet) -> list:
    return [(m.disable_adapters, list(m.active_adapters), dict(m.scaling)) for m in _layers(unet)]


@pytest.mark.parametrize("calls", ["batched", "separate"])
def test_adapter_state_is_set_once_per_run_and_restored(loras, calls, monkeypatch):
    """Inside a pipeline call the LoRA layers' state (adapters, scales, routing hooks) is set when the call asks for
    a new one, not at every step: once for the batched call (the same rows every step), once per call for
    lora_calls="separate" (the state alternates). Afterwards, and after an error mid-run, every layer is as before;
    the images equal those of a run that sets the state at every call (no session)."""
    import pipelines.lora as PL

    pipe = lora_pipe(loras)
    setups = []
    real = PL.adapter_call

    def counting(net, specs, n, *args, **kwargs):
        setups.append(list(specs))
        return real(net, specs, n, *args, **kwargs)

    monkeypatch.setattr(PL, "adapter_call", counting)
    before = _state(pipe.unet)
    kw = dict(prompt=["a cat", "a dog"], lora=["alpha", "beta"], operator="and", lora_calls=calls, **KW)
    held = pipe(generator=seed(), **kw).images
    assert len(setups) == (1 if calls == "batched" else 2 * KW["num_inference_steps"])
    assert _state(pipe.unet) == before
    monkeypatch.setattr(PL.Routing, "session", lambda self: contextlib.nullcontext())
    setups.clear()
    per_call = pipe(generator=seed(), **kw).images
    assert len(setups) == KW["num_inference_steps"] * (1 if calls == "batched" else 2)
    torch.testing.assert_close(held, per_call, atol=0, rtol=0)
    monkeypatch.undo()

    def boom(pipe_, step, t, tensors):
        if step == 1:
            raise RuntimeError("stop here")
        return {}

    with pytest.raises(RuntimeError, match="stop here"):
        pipe(generator=seed(), callback_on_step_end=boom, **kw)
    assert _state(pipe.unet) == before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in _layers(pipe.unet))


def test_one_prompt_several_loras_and_base_unconditional(loras):
    """One prompt with a list of LoRAs gives one term per LoRA; lora_uncond="base" makes ONE unconditional row of the
    base network (3 chunks per call instead of 4)."""
    pipe = lora_pipe(loras)
    cap = Capture(pipe.unet)
    out = pipe(prompt="a cat", lora=["alpha", "beta"], operator="or", lora_uncond="base", generator=seed(), **KW)
    cap.remove()
    assert out.kappa.shape == (3, 2, 2) and len(cap.calls) == 3
    for call in cap.calls:
        check_chunks(pipe.unet, call, ["alpha", "beta", None], n=2)
    # a call without lora= on a pipeline with experts runs the base network, in one call
    cap = Capture(pipe.unet)
    pipe(prompt=["a cat", "a dog"], operator="and", generator=seed(), **KW)
    cap.remove()
    for call in cap.calls:
        check_chunks(pipe.unet, call, [None, None, None], n=2)


def test_a_single_lora_term_is_diffusers_with_that_lora(loras):
    """One term with LoRA alpha: the same images as the pipeline over a UNet that has alpha set active by diffusers
    and no experts registered (the pipeline leaves a network it does not manage as it is)."""
    pipe = lora_pipe(loras)
    ours = pipe(prompt="a cat", lora="alpha", generator=seed(), **KW).images
    plain = quiet(sd_pipe(loras["tmp"], seed=0))
    plain.unet.load_lora_adapter(loras["alpha"], prefix="unet", adapter_name="alpha", use_safetensors=True)
    plain.unet.set_adapters(["alpha"])
    theirs = plain(prompt="a cat", generator=seed(), **KW).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "operator,method",
    [
        ("or", "sde"),
        ("and", "sde"),
        ("average", "sde"),
        ("product", "sde"),
        ("product_smc", "sde"),
        ("nested", "sde"),
        ("or", "ode"),
        ("and", "ode"),
        ("product", "ode"),
        ("nested", "ode"),
    ],
)
def test_every_operator_over_lora_terms(loras, operator, method):
    """Every operator over three LoRA terms (two LoRAs and the base), SDE and ODE: finite, one call per step whose
    rows are the terms, the finite-difference probes (ODE) and the three unconditional rows."""
    pipe = lora_pipe(loras)
    calls = CallCounter(pipe.unet)
    op = (lambda a, b, c: compose.OR(compose.AND(a, b), c)) if operator == "nested" else operator
    kw = dict(num_particles=2) if operator == "product_smc" else {}
    out = pipe(prompt=["a cat", "a dog", "a cow"], lora=["alpha", "beta", None], operator=op, method=method,
               generator=seed(), **KW, **kw)  # fmt: skip
    assert bool(torch.isfinite(out.images).all()) and bool(torch.isfinite(out.log_q).all())
    P = 2 if operator == "product_smc" else 1
    per_term = 2 if method == "ode" else 1  # + one probe row per term (hutchinson_fd, probes=1)
    assert calls.rows == [(3 * per_term + 3) * 2 * P] * 3


def test_jvp_divergence_through_the_routing(loras):
    """divergence="hutchinson" (forward-mode JVP) through the routing hooks: finite, and close to the
    finite-difference estimate on the same probes."""
    pipe = lora_pipe(loras)
    kw = dict(prompt=["a cat", "a dog"], lora=["alpha", "beta"], operator="and", method="ode", **KW)
    a = pipe(divergence="hutchinson", generator=seed(), **kw)
    b = pipe(divergence="hutchinson_fd", generator=seed(), **kw)
    assert bool(torch.isfinite(a.log_q).all())
    torch.testing.assert_close(a.log_q, b.log_q, atol=0.05 * float(b.log_q.abs().max()) + 0.05, rtol=0)


def test_separate_calls_equal_the_batched_call(loras):
    pipe = lora_pipe(loras)
    calls = CallCounter(pipe.unet)
    kw = dict(prompt=["a cat", "a dog"], lora=["alpha", "beta"], operator="and", **KW)
    one = pipe(generator=seed(), **kw)
    assert calls.rows == [8] * 3
    calls.rows.clear()
    sep = pipe(generator=seed(), lora_calls="separate", **kw)
    assert calls.rows == [4, 4] * 3  # one call per LoRA (its term and its unconditional row)
    torch.testing.assert_close(one.images, sep.images, atol=1e-5, rtol=0)
    torch.testing.assert_close(one.log_q, sep.log_q, atol=1e-4, rtol=1e-5)


def test_lora_scale(loras):
    """lora_scale=0: the base network; lora_scale=0.5 equals diffusers' set_adapters with weight 0.5."""
    pipe = lora_pipe(loras)
    kw = dict(prompt=["a cat", "a dog"], operator="and", **KW)
    base = pipe(generator=seed(), **kw).images
    zero = pipe(lora=["alpha", "beta"], lora_scale=0.0, generator=seed(), **kw).images
    torch.testing.assert_close(base, zero, atol=1e-6, rtol=0)
    cap = Capture(pipe.unet)
    pipe(prompt="a cat", lora="alpha", lora_scale=0.5, generator=seed(), **KW)
    cap.remove()
    x, t, ehs, out = cap.calls[0]
    torch.testing.assert_close(out, reference(pipe.unet, "alpha", x, t, ehs, weights=[0.5]), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- baselines
def test_composite_matches_its_published_update_rule(loras):
    """LoRA Composite (Zhong et al. 2024): every step, for each LoRA i a separate UNet call on [uncond; cond] with
    only LoRA i active, eps^(i) = eps_u^(i) + w (eps_c^(i) - eps_u^(i)), the step moved by their mean. Reference
    written from that rule with DDIM (eta = 0) steps on the pipeline's grid, step by step from the pipeline's own
    states (callback_on_step_end): every step agrees to 1e-5 of the state's scale; the pipeline makes one call per
    step (the published method three)."""
    pipe = lora_pipe(loras, names=NAMES)
    w, n, names = 4.0, 2, ["alpha", "beta", "gamma"]
    latents = torch.randn(n, 4, 8, 8, generator=seed(3))
    states = []

    def keep(_pipe, k, _t, tensors):
        states.append(tensors["latents"].clone())
        return {}

    calls = CallCounter(pipe.unet)
    out = pipe(prompt="a cat", lora=names, lora_mode="composite", guidance_scale=w, num_inference_steps=4,
               method="ode", solver="ddim", clip_sample=False, latents=latents, output_type="latent",
               generator=seed(), callback_on_step_end=keep,
               callback_on_step_end_tensor_inputs=["latents"])  # fmt: skip
    assert len(calls.rows) == 4  # one call per step
    sch = pipe.models[0].schedule
    enc = pipe.models[0].family.encode
    cond = enc(pipe.models[0], "a cat", "cpu")["encoder_hidden_states"].expand(n, -1, -1)
    unc = enc(pipe.models[0], "", "cpu")["encoder_hidden_states"].expand(n, -1, -1)
    ts = out.timesteps.to(torch.float64)
    xs = [latents * float(sch.sigma(ts[0])), *states]
    torch.testing.assert_close(xs[-1], out.images)
    for k in range(len(ts) - 1):
        x, t, t_next = xs[k], ts[k], ts[k + 1]
        tin = sch.timestep(t).float().reshape(1).expand(2 * n)
        preds = []
        for name in names:
            e = reference(pipe.unet, name, torch.cat([x, x]), tin, torch.cat([unc, cond]))
            e_u, e_c = e[:n], e[n:]
            preds.append(e_u + w * (e_c - e_u))
        eps = torch.stack(preds).mean(0)
        a, s = sch.alpha(t), sch.sigma(t)
        if float(t_next) == 0:
            want = (x - float(s) * eps) / float(a)
        else:
            a2, s2 = sch.alpha(t_next), sch.sigma(t_next)
            want = float(a2 / a) * x + float(a2 * (s2 / a2 - s / a)) * eps
        scale = max(1.0, float(x.abs().max()))
        torch.testing.assert_close(xs[k + 1], want, atol=1e-5 * scale, rtol=0)


def test_merge_is_weighted_set_adapters(loras):
    """lora_mode="merge" with weights: one term, one row per image and branch, each row equal to diffusers'
    set_adapters([alpha, beta], weights)."""
    pipe = lora_pipe(loras)
    cap = Capture(pipe.unet)
    out = pipe(prompt="a cat", lora=["alpha", "beta"], lora_mode="merge", weights=[0.7, -0.4], generator=seed(),
               **KW)  # fmt: skip
    cap.remove()
    assert out.kappa.shape == (3, 2, 1) and len(cap.calls) == 3
    for x, t, ehs, y in cap.calls:
        assert x.shape[0] == 4
        want = reference(pipe.unet, ["alpha", "beta"], x, t.expand(4) if t.ndim == 0 else t, ehs, [0.7, -0.4])
        torch.testing.assert_close(y, want, atol=1e-5, rtol=0)


def test_switch_cycles_the_active_lora(loras):
    """lora_mode="switch" with k=2 over 8 steps: the published callback switches after steps 2, 4, 6: alpha for
    steps 0-2, beta 3-4, alpha 5-6, beta 7; each step evaluates only the active LoRA's two rows."""
    pipe = lora_pipe(loras)
    cap = Capture(pipe.unet)
    pipe(prompt=["a cat", "a dog"], lora=["alpha", "beta"], lora_mode="switch", lora_switch_steps=2,
         generator=seed(), **{**KW, "num_inference_steps": 8})  # fmt: skip
    cap.remove()
    expect = ["alpha"] * 3 + ["beta"] * 2 + ["alpha"] * 2 + ["beta"]
    assert len(cap.calls) == 8
    for call, name in zip(cap.calls, expect, strict=True):
        assert call[0].shape[0] == 4
        check_chunks(pipe.unet, call, [name, name], n=2)
        # and the conditional rows carry the active term's own prompt
        want = pipe.models[0].family.encode(pipe.models[0], "a cat" if name == "alpha" else "a dog", "cpu")
        torch.testing.assert_close(call[2][:1], want["encoder_hidden_states"])


# ---------------------------------------------------------------------- refusals
BAD_CALLS = [
    (dict(lora=["gamma"]), "lora: 'gamma' is not a loaded LoRA expert"),
    (dict(lora=["alpha", "beta", "alpha"], prompt=["a", "b"]), "lora has 3 entries for 2 terms"),
    (dict(lora=5), "lora must be an adapter name"),
    (dict(lora_mode="mix"), "lora_mode='mix' is not known"),
    (dict(lora_mode="merge"), "lora_mode='merge' needs lora="),
    (dict(lora=["alpha", "beta"], lora_mode="composite", operator="and"), "drop operator="),
    (dict(lora=["alpha", "beta"], lora_mode="merge", prompt=["a", "b"]), "ONE merged network on ONE prompt"),
    (dict(lora=["alpha", None], lora_mode="switch"), "at least two loaded adapter names"),
    (dict(lora=["alpha", "beta"], lora_mode="switch", weights=[1, 2]), "weights are the merge weights"),
    (dict(lora=["alpha", "beta"], lora_mode="merge", weights=[1]), "weights (the merge weights) must be 2"),
    (dict(lora=["alpha", "beta"], lora_mode="composite", lora_uncond="base"), "lora_uncond='base' is for"),
    (dict(lora="alpha", lora_switch_steps=0), "lora_switch_steps must be an integer"),
    (dict(lora="alpha", lora_scale=-1.0), "lora_scale must be a number"),
    (dict(lora="alpha", lora_scale=float("nan")), "lora_scale must be a number"),
    (dict(lora="alpha", lora_uncond="each"), "lora_uncond='each' is not known"),
    (dict(lora="alpha", lora_calls="parallel"), "lora_calls='parallel' is not known"),
]


@pytest.mark.parametrize("kwargs,message", BAD_CALLS)
def test_bad_lora_arguments_are_refused_before_any_call(loras, kwargs, message):
    pipe = lora_pipe(loras)
    calls = CallCounter(pipe.unet)
    kw = {"prompt": "a cat", **kwargs}
    if "operator" not in kw and isinstance(kw.get("lora"), list) and len(kw["lora"]) > 1 and "lora_mode" not in kw:
        kw["operator"] = "and"
    with pytest.raises(ValueError) as err:
        pipe(**kw, num_inference_steps=2, output_type="latent")
    assert message in str(err.value)
    assert calls.rows == []


def test_bad_sources_are_refused(loras, tmp_path):
    pipe = quiet(sd_pipe(loras["tmp"], seed=0))
    with pytest.raises(ValueError, match="no LoRA experts are loaded"):
        pipe(prompt="a cat", lora="alpha", num_inference_steps=2)
    pickle = tmp_path / "pytorch_lora_weights.bin"
    torch.save({"unet.x.lora_A.weight": torch.zeros(1)}, pickle)
    for source in (pickle, tmp_path):  # the file, and a folder holding only the pickle
        with pytest.raises(ValueError, match="pickled weights.*safetensors only"):
            pipe.load_lora_experts({"p": source})
    for missing in ("missing", "nope.bin", "nope.safetensors", "gone/weights.pt"):  # existence before the format
        with pytest.raises(ValueError, match="no such file or folder") as err:
            pipe.load_lora_experts({"p": str(tmp_path / missing)})
        assert "pickled" not in str(err.value)
    with pytest.raises(ValueError, match="no such file or folder 'nope.bin'"):  # a bare relative name too
        pipe.load_lora_experts({"p": "nope.bin"})
    with pytest.raises(ValueError, match="must be 1-100 letters"):
        pipe.load_lora_experts({"../x": loras["alpha"]})
    with pytest.raises(ValueError, match="takes a dict"):
        pipe.load_lora_experts(["alpha"])
    with pytest.raises(ValueError, match="also trains the text encoder"):
        pipe.load_lora_experts({"delta": loras["with_text"]})
    with pytest.raises(ValueError, match="model='other' is not a checkpoint"):
        pipe.load_lora_experts({"alpha": loras["alpha"]}, model="other")
    with pytest.raises(ValueError, match="takes no LoRA adapters"):
        uncond_pipe(0).load_lora_experts({"alpha": loras["alpha"]})
    assert pipe.lora_experts == {} and not getattr(pipe.unet, "peft_config", None)


def test_a_missing_peft_is_named_not_blamed_on_the_file_or_checkpoint(loras, monkeypatch):
    """Without peft (blocked here as a missing package is: None in sys.modules) the message names the package and
    the install command, not "does not fit checkpoint"; nothing is attached."""
    import sys

    pipe = quiet(sd_pipe(loras["tmp"], seed=0))
    with monkeypatch.context() as m, pytest.raises(ValueError) as err:
        m.setitem(sys.modules, "peft", None)
        pipe.load_lora_experts({"alpha": loras["alpha"]})
    text = str(err.value)
    assert "need the 'peft' package" in text and "pip install peft" in text and "does not fit" not in text
    assert pipe.lora_experts == {} and pipe.load_lora_experts({"alpha": loras["alpha"]}) == ["alpha"]


# ---------------------------------------------------------------------- jobs, batch runner, shipped LoRAs
SHIPPED = ["shapes-lora-purple", "shapes-lora-outline"]
needs_shipped = pytest.mark.skipif(
    not all((ROOT / "model_cards" / s / "pytorch_lora_weights.safetensors").is_file() for s in SHIPPED),
    reason="shipped LoRAs not trained yet",
)


def test_job_lora_fields_are_checked(loras):
    a, b = loras["alpha"], loras["beta"]
    job = J.parse_job({"models": "shapes-text", "prompts": "a square", "lora": f"{a}|none", "operator": "and"})
    assert job.lora == [a, None]
    kw = J.pipeline_kwargs(job)
    assert kw["lora"] == ["alpha", None] and kw["operator"] == "and"
    job = J.parse_job({"models": "shapes-text", "prompts": "a square", "lora": [a, b], "lora_mode": "switch",
                       "lora_switch_steps": 3})  # fmt: skip
    assert J.pipeline_kwargs(job)["lora_switch_steps"] == 3 and J.pipeline_kwargs(job)["operator"] is None
    assert J._term_names(job) == ["a square [alpha]", "a square [beta]"]
    bad = [
        ({"lora": f"{a}|{b}|{a}", "prompts": "x|y", "operator": "and"}, "lora has 3 entries for 2 terms"),
        ({"lora": a, "lora_mode": "merge"}, "lora_mode 'merge' combines several LoRAs"),
        ({"lora": f"{a}|{b}", "lora_mode": "blend"}, "lora_mode='blend' is not known"),
        ({"lora": f"{a}|{b}", "lora_mode": "composite", "operator": "and"}, "drop operator"),
        ({"lora": f"{a}|{b}"}, "operator is missing but there are 2 terms"),
        ({"lora": "../../etc", "operator": "and"}, "lora: '../../etc' is not a shipped LoRA"),
        ({"lora": [a, 5], "operator": "and"}, "lora must be"),
        ({"lora": f"{a}|{b}", "lora_mode": "merge", "lora_switch_steps": 2}, "lora_switch_steps is used by"),
        ({"lora": a, "lora_scale": 99}, "lora_scale=99 is out of range"),
        ({"lora_mode": "switch"}, "lora_mode needs lora"),
    ]
    for extra, message in bad:
        raw = {"models": "shapes-text", "prompts": "a square", **extra}
        with pytest.raises(ValueError) as err:
            J.parse_job(raw)
        assert message in str(err.value), (extra, str(err.value))


def test_resolve_lora_refuses_paths_the_space_does_not_offer(tmp_path):
    assert J.shipped_loras() == sorted(J.shipped_loras())
    with pytest.raises(ValueError, match="not a shipped LoRA"):
        J.resolve_lora("no-such-lora")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a shipped LoRA"):
        J.resolve_lora(str(tmp_path))


@needs_shipped
def test_shipped_loras_through_a_job(tmp_path):
    """A batch row with two shipped LoRAs on shapes-text: one call per step, the manifest names the LoRA terms."""
    from pipelines.batch import run_batch

    rows = [{"id": "lora-and", "models": "shapes-text", "prompts": "a square", "lora": SHIPPED, "operator": "and",
             "steps": 3, "images": 2, "guidance": 4}]  # fmt: skip
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = run_batch(str(path), str(tmp_path / "out"), progress=False)
    assert counts["ok"] == 1
    rec = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert rec[0]["status"] == "ok" and len(rec[0]["files"]) == 2
    assert rec[0]["summary"]["terms"] == [f"a square [{s}]" for s in SHIPPED]
    from pipelines.batch import plan, read_rows

    jobs, errors = plan(read_rows(ROOT / "examples" / "batch" / "lora_jobs.jsonl"), J.Limits())
    assert not errors and len(jobs) == 7  # the example LoRA jobs all parse


@needs_shipped
def test_space_offers_shipped_loras_only():
    """The Space's LoRA box is a choice list of the shipped LoRAs: names are checked against it (no path is read),
    pairing and the baseline modes reach the job, and a generation runs them in one call per step."""
    import importlib.util

    pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[test]')")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    spec = importlib.util.spec_from_file_location("space_app_lora", ROOT / "examples" / "space" / "app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    app = mod.App(J.Limits(max_steps=6, max_images=3, max_terms=3, max_side=48))
    base = [["shapes-text"], "", "a square", "and", 2, "log_snr", 4.0, 3, 2, 0, 4, 0]
    job = app.job(*base, SHIPPED, mod.LORA_COMPOSE)
    assert job.lora == SHIPPED and job.operator == "and" and job.lora_mode is None
    job = app.job(*base, SHIPPED, "composite")
    assert job.lora_mode == "composite" and job.operator is None
    for bad in (["../../etc/passwd"], [str(ROOT / "model_cards" / SHIPPED[0])], ["shapes-text"]):
        with pytest.raises(ValueError, match="LoRA experts: .* is not one of"):
            app.job(*base, bad, mod.LORA_COMPOSE)
    with pytest.raises(ValueError, match="LoRA mode"):
        app.job(*base, SHIPPED, "blend")
    gallery, _fig, summary = app.generate(*base, SHIPPED, mod.LORA_COMPOSE)
    assert len(gallery) == 2 and "[shapes-lora-purple]" in summary


@needs_shipped
def test_space_bundle_carries_the_loras_of_its_models(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("space_bundle_lora", ROOT / "examples" / "space" / "bundle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    dest = mod.bundle(tmp_path / "space", ["shapes-text"])
    for name in SHIPPED:
        assert (dest / "model_cards" / name / "pytorch_lora_weights.safetensors").is_file()
    dest = mod.bundle(tmp_path / "space2", ["shapes-uncond-a"])
    assert not any((dest / "model_cards").glob("shapes-lora-*"))
