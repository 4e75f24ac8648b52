"""Hostile input (issue 23): anything reachable from a job file or the Space is refused with a message naming the
field and the fix, quickly, before any work, and never with a traceback or an echo of the whole input.

Two tables: bad job rows (through `parse_job` and the batch planner, which records them per line) and bad Space
requests (through the real server: `gradio_client` against a local launch, each refused in under a second)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch

from pipelines import batch as B
from pipelines import jobs as J

ROOT = Path(__file__).resolve().parents[1]
CARDS = ROOT / "model_cards"
SCHEDULE = CARDS / "schedules-shapes-uncond" / "or-dpm2m-nfe5.json"
needs_models = pytest.mark.skipif(
    not all((CARDS / m / "model_index.json").is_file() for m in ("shapes-text", "shapes-uncond-a", "shapes-uncond-b")),
    reason="the shipped shapes models are missing (restore with `git checkout -- model_cards/`)",
)

ROW = {"id": "row", "models": "shapes-text", "prompts": ["a red shape", "a circle"], "operator": "and", "steps": 3}
UNCOND = {"id": "or", "models": ["shapes-uncond-a", "shapes-uncond-b"], "prompts": [], "operator": "or"}
BIG = "x" * 20_000_000  # 20 MB


class ScheduleFile:
    """A copy of a shipped schedule file with some keys changed (None drops a key, but for guidance), written into
    the test's folder when the row is used (`resolve`)."""

    def __init__(self, name: str, **changes) -> None:
        self.name, self.changes = name, changes

    def write(self, folder: Path) -> str:
        info = {**json.loads(SCHEDULE.read_text()), **self.changes}
        info = {k: v for k, v in info.items() if v is not None or k == "guidance"}
        path = folder / f"{self.name}.json"
        path.write_text(json.dumps(info))
        return str(path)


def long_grid(steps: int) -> list[float]:
    """A valid grid of `steps` steps shaped like the shipped file's: its first and last two times, evenly between."""
    grid = json.loads(SCHEDULE.read_text())["grid"]
    return [grid[0] + (grid[-2] - grid[0]) * k / (steps - 1) for k in range(steps)] + [grid[-1]]


def resolve(row: dict, folder: Path) -> dict:
    return {k: v.write(folder) if isinstance(v, ScheduleFile) else v for k, v in row.items()}


def says(text: str, message: str | tuple[str, ...]) -> bool:
    return all(m in text for m in ((message,) if isinstance(message, str) else message))


