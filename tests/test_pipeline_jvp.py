"""Forward-mode divergences through real UNet2DModel checkpoints with batches > 1 (a group_norm forward-AD pitfall)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines import ComposePipeline
from pipelines.compose_pipeline import forward_ad_ready

ROOT = Path(__file__).resolve().parents[1]
UNCOND = [ROOT / "model_cards" / n for n in ("shapes-uncond-a", "shapes-uncond-b")]
pytestmark = pytest.mark.skipif(not all(p.is_dir() for p in UNCOND), reason="shipped shapes models not present")


def test_jvp_through_shipped_unet_matches_finite_differences():
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(UNCOND[0] / "unet").eval()
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 3, 24, 24, generator=g), torch.randn(3, 3, 24, 24, generator=g)
    t = torch.full((3,), 500.0)

    def f(X):
        return unet(X, t).sample

    with torch.no_grad():
        h = 1e-3
        fd = (f(x + h * v) - f(x - h * v)) / (2 * h)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), forward_ad_ready(unet):
        _, jv = torch.func.jvp(f, (x,), (v,))
    assert float((jv.detach() - fd).abs().max()) < 1e-2 * float(fd.abs().max())
    assert not any(m._forward_pre_hooks for m in unet.modules()), "hooks must be removed on exit"


def test_ode_jvp_divergence_for_several_images_agrees_with_finite_differences():
    pipe = ComposePipeline.from_pretrained([str(p) for p in UNCOND])
    pipe.set_progress_bar_config(disable=True)
    outs = {}
    for div in ("hutchinson", "hutchinson_fd"):
        outs[div] = pipe(
            operator="or",
            batch_size=3,
            num_inference_steps=4,
            method="ode",
            divergence=div,
            output_type="pt",
            generator=torch.Generator().manual_seed(1),
        )
    a, b = outs["hutchinson"], outs["hutchinson_fd"]
    assert a.images.shape == (3, 3, 24, 24) and torch.isfinite(a.log_q).all()
    # same probes and path: the two divergence estimates differ only by the finite-difference error
    assert torch.allclose(a.log_q, b.log_q, rtol=0, atol=0.05 * float(b.log_q.abs().max()) + 1e-3)
