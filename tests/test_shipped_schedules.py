"""The learned schedules shipped in model_cards/schedules-shapes-uncond: each is a valid file, the pipeline runs it for
its own set-up (learned network times included, exactly as the learner's solver did) and refuses it for another."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import compose
from compose import ld3
from pipelines.unconditional import DiffusersUnconditional

CARDS = Path(__file__).resolve().parents[1] / "model_cards"
FOLDER = CARDS / "schedules-shapes-uncond"
FILES = sorted(FOLDER.glob("*.json"))
MODELS = {
    "a": ["shapes-uncond-a"],
    "or": ["shapes-uncond-a", "shapes-uncond-b"],
    "and": ["shapes-uncond-a", "shapes-uncond-b"],
}
OPERATOR = {"a": None, "or": "or", "and": "and"}

pytestmark = pytest.mark.skipif(not FILES, reason="no shipped schedule files")


def setup_of(path: Path) -> str:
    return path.name.split("-")[0]


def solver_of(path: Path) -> str:
    return path.name.split("-")[1]


@pytest.fixture(scope="module")
def pipes():
    from pipelines import ComposePipeline

    out = {}
    for key in ("a", "or"):
        pipe = ComposePipeline.from_pretrained([str(CARDS / m) for m in MODELS[key]])
        pipe.set_progress_bar_config(disable=True)
        out[key] = pipe
    out["and"] = out["or"]
    return out


def test_every_shipped_file_is_complete_and_named_for_its_setup():
    assert {setup_of(p) for p in FILES} <= set(MODELS), [p.name for p in FILES]
    for path in FILES:
        info = ld3.load_schedule(path)
        nfe = int(path.stem.rsplit("nfe", 1)[1])  # network evaluations (format 1 counted nfe - 1 solver steps)
        assert info["nfe"] == nfe and len(info["grid"]) == nfe + 1 and info["solver"] == solver_of(path)
        assert info["grid"][-1] == 0.0
        if "upgraded_from" in info:  # learned in format 1 (solver steps), renamed for its evaluations
            assert info["upgraded_from"]["nfe"] == nfe - 1
        else:  # learned in format 2 (evaluations): every file learned again on the fine-tuned pair (2026-12-06)
            assert info["format"] == "compose-schedule/2"
        assert info["solver"] in compose.SOLVERS
        assert info["model"] == ",".join(MODELS[setup_of(path)])
        net = info["network_times"]
        if net is not None:  # a time shift stays within half the smallest adjacent gap (network_times_from_params)
            grid = info["grid"]
            for k, t in enumerate(net):
                gaps = [grid[k] - grid[k + 1]] + ([grid[k - 1] - grid[k]] if k else [])
                assert abs(t - grid[k]) <= 0.5 * min(gaps) + 1e-9


@pytest.mark.parametrize("path", [p for p in FILES if setup_of(p) == "a"], ids=lambda p: p.name)
def test_pipeline_follows_the_learned_grid_and_network_times(pipes, path):
    """The pipeline's ODE with the file == compose.ld3.solve with the file's grid, network times and learned solver
    offsets where it has them (both end with the step to the data): the schedule means the same thing where it is
    learned and used (learned without x0 clipping: the pipeline's clip_sample is turned off)."""
    info = json.loads(path.read_text())
    pipe = pipes["a"]
    out = pipe(method="ode", solver=info["solver"], schedule=str(path), batch_size=2, output_type="latent",
               generator=torch.Generator().manual_seed(3), clip_sample=False)  # fmt: skip
    model = DiffusersUnconditional(str(CARDS / "shapes-uncond-a"))
    sch = model.schedule
    grid = torch.tensor(info["grid"], dtype=torch.float64)
    as_t = lambda v: None if v is None else torch.tensor(v, dtype=torch.float64)  # noqa: E731
    net, off = as_t(info["network_times"]), as_t(info.get("solver_offsets"))
    x_T = torch.randn((2, *model.sample_shape), generator=torch.Generator().manual_seed(3)) * float(sch.sigma(grid[0]))
    with torch.no_grad():
        x0 = ld3.solve(model, x_T, grid, info["solver"], net, solver_offsets=off)
    assert out.images.shape == x0.shape
    torch.testing.assert_close(out.images.float(), x0.float(), atol=2e-4, rtol=1e-4)
    # and a different grid gives a different image: the comparison can fail
    other = pipe(method="ode", solver=info["solver"], schedule="ays_sdxl", num_inference_steps=info["nfe"],
                 batch_size=2, output_type="latent", generator=torch.Generator().manual_seed(3),
                 clip_sample=False)  # fmt: skip
    assert (other.images.float() - x0).abs().max() > 1e-2


@pytest.mark.parametrize("path", [p for p in FILES if setup_of(p) in ("or", "and")], ids=lambda p: p.name)
def test_composed_files_run_for_their_operator_and_are_refused_for_the_other(pipes, path):
    key = setup_of(path)
    pipe = pipes[key]
    info = json.loads(path.read_text())
    kw = dict(method="ode", solver=solver_of(path), divergence="hutchinson_fd", schedule=str(path), batch_size=1,
              probes=info.get("probes", 1))  # fmt: skip
    out = pipe(operator=OPERATOR[key], output_type="pt", generator=torch.Generator().manual_seed(0), **kw)
    nfe = info["nfe"]
    assert out.kappa.shape[0] == nfe and torch.isfinite(out.images).all()
    other = "and" if key == "or" else "or"
    with pytest.raises(ValueError, match="operator="):
        pipe(operator=other, **kw)
    with pytest.raises(ValueError, match="solver="):
        pipe(operator=OPERATOR[key], **{**kw, "solver": "euler"})
    if info.get("probes", 1) != 1:  # learned with more probes per step: a one-probe call runs, with a warning
        with pytest.warns(UserWarning, match=f"probes={info['probes']} Hutchinson probes per step"):
            pipe(operator=OPERATOR[key], output_type="latent", **{**kw, "probes": 1})
