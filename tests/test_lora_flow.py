"""LoRA experts on the flow-matching transformers (issue 22 on the families of issue 21): SD3 and Flux.

Tiny offline components (tests/test_flow_pipelines.py's) with two random LoRAs on the transformer's attention
projections, saved in diffusers' LoRA format by the family's own pipeline class and loaded through
`ComposePipeline.load_lora_experts`. A single LoRA term equals diffusers' own pipeline with that LoRA loaded; two
LoRA terms go through ONE transformer call per step in which every chunk of rows equals the transformer with only
its LoRA active (diffusers' set_adapters).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from test_flow_pipelines import T5_LEN, flux_components, quiet, sd3_components
from test_pipeline import seed

from pipelines import ComposePipeline

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
FAMILIES = {"sd3": (sd3_components, StableDiffusion3Pipeline, 16), "flux": (flux_components, FluxPipeline, 8)}


def write_loras(tmp_path, family: str) -> dict:
    """Two random rank-2 LoRAs of the family's tiny transformer (lora_B drawn so they are not no-ops)."""
    build, pipe_cls, _ = FAMILIES[family]
    out = {}
    for k, name in enumerate(("alpha", "beta")):
        tr = build(str(tmp_path / f"c{k}"))["transformer"]
        tr.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS), adapter_name=name)
        g = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for key, p in tr.named_parameters():
                if "lora_B" in key:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        folder = str(tmp_path / name)
        pipe_cls.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(tr, adapter_name=name))
        out[name] = folder
    return out


class Capture:
    """Every transformer call: its keyword inputs and its output."""

    def __init__(self, net) -> None:
        self.calls: list[tuple[dict, torch.Tensor]] = []
        self.handle = net.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        kw = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
        self.calls.append((kw, output[0].clone()))


def only(net, spec, kw: dict, rows: slice, total: int) -> torch.Tensor:
    """The transformer on `rows` of a captured call with only `spec` active (diffusers' set_adapters)."""
    part = {k: (v[rows] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == total else v) for k, v in kw.items()}
    if spec is None:
        net.disable_adapters()
    else:
        net.enable_adapters()
        net.set_adapters([spec])
    try:
        with torch.no_grad():
            return net(**{**part, "return_dict": False})[0]
    finally:
        net.disable_adapters()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_lora_term_equals_the_family_pipeline_with_that_lora(tmp_path, family):
    build, pipe_cls, size = FAMILIES[family]
    loras = write_loras(tmp_path, family)
    ref_pipe = quiet(pipe_cls(**build(str(tmp_path / "ref"))))
    ref_pipe.load_lora_weights(loras["beta"], adapter_name="beta")
    kw = dict(num_inference_steps=3, height=size, width=size, output_type="latent", max_sequence_length=T5_LEN)
    kw.update(guidance_scale=4.0) if family == "sd3" else kw.update(guidance_scale=3.0)
    if family == "sd3":
        latents = torch.randn(1, 4, size // 2, size // 2, generator=seed(3))
    else:
        latents, _ = ref_pipe.prepare_latents(1, 1, size, size, torch.float32, "cpu", seed(3))
    ref = ref_pipe(prompt="a red circle", latents=latents, **kw).images
    pipe = quiet(ComposePipeline(**build(str(tmp_path / "ours"))))
    pipe.load_lora_experts(loras)
    out = pipe(prompt="a red circle", lora="beta", latents=latents, method="ode", **kw).images
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    base = pipe(prompt="a red circle", latents=latents, method="ode", **kw).images
    assert float((base - ref).abs().max()) > 1e-3  # the LoRA changes the result (else the test proves nothing)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_two_lora_terms_share_one_transformer_call(tmp_path, family):
    build, _, size = FAMILIES[family]
    loras = write_loras(tmp_path, family)
    pipe = quiet(ComposePipeline(**build(str(tmp_path / "ours"))))
    pipe.load_lora_experts(loras)
    net = pipe.models[0].network
    extra = dict(guidance_scale=3.0) if family == "sd3" else dict(true_cfg_scale=2.0, negative_prompt="a dog")
    cap = Capture(net)
    out = pipe(prompt=["a red shape", "a circle"], lora=["alpha", "beta"], operator="and", num_inference_steps=3,
               height=size, width=size, batch_size=2, generator=seed(0), output_type="pt", max_sequence_length=T5_LEN,
               **extra)  # fmt: skip
    cap.handle.remove()
    assert bool(torch.isfinite(out.images).all()) and bool(torch.isfinite(out.kappa).all())
    assert len(cap.calls) == 3  # one call per step: both terms and each LoRA's unconditional rows
    specs = ["alpha", "beta", "alpha", "beta"]  # the terms, then each LoRA's own unconditional row (n = 2 each)
    spread = 0.0
    for kw, got in cap.calls:
        total = got.shape[0]
        assert total == 2 * len(specs)
        for c, spec in enumerate(specs):
            rows = slice(2 * c, 2 * c + 2)
            want = only(net, spec, kw, rows, total)
            torch.testing.assert_close(got[rows], want, atol=1e-5, rtol=0)
            other = only(net, "beta" if spec == "alpha" else "alpha", kw, rows, total)
            spread = max(spread, float((other - want).abs().max()))
    assert spread > 1e-3  # the two LoRAs differ on these rows
    assert all(m.disable_adapters for m in net.modules() if hasattr(m, "disable_adapters") and hasattr(m, "lora_A"))
