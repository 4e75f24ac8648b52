"""The particle product (operator 'product_smc') through the job layer: the batch command and the Space."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import jobs as J

ROOT = Path(__file__).resolve().parents[1]
CARDS = ROOT / "model_cards"
EXPERTS = ["shapes-text-colour", "shapes-text-shape"]
ROW = {"models": EXPERTS, "prompts": ["a red shape", "a circle"], "operator": "product_smc", "num_particles": 3,
       "guidance": 4, "steps": 3, "images": 2, "seed": 7}  # fmt: skip
needs_models = pytest.mark.skipif(
    not all((CARDS / m / "model_index.json").is_file() for m in EXPERTS),
    reason="the shipped shapes models are missing (restore with `git checkout -- model_cards/`)",
)


def test_num_particles_is_checked_and_passed():
    job = J.parse_job(ROW)
    assert J.pipeline_kwargs(job)["num_particles"] == 3 and J.pipeline_kwargs(job)["operator"] == "product_smc"
    assert "num_particles" not in J.pipeline_kwargs(J.parse_job({**ROW, "operator": "and", "num_particles": None}))
    with pytest.raises(ValueError, match="num_particles is used by operator 'product_smc' only"):
        J.parse_job({**ROW, "operator": "and"})
    with pytest.raises(ValueError, match="num_particles=1 is out of range; give an integer from 2 to 64"):
        J.parse_job({**ROW, "num_particles": 1})
    with pytest.raises(ValueError, match="num_particles=9 is out of range"):
        J.parse_job({**ROW, "num_particles": 9}, J.Limits(max_particles=8))
    # an unset field leaves the resume key of earlier manifests unchanged
    assert (
        J.parse_job({**ROW, "operator": "and", "num_particles": None}).key()
        == J.parse_job({k: v for k, v in ROW.items() if k != "num_particles"} | {"operator": "and"}).key()
    )


def test_langevin_steps_are_checked_and_passed():
    job = J.parse_job({**ROW, "langevin_steps": 2})
    assert job.langevin_steps == 2 and J.pipeline_kwargs(job)["langevin_steps"] == 2
    assert "langevin_steps" not in J.pipeline_kwargs(J.parse_job(ROW))
    with pytest.raises(ValueError, match="langevin_steps .* needs operator 'product_smc' with num_particles"):
        J.parse_job({**ROW, "operator": "and", "num_particles": None, "langevin_steps": 1})
    with pytest.raises(ValueError, match="langevin_steps=-1 is out of range; give an integer from 0 to 8"):
        J.parse_job({**ROW, "langevin_steps": -1})
    with pytest.raises(ValueError, match="langevin_steps=3 is out of range"):
        J.parse_job({**ROW, "langevin_steps": 3}, J.Limits(max_langevin_steps=2))
    with pytest.raises(ValueError, match="langevin_steps must be an integer"):
        J.parse_job({**ROW, "langevin_steps": 1.5})
    assert J.parse_job(ROW).key() == J.parse_job({**ROW, "langevin_steps": None}).key()  # earlier manifests resume


@needs_models
def test_run_job_matches_the_pipeline():
    from pipelines import ComposePipeline

    job = J.parse_job(ROW)
    pipe = ComposePipeline.from_pretrained([str(CARDS / m) for m in EXPERTS])
    pipe.set_progress_bar_config(disable=True)
    res = J.run_job(pipe, job)
    ref = pipe(**J.pipeline_kwargs(job), generator=J.generators(job), output_type="np")
    got = np.stack([np.asarray(im, dtype=np.float64) for im in res.images])
    want = np.stack([np.asarray(im) for im in ref.images])
    if want.dtype != np.uint8:
        want = (want * 255).round()
    np.testing.assert_allclose(got.reshape(want.shape), want, atol=1.0)
    assert ref.num_resamples is not None and torch.is_tensor(ref.ess)
    # the trace ends at the log q of the particle each image was drawn from, one row per step
    assert res.log_q.shape == (3, 2, 2) and torch.equal(res.log_q[-1], ref.log_q.cpu().to(torch.float64))


@needs_models
def test_space_form_passes_particles(monkeypatch):
    pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[test]')")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    spec = importlib.util.spec_from_file_location("space_app", ROOT / "examples" / "space" / "app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    app = mod.App(J.Limits(max_steps=6, max_images=3, max_terms=3, max_side=48, max_particles=4))
    fields = [EXPERTS, "", "a red shape\na circle", "product_smc", 3, "log_snr", 4.0, 7, 2, 0, 3]
    job = app.job(*fields)
    assert job.num_particles == 3 and job.operator == "product_smc"
    assert app.job(*fields[:3], "and", *fields[4:]).num_particles is None  # the slider only matters for product_smc
    with pytest.raises(ValueError, match="num_particles=5 is out of range"):
        app.job(*fields[:-1], 5)
    gallery, _fig, summary = app.generate(*fields)
    assert len(gallery) == 2 and "product_smc" in summary
    # the moves slider: 0 leaves the field out (earlier jobs unchanged), otherwise it reaches the pipeline
    assert job.langevin_steps is None
    moved = app.job(*fields, 1)
    assert moved.langevin_steps == 1 and J.pipeline_kwargs(moved)["langevin_steps"] == 1
    assert app.job(*fields[:3], "and", *fields[4:], 1).langevin_steps is None  # only with product_smc
    with pytest.raises(ValueError, match="langevin_steps=3 is out of range"):
        mod.App(J.Limits(max_particles=4, max_langevin_steps=2)).job(*fields, 3)


SCHEDULE = CARDS / "schedules-shapes-uncond" / "or-dpm2m-nfe5.json"


@pytest.mark.skipif(not SCHEDULE.is_file(), reason="the shipped learned schedule is missing")
def test_schedule_file_rows_take_its_steps_and_are_checked(tmp_path):
    row = {"models": ["shapes-uncond-a", "shapes-uncond-b"], "prompts": [], "operator": "or",
           "schedule": str(SCHEDULE), "method": "ode", "solver": "dpm2m", "divergence": "hutchinson_fd",
           "images": 1}  # fmt: skip
    job = J.parse_job(row)
    nfe = json.loads(SCHEDULE.read_text())["nfe"]  # the file's steps (its name says 4 model calls)
    assert job.steps == nfe and J.pipeline_kwargs(job)["schedule"] == str(SCHEDULE)
    assert J.pipeline_kwargs(job)["solver"] == "dpm2m"
    with pytest.raises(ValueError, match="solver='rk4' is not known"):
        J.parse_job({**row, "solver": "rk4"})
    with pytest.raises(ValueError, match="schedule: schedule file .* does not exist"):
        J.parse_job({**row, "schedule": str(tmp_path / "none.json")})
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        J.parse_job({**row, "schedule": str(broken)})
    with pytest.raises(ValueError, match="schedule='karras2' is not known"):
        J.parse_job({**row, "schedule": "karras2"})
    from pipelines import ComposePipeline

    pipe = ComposePipeline.from_pretrained([str(CARDS / "shapes-uncond-a"), str(CARDS / "shapes-uncond-b")])
    pipe.set_progress_bar_config(disable=True)
    res = J.run_job(pipe, job)
    assert res.log_q.shape[0] == nfe and len(res.images) == 1
    # the same file refused for another operator, by the pipeline, with the key named
    with pytest.raises(ValueError, match="operator"):
        J.run_job(pipe, J.parse_job({**row, "operator": "and"}))


UNIPC = CARDS / "schedules-shapes-uncond" / "or-unipc-nfe5.json"


@pytest.mark.skipif(not UNIPC.is_file(), reason="the shipped learned schedule is missing")
def test_a_schedule_file_brings_its_ode_solver_and_a_contrary_one_is_refused():
    """A row (or the Space's form) that names only the file runs it as learned: method 'ode', the file's solver and
    NFE; a method or solver the file was not learned for is refused before any model is loaded."""
    row = {"models": ["shapes-uncond-a", "shapes-uncond-b"], "prompts": [], "operator": "or", "schedule": str(UNIPC)}
    job = J.parse_job(row)
    assert (job.method, job.solver, job.steps) == ("ode", "unipc", json.loads(UNIPC.read_text())["nfe"])
    assert J.pipeline_kwargs(job)["solver"] == "unipc" and J.pipeline_kwargs(job)["method"] == "ode"
    assert J.parse_job({**row, "method": "ode", "solver": "unipc"}) == job
    with pytest.raises(
        ValueError, match="learned for method 'ode' with solver 'unipc'; this job asks for method 'sde'"
    ):
        J.parse_job({**row, "method": "sde"})
    with pytest.raises(ValueError, match="asks for method 'ode', solver 'dpm2m'"):
        J.parse_job({**row, "solver": "dpm2m"})
    assert J.parse_job({**row, "schedule": "uniform"}).method == "sde"  # named grids keep the SDE default