# (label, row, limits or None, what the message must say: a text, or several that must all appear)
ROWS = [
    ("20 MB prompt in a list", {**ROW, "prompts": [BIG, "a"]}, None,
     "prompts: prompt 1 is 20000000 characters long; the limit is 1000. Shorten it."),
    ("20 MB prompt as text", {**ROW, "prompts": BIG}, None,
     "prompts is 20000000 characters long; the limit is 1000 per prompt and 8 prompts. Shorten it."),
    ("prompt over the token limit", {**ROW, "prompts": ["a " * 80, "b"]}, J.Limits(max_prompt_tokens=75),
     "prompts: prompt 1 has 80 words, so at least 80 tokens; the limit is 75 tokens. Shorten it."),
    ("20 MB negative prompt", {**ROW, "negative_prompt": BIG}, None,
     "negative_prompt is 20000000 characters long; the limit is 1000"),
    ("id of 300 characters", {**ROW, "id": "i" * 300}, None,
     "id is 300 characters long; the limit is 100 (it names the image files). Give a shorter id."),
    ("id with a path", {**ROW, "id": "../x"}, None, "must use only letters, digits, '-', '_' and '.'"),
    ("id not ASCII", {**ROW, "id": "caf\u00e9"}, None, "must use only ASCII letters"),
    ("id as a list", {**ROW, "id": ["a"]}, None, "id must be text; got list"),
    ("steps 1e9", {**ROW, "steps": 10**9}, None, "steps=1000000000 is out of range; give an integer from 1 to 1000"),
    ("steps infinite", {**ROW, "steps": float("inf")}, None, "steps must be an integer; got inf"),
    ("steps NaN", {**ROW, "steps": float("nan")}, None, "steps must be an integer; got nan"),
    ("steps as a list", {**ROW, "steps": [3]}, None, "steps must be an integer; got [3]"),
    ("steps as true", {**ROW, "steps": True}, None, "steps must be an integer; got True"),
    ("height 100000", {**ROW, "height": 100000}, None, "height=100000 is out of range; give an integer from 8"),
    ("images 10000", {**ROW, "images": 10000}, None, "images=10000 is out of range; give an integer from 1 to 64"),
    ("seed negative", {**ROW, "seed": -1}, None, "seed=-1 is out of range"),
    ("guidance -1", {**ROW, "guidance": -1}, None, "guidance=-1.0 is out of range; give a number in [0.0, 100.0]"),
    ("weights NaN", {**UNCOND, "weights": ["nan", 1]}, None, "weights must be finite; got 'nan'"),
    ("weights huge", {**UNCOND, "weights": [1e30, 1]}, None, "give one number per term, each from -1000 to 1000"),
    ("weights as text", {**UNCOND, "weights": [{"w": 1}, 1]}, None, "weights must be a number"),
    ("temperature 0", {**UNCOND, "temperature": 0}, None, "temperature=0 is out of range; give a number above 0"),
    ("too many prompts", {**ROW, "prompts": ["p"] * 100}, None, "too many terms: 100 prompts; the limit is 8"),
    ("too many models", {**UNCOND, "models": ["shapes-uncond-a"] * 50}, None, "too many models: 50; the limit is 8"),
    ("model not text", {**ROW, "models": [{"a": 1}]}, None, "models must be names, folders or hub ids (text)"),
    ("model with a NUL", {**ROW, "models": ["shapes-text\x00"]}, None, "is not a model name, folder or hub id"),
    ("operator a number", {**ROW, "operator": 5}, None, "operator=5 is not known; use one of"),
    ("method a list", {**ROW, "method": ["ode"]}, None, "method=['ode'] is not known; use one of ['sde', 'ode']"),
    ("divergence an object", {**ROW, "divergence": {}}, None, "divergence={} is not known"),
    ("solver unknown", {**ROW, "solver": "rk45"}, None, "solver='rk45' is not known"),
    ("schedule a list", {**ROW, "schedule": ["karras"]}, None, "schedule must be a grid name"),
    ("schedule with a NUL", {**ROW, "schedule": "a\x00.json"}, None, "is not a usable path"),
    ("schedule missing", {**UNCOND, "schedule": "/no/such/file.json"}, None, "schedule: schedule file"),
    # the reader's own message, or ours: "cannot be read (TypeError ...); regenerate it"
    ("schedule network_times: 5", {**UNCOND, "schedule": ScheduleFile("times", network_times=5)}, None,
     ("schedule: ", "times.json")),
    ("schedule guidance: null", {**UNCOND, "schedule": ScheduleFile("guidance", guidance=None)}, None,
     ("schedule: ", "guidance.json", "guidance")),
    ("schedule nfe over the limit", {**UNCOND, "schedule": ScheduleFile(
        "nfe", nfe=5000, grid=long_grid(5000), network_times=None)}, None,
     "has 5000 steps (nfe); the limit is 1000. Use a schedule with fewer steps."),
    ("schedule nfe as text", {**UNCOND, "schedule": ScheduleFile("nfetext", nfe="4")}, None, "schedule: "),
    ("num_particles 1e9", {**ROW, "operator": "product_smc", "num_particles": 10**9}, None,
     "num_particles=1000000000 is out of range; give an integer from 2 to 64"),
    ("langevin_steps 1e6", {**ROW, "operator": "product_smc", "num_particles": 2, "langevin_steps": 10**6}, None,
     "langevin_steps=1000000 is out of range"),
    ("thousand unknown fields", {**ROW, **{f"f{i}": 1 for i in range(1000)}}, None, "unknown field(s) ['f0', 'f1'"),
    ("lift unknown", {**ROW, "lift": "best"}, None,
     "lift='best' is not known; use one of ['auto', 'renoise', 'tracked', 'none'] ('none': no lift)"),
    ("lift as a list", {**ROW, "lift": ["renoise"]}, None, "lift=['renoise'] is not known"),
    ("lift 20 MB", {**ROW, "lift": BIG}, None, "lift='xxxxx"),
    ("candidates 0", {**ROW, "candidates": 0}, None, "candidates=0 is out of range; give an integer from 1 to 8"),
    ("candidates 1e9", {**ROW, "candidates": 10**9}, None, "candidates=1000000000 is out of range"),
    ("candidates over the cap", {**ROW, "candidates": 5}, J.Limits(max_candidates=4),
     ("candidates=5 is out of range; give an integer from 1 to 4", "--max-candidates")),
    ("candidates as text", {**ROW, "candidates": "two"}, None, "candidates must be an integer; got 'two'"),
    ("candidates 2.5", {**ROW, "candidates": 2.5}, None, "candidates must be an integer; got 2.5"),
    ("candidates as true", {**ROW, "candidates": True}, None, "candidates must be an integer; got True"),
    ("images x candidates over the images cap", {**ROW, "images": 20, "candidates": 4}, None,
     "images x candidates = 20 x 4 = 80 images to sample; the limit is 64 (max_images: every candidate is sampled"),
    ("candidates with product_smc", {**ROW, "operator": "product_smc", "num_particles": 2, "candidates": 2}, None,
     "operator 'product_smc' has particles of its own (num_particles). Drop candidates"),
    ("candidates with no lift", {**ROW, "candidates": 2, "lift": "none"}, None,
     "candidates=2 keeps the candidate with the best lift, but lift is 'none'"),
    ("tracked candidates without guidance", {**ROW, "candidates": 2, "lift": "tracked", "guidance": 1}, None,
     "give guidance > 1, or drop lift"),
    ("select without candidates", {**ROW, "select": "random"}, None,
     "select chooses between candidates; give candidates >= 2 or drop select"),
    ("select unknown", {**ROW, "candidates": 2, "select": "best"}, None, "select='best' is not known"),
]  # fmt: skip


