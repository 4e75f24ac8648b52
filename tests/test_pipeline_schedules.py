"""ComposePipeline with named grids, learned schedule files and DPM-Solver++(2M), on the shipped shapes models."""

from __future__ import annotations

import os

import pytest
import torch

import compose
from compose import ld3
from pipelines.unconditional import DiffusersUnconditional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
A = os.path.join(ROOT, "model_cards", "shapes-uncond-a")
B = os.path.join(ROOT, "model_cards", "shapes-uncond-b")
pytestmark = pytest.mark.skipif(not os.path.isdir(A) or not os.path.isdir(B), reason="shipped models absent")


def load(paths):
    from pipelines import ComposePipeline

    pipe = ComposePipeline.from_pretrained(paths)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def kw(**extra):
    return dict(generator=torch.Generator().manual_seed(0), output_type="latent", batch_size=2) | extra


def test_named_schedules_and_the_grid_alias():
    pipe = load(A)
    sch = pipe.models[0].schedule
    out = pipe(schedule="karras", num_inference_steps=3, **kw())
    torch.testing.assert_close(out.timesteps, compose.make_grid(sch, 3, "karras"))
    alias = pipe(grid="karras", num_inference_steps=3, **kw())
    assert torch.equal(out.images, alias.images)
    with pytest.raises(ValueError, match="disagree"):
        pipe(grid="karras", schedule="uniform", num_inference_steps=3, **kw())
    with pytest.raises(ValueError, match="ays_sd15"):
        pipe(schedule="ays", num_inference_steps=3, **kw())


def write_schedule(path, sch, **over):
    info = {
        "format": ld3.FORMAT,
        "model": "shapes-uncond-a,shapes-uncond-b",
        "operator": "OR(shapes-uncond-a, shapes-uncond-b)",
        "solver": "dpm2m",
        "nfe": 3,
        "guidance": 1.0,
        "schedule": repr(sch),
        "grid": compose.make_grid(sch, 3, "karras").tolist(),
        "network_times": None,
        "train_size": 0,
        "teacher": "none (test)",
        "loss": "l2",
        "date": "2026-01-01T00:00:00Z",
    } | over
    ld3.save_schedule(path, info)


def test_schedule_file_is_used_and_refused_when_it_does_not_match(tmp_path):
    pipe = load([A, B])
    sch = pipe.models[0].schedule
    path = str(tmp_path / "or.json")
    write_schedule(path, sch)
    call = dict(operator="or", method="ode", solver="dpm2m", divergence="hutchinson_fd")
    out = pipe(schedule=path, **call, **kw())
    torch.testing.assert_close(out.timesteps, compose.make_grid(sch, 3, "karras"))
    with pytest.raises(ValueError, match="solver='dpm2m' \\(this call: 'euler'\\)"):
        pipe(schedule=path, **(call | {"solver": "euler"}), **kw())
    with pytest.raises(ValueError, match="operator="):
        pipe(schedule=path, **(call | {"operator": "and"}), **kw())
    with pytest.raises(ValueError, match="num_inference_steps=5 does not match"):
        pipe(schedule=path, num_inference_steps=5, **call, **kw())
    other = str(tmp_path / "a.json")
    write_schedule(other, sch, model="shapes-uncond-a", operator="none")
    with pytest.raises(ValueError, match="model='shapes-uncond-a' \\(this call: 'shapes-uncond-a,shapes-uncond-b'\\)"):
        pipe(schedule=other, **call, **kw())


@pytest.mark.parametrize("solver", ["dpm2m", "unipc"])
def test_pipeline_multistep_solver_matches_compose_sample(solver):
    """One checkpoint, ODE, DPM-Solver++(2M) or UniPC: the pipeline and compose.sample on the same UNet take the
    same path."""
    pipe = load(A)
    model = DiffusersUnconditional(A)
    sch = model.schedule
    latents = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    out = pipe(
        latents=latents,
        num_inference_steps=4,
        method="ode",
        solver=solver,
        divergence="hutchinson_fd",
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )
    ref = compose.sample(
        model,
        x_T=latents * float(sch.sigma(sch.t_max)),
        steps=4,
        method="ode",
        solver=solver,
        divergence="hutchinson_fd",
        generator=torch.Generator().manual_seed(0),
        clip=compose.X0Clip.from_config(model.scheduler_config),  # the checkpoint's clip_sample, as the pipeline
    )
    torch.testing.assert_close(out.images, ref.samples, atol=2e-4, rtol=0)
    with pytest.raises(ValueError, match="method='ode'"):
        pipe(num_inference_steps=4, solver=solver, **kw())
    order = compose.options.SOLVER_TABLE[solver].order
    with pytest.raises(ValueError, match=f"at least {order} steps"):
        pipe(num_inference_steps=order - 1, method="ode", solver=solver, divergence="hutchinson_fd", **kw())


def test_flow_matching_folder_reads_as_ot_velocity(tmp_path):
    from diffusers import DDPMPipeline, FlowMatchEulerDiscreteScheduler, UNet2DModel

    from pipelines import ComposePipeline

    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        norm_num_groups=4,
    )
    DDPMPipeline(unet=unet, scheduler=FlowMatchEulerDiscreteScheduler()).save_pretrained(tmp_path)
    pipe = ComposePipeline.from_pretrained(str(tmp_path))
    m = pipe.models[0]
    assert m.prediction_type == "flow" and m.schedule == compose.NoiseSchedule.ot()