@pytest.fixture(scope="module")
def warm():
    J.parse_job(ROW)  # the first call imports torch and compose (not the hostile input's cost)


@pytest.mark.parametrize("label, row, limits, message", ROWS, ids=[r[0] for r in ROWS])
def test_bad_job_row_is_refused_with_a_message(warm, tmp_path, label, row, limits, message):
    row = resolve(row, tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as err:
        J.parse_job(row, limits)
    text = str(err.value)
    assert says(text, message), text[:500]
    assert len(text) < 600, f"{label}: the message echoes the input ({len(text)} characters)"
    assert time.perf_counter() - t0 < 1.0


def test_the_batch_planner_records_every_bad_row_and_keeps_the_good_ones(tmp_path):
    lines = [json.dumps(resolve(row, tmp_path)) for _, row, limits, _ in ROWS if limits is None]
    lines.insert(3, json.dumps(ROW))
    lines.append("[" * 100_000 + "]" * 100_000)  # nested too deeply for the JSON reader
    path = tmp_path / "jobs.jsonl"
    path.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe not UTF-8\n")
    jobs, errors = B.plan(B.read_rows(path), J.Limits())
    assert [(line, job.id) for line, job in jobs] == [(4, "row")]
    assert len(errors) == len(lines) - 1 + 1
    by_line = {e["line"]: e["error"] for e in errors}
    assert "not usable JSON (nested too deeply" in by_line[len(lines)]
    assert by_line[len(lines) + 1] == f"line {len(lines) + 1}: not valid UTF-8 (byte 1); save the file as UTF-8."
    for e in errors:
        assert e["error"].startswith(f"line {e['line']}: ") and len(e["error"]) < 700 and len(e["id"]) <= 100


def test_a_huge_csv_cell_is_one_bad_row(tmp_path):
    path = tmp_path / "jobs.csv"
    path.write_text(
        f"id,models,prompts,operator,steps\na,shapes-text,{'y' * 200_000},,3\nb,shapes-text,a red shape,,3\n"
    )
    jobs, errors = B.plan(B.read_rows(path), J.Limits())
    assert [job.id for _, job in jobs] == ["b"]
    assert len(errors) == 1 and "cannot be read as CSV (field larger than field limit" in errors[0]["error"]


# ---------------------------------------------------------------------- the Space, through the real server
gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[test]')")

SPACE_LIMITS = J.Limits(max_steps=6, max_images=3, max_terms=3, max_side=48, max_particles=4, max_langevin_steps=1,
                        max_prompt_chars=200, max_prompt_tokens=75, max_seconds=60, max_candidates=2)  # fmt: skip


def form(**kw):
    f = dict(models=["shapes-text"], other="", prompts="a red shape\na circle", operator="and", steps=3,
             schedule="log_snr", guidance=4.0, seed=5, images=1, size=0, particles=2, moves=0, loras=[],
             lora_mode="compose (operator, one call)", candidates=1, lift="auto")  # fmt: skip
    f.update(kw)
    return list(f.values())


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    from gradio_client import Client

    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    spec = importlib.util.spec_from_file_location("space_app_hostile", ROOT / "examples" / "space" / "app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    models = tmp_path_factory.mktemp("models")
    (models / "link-out").symlink_to(CARDS / "shapes-uncond-a")
    demo = mod.build_demo(mod.App(SPACE_LIMITS, models_dir=models))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        client = Client(url, verbose=False)
        client.predict(*form(), api_name="/generate")  # warm: the model is loaded, its tokenizer counts tokens
        yield client
    finally:
        demo.close()


# (label, fields, what the message must say): ours name the field and the fix; gradio's own checks of sliders,
# numbers and choices come first and give their bound
REQUESTS = [
    ("20 MB prompt", dict(prompts=BIG), "prompts: the box holds 20000000 characters; the limit is 200 per prompt"),
    ("prompt over 200 characters", dict(prompts="a red shape " * 20 + "\nb"),
     "prompts: prompt 1 is 239 characters long; the limit is 200. Shorten it."),
    ("prompt over the tokenizer's length", dict(prompts="red," * 7 + "red"),
     "prompts: prompt 1 is 15 tokens long; the limit is 14 tokens. Shorten it."),
    ("prompt of 90 words", dict(prompts="a " * 90), "has 90 words, so at least 90 tokens; the limit is 75 tokens"),
    ("too many terms", dict(prompts="a\nb\nc\nd"), "too many terms: 4 prompts; the limit is 3"),
    ("steps over the limit", dict(steps=99), "99 is greater than maximum value 6"),
    ("images over the limit", dict(images=50), "50 is greater than maximum value 3"),
    ("size over the limit", dict(size=4096), "4096 is greater than maximum value 48"),
    ("particles over the limit", dict(operator="product_smc", particles=64), "64 is greater than maximum value 4"),
    ("moves over the limit", dict(operator="product_smc", moves=5), "5 is greater than maximum value 1"),
    ("seed out of range", dict(seed=-3), "-3 is less than minimum value 0"),
    ("server path as a checkpoint", dict(other="/etc"), "other checkpoints: '/etc' is not a model this Space offers"),
    ("link out of the models folder", dict(other="link-out"), "'link-out' is not a model this Space offers"),
    ("hub id as a checkpoint", dict(other="owner/model"), "'owner/model' is not a model this Space offers"),
    ("20 MB of checkpoints", dict(other=BIG), "other checkpoints: the box holds 20000000 characters"),
    ("server path as a schedule", dict(schedule="/etc/passwd"), "is not in the list of choices"),
    ("shipped file by its path", dict(schedule=str(SCHEDULE)), "is not in the list of choices"),
    ("a path as a shipped model", dict(models=["../../etc"]), "is not in the list of choices"),
    ("unknown operator", dict(operator="xor"), "is not in the list of choices"),
    ("candidates over the limit", dict(candidates=9), "9 is greater than maximum value 2"),
    ("images x candidates over the images limit", dict(images=2, candidates=2),
     "images x candidates = 2 x 2 = 4 images to sample; the limit is 3"),
    ("candidates with product_smc", dict(operator="product_smc", candidates=2), "has particles of its own"),
    ("unknown lift", dict(lift="/etc/passwd"), "is not in the list of choices"),
]  # fmt: skip


@needs_models
@pytest.mark.parametrize("label, fields, message", REQUESTS, ids=[r[0] for r in REQUESTS])
def test_bad_space_request_is_refused_quickly_through_the_server(space, label, fields, message):
    from gradio_client.exceptions import AppError

    t0 = time.perf_counter()
    with pytest.raises(AppError) as err:
        space.predict(*form(**fields), api_name="/generate")
    seconds = time.perf_counter() - t0
    text = str(err.value)
    assert message in text, text[:500]
    assert "Traceback" not in text
    assert str(ROOT) not in text or str(ROOT) in repr(fields)  # no server path but the one the request sent
    assert seconds < 1.0, f"{label}: refused after {seconds:.2f} s"


@needs_models
def test_the_server_still_answers_after_the_hostile_requests(space):
    gallery, _plot, summary = space.predict(*form(images=2), api_name="/generate")
    assert len(gallery) == 2 and "a circle" in summary


# ---------------------------------------------------------------------- the pipeline's own arguments
CALLS = [  # (label, checkpoint, keyword arguments, message): refused before any network call
    ("steps 1e9", "shapes-uncond-a", dict(num_inference_steps=1e9), "num_inference_steps must be an integer"),
    ("steps 1e6", "shapes-uncond-a", dict(num_inference_steps=10**6), "num_inference_steps=1000000 is out of range"),
    ("height 30", "shapes-uncond-a", dict(height=30), ("height must be a positive multiple of", "got 30")),
    ("height 0", "shapes-uncond-a", dict(height=0), ("height must be a positive multiple of", "got 0")),
    ("width -8", "shapes-uncond-a", dict(width=-8), "width must be a positive multiple of"),
    ("width 1e6", "shapes-uncond-a", dict(width=10**6), "width must be a positive multiple of"),
    ("fd_eps 0", "shapes-uncond-a", dict(method="ode", fd_eps=0.0), "fd_eps=0.0 is out of range"),
    ("fd_eps -1", "shapes-uncond-a", dict(method="ode", fd_eps=-1.0), "fd_eps=-1.0 is out of range"),
    ("probes 0", "shapes-uncond-a", dict(method="ode", probes=0), "probes=0 is out of range"),
    ("guidance -2", "shapes-text", dict(prompt="a circle", guidance_scale=-2.0),
     "guidance_scale=-2.0 is out of range"),
    ("guidance nan", "shapes-text", dict(prompt="a circle", guidance_scale=float("nan")),
     "guidance_scale must be finite"),
    ("temperature with and", "shapes-text", dict(prompt=["a", "b"], operator="and", temperature=2.0),
     "temperature=2.0 is used by operator='or' only"),
    ("temperature 0", "shapes-text", dict(prompt=["a", "b"], operator="or", temperature=0.0),
     "temperature=0.0 is out of range"),
    ("images 1e6", "shapes-uncond-a", dict(num_images_per_prompt=10**6), "num_images_per_prompt=1000000 is out of"),
    ("latents nan", "shapes-uncond-a", dict(latents=torch.full((1, 3, 24, 24), float("nan"))),
     "latents must be finite"),
    ("sigmas nan", "shapes-uncond-a", dict(sigmas=[10.0, float("nan")]), "sigmas must be a non-empty list of finite"),
    ("timesteps out of range", "shapes-uncond-a", dict(timesteps=[5000, 10]), "timesteps lie outside"),
    ("ode solver with sde", "shapes-uncond-a", dict(solver="dpm2m"), "is an ODE solver"),
    ("unknown schedule", "shapes-uncond-a", dict(schedule="spiral"), "schedule='spiral' is not known"),
    ("clip range 0", "shapes-uncond-a", dict(clip_sample=True, clip_sample_range=0.0), "clip_sample_range=0.0"),
    ("nan network times", "shapes-uncond-a", dict(method="ode", solver="dpm2m", schedule="NAN_NET"),
     "network_times must be finite times"),
    ("network times above 1", "shapes-uncond-a", dict(method="ode", solver="dpm2m", schedule="BIG_NET"),
     "network_times must be finite times"),
]


@pytest.fixture(scope="module")
def loaded():
    from pipelines import ComposePipeline

    out = {}
    for name in ("shapes-uncond-a", "shapes-text"):
        pipe = ComposePipeline.from_pretrained(str(CARDS / name))
        pipe.set_progress_bar_config(disable=True)
        out[name] = pipe
    return out


@needs_models
@pytest.mark.parametrize("label, name, kwargs, message", CALLS, ids=[c[0] for c in CALLS])
def test_bad_pipeline_argument_is_refused_before_any_network_call(loaded, tmp_path, label, name, kwargs, message):
    pipe = loaded[name]
    kwargs = dict(kwargs)
    if kwargs.get("schedule") in ("NAN_NET", "BIG_NET"):
        src = CARDS / "schedules-shapes-uncond" / "a-dpm2m-nfe5.json"
        info = json.loads(src.read_text())
        bad = float("nan") if kwargs["schedule"] == "NAN_NET" else 1.5
        info["network_times"] = [bad] * info["nfe"]
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(info))
        kwargs["schedule"] = str(path)
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    t0 = time.perf_counter()
    try:
        with pytest.raises(ValueError) as err:
            pipe(**kwargs, output_type="latent")
    finally:
        hook.remove()
    assert says(str(err.value), message), str(err.value)
    assert not calls and time.perf_counter() - t0 < 1.0


# ---------------------------------------------------------------------- model folders
def _saved_pair(tmp_path: Path, models_entry) -> Path:
    folder = tmp_path / "pair"
    folder.mkdir()
    (folder / "compose_models.json").write_text(json.dumps({"models": models_entry}))
    return folder


@needs_models
@pytest.mark.parametrize(
    "label, entries, message",
    [
        ("itself", ["."], "points outside"),
        ("absolute", ["/etc"], "is an absolute path"),
        ("parent", ["../.."], "points outside"),
        ("home", ["~"], "is an absolute path"),
        ("missing", ["nothing_here"], "is not a folder inside"),
        ("not a list", "model_0", "'models' must be a non-empty list"),
        ("empty", [], "'models' must be a non-empty list"),
    ],
)
def test_compose_models_json_entries_are_confined_to_the_folder(tmp_path, label, entries, message):
    from pipelines import ComposePipeline

    folder = _saved_pair(tmp_path, entries)
    with pytest.raises(ValueError, match=message):
        ComposePipeline.from_pretrained(str(folder))


@needs_models
def test_compose_models_json_cycles_are_refused(tmp_path):
    from pipelines import ComposePipeline

    a, b = tmp_path / "a", tmp_path / "a" / "b"
    b.mkdir(parents=True)
    (a / "compose_models.json").write_text(json.dumps({"models": ["b"]}))
    (b / "compose_models.json").write_text(json.dumps({"models": ["../b"]}))  # b lists itself again
    with pytest.raises(ValueError, match="points outside|cycle"):
        ComposePipeline.from_pretrained(str(a))
    # a symbolic link back to the folder is a cycle, not a loop until RecursionError
    (b / "compose_models.json").write_text(json.dumps({"models": ["up"]}))
    os.symlink(a, b / "up")
    with pytest.raises(ValueError, match="points outside|cycle"):
        ComposePipeline.from_pretrained(str(a))


@needs_models
def test_a_mistyped_local_folder_says_no_such_folder(monkeypatch):
    """Issue 24.2: no hub advice ("not fully cached ... local_files_only") for a path that does not exist."""
    from pipelines import ComposePipeline

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError) as err:
        ComposePipeline.from_pretrained("model_cards/shapes-uncond-c")
    text = str(err.value)
    assert "no such folder" in text and "model_cards/shapes-uncond-a" in text and "cached" not in text
    with pytest.raises(ValueError, match="no such folder"):
        ComposePipeline.from_pretrained(["model_cards/shapes-uncond-a", "./nowhere/at-all"])


@needs_models
def test_bare_shipped_names_resolve_the_same_everywhere(tmp_path, monkeypatch):
    """Issue 31: one resolver (`pipelines.shipped.resolve_model`) for from_pretrained, the batch jobs and the Space:
    an existing folder is itself, a bare shipped name is its folder from any working directory, an owner/name is a
    hub id (passed on), anything else is "no such folder" with the closest and the shipped names."""
    import shutil

    from pipelines import ComposePipeline
    from pipelines.shipped import resolve_model

    monkeypatch.chdir(tmp_path)  # no model_cards/ here
    shipped = str(CARDS / "shapes-text")
    assert resolve_model("shapes-text") == J.resolve_model("shapes-text") == shipped
    assert resolve_model("someone/shapes-text") == J.resolve_model("someone/shapes-text") == "someone/shapes-text"
    pipe = ComposePipeline.from_pretrained("shapes-text")
    assert pipe.models[0].name == "shapes-text" and pipe.text_encoder is not None
    two = ComposePipeline.from_pretrained(["shapes-uncond-a", "shapes-uncond-b"])
    assert [m.name for m in two.models] == ["shapes-uncond-a", "shapes-uncond-b"]
    for call in (ComposePipeline.from_pretrained, J.resolve_model):
        with pytest.raises(ValueError) as err:
            call("shapes-txt")
        text = str(err.value)
        assert "no such folder" in text and "Did you mean 'shapes-text'" in text and "shapes-uncond-b" in text
    # an existing folder is what the caller typed: it wins over the shipped name
    shutil.copytree(CARDS / "shapes-uncond-a", tmp_path / "shapes-text")
    assert resolve_model("shapes-text") == "shapes-text"
    assert ComposePipeline.from_pretrained("shapes-text").text_encoder is None  # the local unconditional copy
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="the folder holds no model_index.json"):
        ComposePipeline.from_pretrained("empty")
    with pytest.raises(ValueError, match="models: cannot read 'nope.json': is a file, not a folder"):
        (tmp_path / "nope.json").write_text("{}")
        J.resolve_model("nope.json")


@needs_models
def test_one_guidance_range_and_steps_caps_that_say_why():
    """Issue 31: guidance has one range, the pipeline's, in jobs too (0-100; 1 or below: no guidance); a job's steps
    are capped by the runner (Limits.max_steps) below the Python API's typo guard (compose.options.MAX_STEPS), and
    the message says which cap it is."""
    from compose import options as O
    from pipelines import ComposePipeline

    pipe = ComposePipeline.from_pretrained(str(CARDS / "shapes-text"))
    pipe.set_progress_bar_config(disable=True)
    for g in (-1.0, 0.0, 0.5, 1.0, 50.0, 100.0, 100.5):
        try:
            J.parse_job({**ROW, "guidance": g})
            job_ok = True
        except ValueError as err:
            job_ok, job_msg = False, str(err)
        try:
            pipe(prompt="a circle", guidance_scale=g, num_inference_steps=1, output_type="pt")
            api_ok = True
        except ValueError as err:
            api_ok, api_msg = False, str(err)
        assert job_ok == api_ok == (0.0 <= g <= O.MAX_GUIDANCE), g
        if not job_ok:
            assert job_msg.replace("guidance=", "guidance_scale=", 1) == api_msg
    cap = J.Limits().max_steps
    assert cap < O.MAX_STEPS and str(O.MAX_STEPS) in J.STEPS_CAP
    with pytest.raises(ValueError, match=rf"steps={cap + 1} is out of range; give an integer from 1 to {cap} \(this "
                       r"runner's cap per job, Limits.max_steps: the batch runner's --max-steps"):
        J.parse_job({**ROW, "steps": cap + 1})
    assert O.check_steps(cap + 1) == cap + 1  # the API takes it
    with pytest.raises(ValueError, match=f"num_inference_steps={O.MAX_STEPS + 1} is out of range"):
        O.check_steps(O.MAX_STEPS + 1)
