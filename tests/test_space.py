"""The Space demo (examples/space/): the generation function against direct pipeline calls, every bad input as a
message, the app through gradio_client against a local launch, the Space front matter and the Space bundle."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[test]')")

from pipelines import ComposePipeline  # noqa: E402
from pipelines import jobs as J  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "examples" / "space"
CARDS = ROOT / "model_cards"
needs_models = pytest.mark.skipif(
    not all((CARDS / m / "model_index.json").is_file() for m in ("shapes-text", "shapes-uncond-a")),
    reason="the shipped shapes models are missing (restore with `git checkout -- model_cards/`)",
)
LIMITS = J.Limits(max_steps=6, max_images=3, max_terms=3, max_side=48, max_prompt_chars=200, max_prompt_tokens=75)


def load_app():
    spec = importlib.util.spec_from_file_location("space_app", SPACE / "app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def app_mod():
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    return load_app()


def form(**kw):
    """The page's fields in order, with small defaults."""
    f = dict(models=["shapes-text"], other="", prompts="a red shape\na circle", operator="and", steps=3,
             schedule="log_snr", guidance=4.0, seed=5, images=2, size=0)  # fmt: skip
    f.update(kw)
    return list(f.values())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_models
def test_generate_shows_the_pipeline_images_and_traces(app_mod):
    app = app_mod.App(LIMITS)
    gallery, fig, summary = app.generate(*form())
    pipe = ComposePipeline.from_pretrained(str(CARDS / "shapes-text"))
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(5 + i) for i in range(2)]
    ref = pipe(["a red shape", "a circle"], operator="and", guidance_scale=4.0, num_inference_steps=3, batch_size=2,
               generator=gens, output_type="np")  # fmt: skip
    assert [c for _, c in gallery] == ["seed 5", "seed 6"]
    for (shown, _), im in zip(gallery, ref.images, strict=True):
        scale = shown.width // 24
        assert scale >= 4 and shown.size == (24 * scale, 24 * scale)  # enlarged for display, nearest neighbour
        np.testing.assert_array_equal(np.asarray(shown)[::scale, ::scale], (im * 255).round().astype(np.uint8))
    ax_k, ax_q = fig.axes
    kappa = ref.kappa.numpy()
    rel = ref.log_q.numpy() - ref.log_q.numpy().mean(-1, keepdims=True)
    for j, (lk, lq) in enumerate(zip(ax_k.get_lines(), ax_q.get_lines(), strict=True)):
        np.testing.assert_allclose(lk.get_ydata(), kappa[:, :, j].mean(1), atol=1e-9)
        assert lq.get_ydata()[-1] == pytest.approx(rel[:, j].mean(), abs=1e-6)  # last point = final log q
    assert [t.get_text() for t in ax_k.get_legend().get_texts()] == ["a red shape", "a circle"]
    assert "| a red shape |" in summary and "**and** over 2 term(s)" in summary


@needs_models
@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(operator="xor"), "operator='xor' is not known"),
        (dict(prompts=""), "prompts is empty"),
        (dict(prompts="a\nb\nc\nd"), "too many terms: 4"),
        (dict(steps=7), "steps=7 is out of range; give an integer from 1 to 6"),
        (dict(steps=0), "steps=0 is out of range"),
        (dict(images=4), "images=4 is out of range"),
        (dict(size=64), "height=64 is out of range"),
        (dict(models=[], other="/no/such/model"), "other checkpoints: '/no/such/model' is not a model this Space"),
        (dict(schedule="/etc/passwd"), "schedule: '/etc/passwd' is not offered"),
        (dict(models=["../shapes-text"]), "shipped models: '../shapes-text' is not one of"),
        (dict(prompts="a red shape, " * 20), "prompts: prompt 1 is 259 characters long; the limit is 200"),
        (dict(models=[]), "models is missing"),
        (dict(models=["shapes-uncond-a"]), "the chosen models are unconditional"),
    ],
)
def test_bad_input_is_a_message(app_mod, fields, message):
    app = app_mod.App(LIMITS)
    with pytest.raises(gr.Error) as err:
        app.generate(*form(**fields))
    assert message in err.value.message
    assert "Traceback" not in err.value.message


@needs_models
def test_candidates_and_the_lift_of_every_image_in_the_summary(app_mod):
    """candidates=2 keeps the best of 2 per image; the table shows every term's lift (mean; per image) as the
    pipeline returned it, and the line under it the estimator, each image's score and kept candidate, the rows."""
    app = app_mod.App(J.Limits(**{**LIMITS.__dict__, "max_images": 4, "max_candidates": 2}))
    fields = form(operator="product") + [4, 0, [], app_mod.LORA_COMPOSE, 2, "auto"]
    job = app.job(*fields)
    assert (job.candidates, job.lift) == (2, None)  # "auto" leaves the field out: the pipeline's default
    assert app.job(*fields[:-2], 1, "auto").candidates is None  # one candidate: the field is left out too
    gallery, _fig, summary = app.generate(*fields)
    pipe = ComposePipeline.from_pretrained(str(CARDS / "shapes-text"))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(**J.pipeline_kwargs(job), generator=J.generators(job), output_type="np")
    assert len(gallery) == 2
    for j, name in enumerate(["a red shape", "a circle"]):
        row = next(line for line in summary.splitlines() if line.startswith(f"| {name} |"))
        per_image = " / ".join(f"{v:.1f}" for v in ref.lift[:, j].tolist())
        assert f"| {ref.lift[:, j].mean():.2f} ({per_image}) |" in row, row
    kept = ", ".join(str(int(v)) for v in ref.candidate)
    assert f"Best of 2 candidates per image; kept: {kept}." in summary
    assert f"The lift cost {ref.verification_rows} network rows per image." in summary
    scores = " / ".join(f"{v:.1f}" for v in ref.lift.min(-1).values.tolist())
    assert f"score per image (min over the terms): {scores}." in summary
    with pytest.raises(gr.Error, match="images x candidates = 3 x 2 = 6 images to sample; the limit is 4"):
        app.generate(*form(operator="product", images=3) + [4, 0, [], app_mod.LORA_COMPOSE, 2, "auto"])
    _, _, plain = app.generate(*form(images=1) + [4, 0, [], app_mod.LORA_COMPOSE, 1, "none"])
    assert "Lift: none" in plain and "| - |" in plain


@needs_models
def test_lift_levels_and_draws_reach_the_pipeline_and_the_summary(app_mod):
    """The renoise lift's levels and draws: passed to the job (left out at their defaults), run as the pipeline runs
    them, named in the summary; refused with a message where no renoise lift runs, or past the Space's limits."""
    app = app_mod.App(J.Limits(**{**LIMITS.__dict__, "max_steps": 8, "max_images": 4, "max_candidates": 2}))
    base = form(operator="product", images=1) + [4, 0, [], app_mod.LORA_COMPOSE, 2, "renoise"]
    assert (app.job(*base).lift_levels, app.job(*base).lift_draws) == (None, None)  # the defaults: fields left out
    fields = [*base, " 3, 2,1,0 ", 2]
    job = app.job(*fields)
    assert (job.lift_levels, job.lift_draws) == ([3.0, 2.0, 1.0, 0.0], 2)
    _, _, summary = app.generate(*fields)
    pipe = ComposePipeline.from_pretrained(str(CARDS / "shapes-text"))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(**J.pipeline_kwargs(job), generator=J.generators(job), output_type="np")
    assert ref.verification_rows == 2 * 4 * 2 * 3  # 2 candidates x 4 levels x 2 draws x (2 terms + unconditional)
    assert f"The lift cost {ref.verification_rows} network rows per image." in summary
    assert "Read at log-SNR 3, 2, 1, 0, 2 noise draws per level." in summary
    for j in range(2):
        assert f"| {ref.lift[:, j].mean():.2f} ({ref.lift[0, j]:.1f}) |" in summary
    refused = [
        ([*base[:-1], "tracked", "3,2", 1], "lift_levels set(s) the 'renoise' lift, but this job's lift is 'tracked'"),
        ([*base, "", 0], "lift_draws"),
        ([*base, "3,x", 1], "lift_levels must be a number; got 'x'"),
        ([*base, "1," * 20, 1], "lift_levels has 21 entries"),
        ([*base, "3,2,1,0", 3], "lift_levels x lift_draws = 12 network evaluations per candidate; the limit is 8"),
        ([*base, ["3"], 1], "lift levels must be text"),
    ]
    for bad, says in refused:
        with pytest.raises(gr.Error) as err:
            app.generate(*bad)
        assert says in err.value.message, (bad, err.value.message)


@needs_models
def test_one_term_and_unconditional_or(app_mod):
    app = app_mod.App(LIMITS)
    gallery, fig, summary = app.generate(*form(prompts="a red shape", operator="or", images=1))
    assert len(gallery) == 1 and "none (one term)" in summary  # one term: the operator does not apply, and says so
    gallery, fig, summary = app.generate(*form(models=["shapes-uncond-a", "shapes-uncond-b"], prompts="", images=3,
                                               operator="or", guidance=1.0))  # fmt: skip
    kappa = np.stack([ln.get_ydata() for ln in fig.axes[0].get_lines()], -1)
    np.testing.assert_allclose(kappa.sum(-1), 1.0, atol=1e-9)  # OR's weights: a softmax over the two models
    assert len(gallery) == 3 and "shapes-uncond-b" in summary


@needs_models
def test_gradio_client_against_a_local_launch(app_mod):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    demo = app_mod.build_demo(app_mod.App(LIMITS))
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    try:
        client = Client(url, verbose=False)
        gallery, plot, summary = client.predict(*form(), api_name="/generate")
        assert len(gallery) == 2 and [g["caption"] for g in gallery] == ["seed 5", "seed 6"]
        from PIL import Image

        assert Image.open(gallery[0]["image"]).size[0] >= 96
        assert plot is not None and "a circle" in summary
        with pytest.raises(AppError, match="too many terms: 4"):  # our check, as a message
            client.predict(*form(prompts="a\nb\nc\nd"), api_name="/generate")
        with pytest.raises(AppError, match="99 is greater than maximum value 6"):  # the slider's own bound
            client.predict(*form(steps=99), api_name="/generate")
        # the server lives on, and concurrent requests queue (one runs at a time) and all complete
        pending = [client.submit(*form(images=1, seed=s), api_name="/generate") for s in (0, 1, 2)]
        captions = [job.result(timeout=120)[0][0]["caption"] for job in pending]
        assert captions == ["seed 0", "seed 1", "seed 2"]
    finally:
        demo.close()


def test_space_front_matter_and_pins():
    from huggingface_hub.repocard import metadata_load

    meta = metadata_load(SPACE / "README.md")
    assert meta["sdk"] == "gradio" and (SPACE / meta["app_file"]).is_file()
    assert len(meta["short_description"]) <= 60 and meta["models"]
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", (SPACE / "requirements.txt").read_text(), re.M))
    assert meta["sdk_version"] == pins["gradio"]
    assert f'"gradio=={meta["sdk_version"]}"' in (ROOT / "pyproject.toml").read_text()


@needs_models
def test_space_bundle_runs_from_its_own_folder(tmp_path):
    spec = importlib.util.spec_from_file_location("space_bundle", SPACE / "bundle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(ValueError, match="not shipped"):
        mod.bundle(tmp_path / "x", ["shapes-classifier"])
    dest = mod.bundle(tmp_path / "space", ["shapes-uncond-a"])
    # the learned schedules of the bundled model come along, those that need model B do not
    sched = sorted(p.name for p in (dest / "model_cards" / "schedules-shapes-uncond").glob("*.json"))
    assert sched and all(n.startswith("a-") for n in sched) and "a-unipc-nfe5.json" in sched
    code = (
        "import app; from pipelines import jobs; print(jobs.__file__); print(jobs.shipped_models()); "
        "print(jobs.parse_job({'models': ['shapes-uncond-a'], 'prompts': [], "
        "'schedule': 'model_cards/schedules-shapes-uncond/a-unipc-nfe5.json'}).solver)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], cwd=dest, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    where, models, solver = res.stdout.strip().splitlines()[-3:]
    assert where.startswith(str(dest)) and "shapes-uncond-a" in models and solver == "unipc"


# ---------------------------------------------------------------------- hostile input (issue 23)
def _without(message: str, echoed: str) -> str:
    return message.replace(J.show(echoed), "NAME")


@needs_models
def test_other_checkpoints_are_confined_to_one_folder_with_one_message(app_mod, tmp_path):
    import shutil

    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(CARDS / "shapes-uncond-b", models / "uncond-b")
    (models / "empty").mkdir()  # a folder without a model
    (models / "link-out").symlink_to(CARDS / "shapes-uncond-a")  # a link out of the folder
    (tmp_path / "secret.json").write_text("{}")
    app = app_mod.App(LIMITS, models_dir=models)
    assert app.other_models() == ["uncond-b"]
    job = app.job(*form(models=["shapes-uncond-a"], other="uncond-b", prompts="", operator="or"))
    assert job.models == ["shapes-uncond-a", str(models.resolve() / "uncond-b")]
    hostile = ["/etc", "/no/such/model", str(CARDS / "shapes-text"), "shapes-text", "link-out", "empty", "../models",
               "uncond-b/..", "uncond-b/unet", str(tmp_path / "secret.json"), "owner/hub-model", "~", "a" * 300,
               "uncond-b\x00"]  # fmt: skip
    messages = set()
    for name in hostile:
        with pytest.raises(ValueError, match="other checkpoints: .* is not a model this Space offers") as err:
            app.job(*form(models=["shapes-uncond-a"], other=name, prompts="", operator="or"))
        messages.add(_without(str(err.value), name))
    assert len(messages) == 1, messages  # whatever the reason: the same message (it tells nothing about the files)
    assert "uncond-b" in messages.pop()
    # without a models folder the box takes nothing, with one message too
    bare = app_mod.App(LIMITS, models_dir=None)
    with pytest.raises(ValueError, match="this Space takes no other checkpoints"):
        bare.job(*form(other=str(CARDS / "shapes-text")))


@needs_models
def test_schedule_is_a_choice_and_refusals_look_alike(app_mod, tmp_path):
    app = app_mod.App(LIMITS)
    offered = list(app.schedules)
    assert offered[:5] == ["uniform", "log_snr", "karras", "ays_sd15", "ays_sdxl"]
    learned = "schedules-shapes-uncond/or-unipc-nfe5.json"
    assert learned in offered and all(not os.path.isabs(label) for label in offered)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    shipped_path = str(CARDS / "schedules-shapes-uncond" / "or-unipc-nfe5.json")
    hostile = [str(broken), str(tmp_path / "missing.json"), str(tmp_path), shipped_path, "/etc/passwd", "karras2",
               "../" + learned]  # fmt: skip
    messages = set()
    for value in hostile:
        with pytest.raises(ValueError, match="is not offered") as err:
            app.job(*form(schedule=value))
        messages.add(_without(str(err.value), value))
    assert len(messages) == 1, messages
    # a shipped learned schedule runs from the list: its own steps (the slider is ignored) and solver
    fields = form(models=["shapes-uncond-a", "shapes-uncond-b"], prompts="", operator="or", schedule=learned,
                  guidance=1.0, images=1, steps=6)  # fmt: skip
    job = app.job(*fields)
    nfe = json.loads(Path(shipped_path).read_text())["nfe"]
    assert (job.steps, job.method, job.solver, job.schedule) == (nfe, "ode", "unipc", shipped_path)
    gallery, _fig, summary = app.generate(*fields)
    assert len(gallery) == 1 and f"{nfe} steps ({learned})" in summary and str(CARDS) not in summary


@needs_models
def test_prompt_tokens_are_counted_in_the_model_tokenizer(app_mod):
    app = app_mod.App(LIMITS)
    # one word within the character limit, but 15 tokens for the shipped tokenizer (16 tokens, 14 without the two
    # special ones): the pipeline would cut it silently, the Space refuses it before sampling
    with pytest.raises(gr.Error, match="prompts: prompt 1 is 15 tokens long; the limit is 14 tokens"):
        app.generate(*form(prompts="red," * 7 + "red"))
    with pytest.raises(gr.Error, match="has 80 words, so at least 80 tokens; the limit is 75"):
        app.generate(*form(prompts="a " * 80))  # refused before any model is touched


@needs_models
def test_time_limit_stops_a_request_between_steps(app_mod):
    app = app_mod.App(J.Limits(**{**LIMITS.__dict__, "max_seconds": 0.6}))
    job = app.job(*form(steps=6, images=1))
    app.run(job)  # loads the model (the time limit counts from the request: loading is part of it)

    def slow(k, n):
        time.sleep(0.25)

    with pytest.raises(
        J.TimeLimitExceeded, match=r"ran longer than the limit of 0.6 s \(stopped after step [23] of 6"
    ):
        app.run(job, progress=slow, deadline=J.Deadline(0.6))
    zero = app_mod.App(J.Limits(**{**LIMITS.__dict__, "max_seconds": 0.0}))
    with pytest.raises(gr.Error, match="time limit: this request ran longer than the limit of 0 s"):
        zero.generate(*form())


def test_queue_is_bounded(app_mod):
    """One request runs, `queue_size` wait, the next is refused at once (gradio's own 'Queue is full')."""
    from gradio_client import Client

    class Slow(app_mod.App):
        def generate(self, *fields, progress=None):
            time.sleep(3)
            return [], None, "done"

    app = Slow(LIMITS, queue_size=1)
    demo = app_mod.build_demo(app)
    assert demo._queue.max_size == 1 and demo._queue.default_concurrency_limit == 1
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    try:
        client = Client(url, verbose=False)
        running = client.submit(*form(), api_name="/generate")
        time.sleep(1.0)  # the first one is running now
        waiting = client.submit(*form(), api_name="/generate")
        time.sleep(0.5)
        t0 = time.monotonic()
        refused = client.submit(*form(), api_name="/generate")
        with pytest.raises(Exception, match="[Qq]ueue is full"):
            refused.result(timeout=30)
        assert time.monotonic() - t0 < 1.5
        assert running.result(timeout=30)[2] == "done" and waiting.result(timeout=30)[2] == "done"
    finally:
        demo.close()


# ---------------------------------------------------------------------- the Space as a deployable unit (issue 31)
API_INPUTS = ["models", "other_models", "prompts", "operator", "steps", "schedule", "guidance", "seed", "images",
              "size", "particles", "moves", "loras", "lora_mode", "candidates", "lift", "lift_levels",
              "lift_draws"]  # fmt: skip


def readme_client_code(url: str) -> str:
    """The gradio_client block of examples/space/README.md, pointed at `url`."""
    blocks = re.findall(r"```python\n(.*?)```", (SPACE / "README.md").read_text(), re.S)
    code = next(b for b in blocks if "gradio_client" in b)
    assert '"http://127.0.0.1:7860/"' in code
    return code.replace('"http://127.0.0.1:7860/"', repr(url))


def check_readme_call(url: str) -> None:
    """Run the README's documented call against `url` and check what its comments say."""
    scope: dict = {}
    exec(compile(readme_client_code(url), "examples/space/README.md", "exec"), scope)  # noqa: S102 -- our own doc
    gallery, summary = scope["gallery"], scope["summary"]
    assert [g["caption"] for g in gallery] == ["seed 0", "seed 1"]  # the LoRA call's images
    assert "**and** over 2 term(s), 20 steps" in summary
    assert "| a shape [shapes-lora-purple] |" in summary and "| a shape [shapes-lora-outline] |" in summary
    best, best_summary = scope["best"], scope["best_summary"]  # the best of 2 candidates per image
    assert len(best) == 2 and "Best of 2 candidates per image; kept: " in best_summary
    assert "Lift: `renoise` estimator" in best_summary and "| lift (mean; per image) |" in best_summary


@needs_models
def test_api_inputs_are_named_with_defaults_and_the_readme_call_runs(app_mod):
    from gradio_client import Client

    demo = app_mod.build_demo(app_mod.App())
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    try:
        api = Client(url, verbose=False).view_api(return_format="dict", print_info=False)
        params = api["named_endpoints"]["/generate"]["parameters"]
        assert [p["parameter_name"] for p in params] == API_INPUTS
        assert all(p["parameter_has_default"] for p in params)  # none required: a call names what it changes
        defaults = {p["parameter_name"]: p["parameter_default"] for p in params}
        assert defaults["other_models"] == "" and defaults["loras"] == [] and defaults["models"] == ["shapes-text"]
        assert defaults["candidates"] == 1 and defaults["lift"] == "auto"
        assert defaults["lift_levels"] == "" and defaults["lift_draws"] == 1
        check_readme_call(url)
    finally:
        demo.close()


def _requirement_names(lines) -> dict[str, str]:
    """{normalised distribution name: the whole specifier line} of requirement lines."""
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            name = re.match(r"[A-Za-z0-9._-]+", line)[0]
            out[re.sub(r"[-_.]+", "-", name).lower()] = line.replace(" ", "")
    return out


def test_space_requirements_are_the_projects_with_the_same_ranges():
    """The rule: requirements.txt = pyproject's `dependencies` + the `space` extra, the same specifiers."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    want = _requirement_names([*project["dependencies"], *project["optional-dependencies"]["space"]])
    got = _requirement_names((SPACE / "requirements.txt").read_text().splitlines())
    assert got == want


def test_space_requirements_cover_every_import_of_the_bundle(tmp_path):
    """Every third-party module that the bundle's code imports (app.py, compose/, pipelines/) belongs to a
    distribution that requirements.txt names (peft for the LoRA experts, gradio, matplotlib ...)."""
    import ast
    from importlib.metadata import packages_distributions

    spec = importlib.util.spec_from_file_location("space_bundle", SPACE / "bundle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    dest = mod.bundle(tmp_path / "space", ["shapes-uncond-a"])
    local = {p.name for p in dest.iterdir() if p.is_dir()} | {p.stem for p in dest.glob("*.py")}
    imports: dict[str, str] = {}
    for path in dest.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    imports.setdefault(top, str(path.relative_to(dest)))
    required = _requirement_names((dest / "requirements.txt").read_text().splitlines())
    dists = packages_distributions()
    missing = {}
    for top, where in sorted(imports.items()):
        names = {re.sub(r"[-_.]+", "-", d).lower() for d in dists.get(top, [top])}
        if not names & set(required):
            missing[top] = where
    assert "peft" in imports and "gradio" in imports and not missing, missing


@needs_models
def test_errors_never_show_a_server_path(app_mod, tmp_path, monkeypatch):
    """A LoRA that cannot load: without peft the page names the package (not "does not fit checkpoint"), a corrupt
    file says it cannot be read; neither message shows a server path. Paths a visitor typed are echoed as typed."""
    import shutil
    import sys as _sys

    cards = tmp_path / "cards"
    broken = cards / "shapes-lora-broken"
    shutil.copytree(CARDS / "shapes-lora-purple", broken)
    weights = broken / J.LORA_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:500])  # a truncated upload
    from pipelines import shipped

    monkeypatch.setattr(shipped, "SHIPPED_DIRS", (*shipped.SHIPPED_DIRS, cards))
    app = app_mod.App(LIMITS)
    lora = form(prompts="a shape", images=1) + [4, 0]
    server = [str(ROOT), str(tmp_path), _sys.prefix, "/tmp/", "site-packages"]
    with pytest.raises(gr.Error) as err:
        app.generate(*lora, ["shapes-lora-broken"], app_mod.LORA_COMPOSE)
    text = err.value.message
    assert "cannot read LoRA weights" in text and "does not fit" not in text
    assert not any(s in text for s in server), text
    with monkeypatch.context() as m, pytest.raises(gr.Error) as err:
        m.setitem(_sys.modules, "peft", None)
        app.generate(*lora, ["shapes-lora-purple"], app_mod.LORA_COMPOSE)
    text = err.value.message
    assert "need the 'peft' package" in text and "does not fit" not in text
    assert not any(s in text for s in server), text
    # the scrubber: the Space's folders by public names, other absolute paths hidden, typed ones echoed
    message = f"x {SPACE}/model_cards/a, {_sys.prefix}/lib/site-packages/peft/__init__.py and '/etc/passwd'"
    assert app._public(message, ["/etc/passwd"]) == "x ./model_cards/a, <server path> and '/etc/passwd'"


VENV_TEST = os.environ.get("CI", "").lower() == "true" or os.environ.get("COMPOSE_VENV_TEST") == "1"


@needs_models
@pytest.mark.venv
@pytest.mark.skipif(
    not VENV_TEST,
    reason="installs the bundle's requirements into a fresh virtual environment from PyPI (2-4 min here, 1.6 GB); "
    "runs in CI (CI=true) or with COMPOSE_VENV_TEST=1. test_space_requirements_cover_every_import_of_the_bundle "
    "checks the requirements against the bundle's imports on every run.",
)
def test_bundle_in_a_fresh_virtual_environment_serves_a_lora_request(tmp_path):
    """The Space as deployed: the bundle, a new virtual environment (no system packages) with torch 2.13.0 (the CPU
    build on this machine) and then requirements.txt alone, app.py started from the bundle, and the README's
    gradio_client calls (one with two shipped LoRA experts) answered by that server."""
    from gradio_client import Client

    spec = importlib.util.spec_from_file_location("space_bundle", SPACE / "bundle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    dest = mod.bundle(tmp_path / "space", ["shapes-text"])
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    for args in (["torch==2.13.0"], ["-r", str(dest / "requirements.txt")]):  # torch first: never the CUDA build
        res = subprocess.run([python, "-m", "pip", "install", "-q", *args], env=env, capture_output=True, text=True,
                             timeout=900)  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
    port = free_port()
    log = open(tmp_path / "app.log", "w")
    server = subprocess.Popen([python, "app.py", "--port", str(port)], cwd=dest, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp_path / "app.log").read_text()[-3000:]
            try:
                Client(url, verbose=False)
                break
            except Exception:  # noqa: BLE001 -- not up yet
                assert time.monotonic() < deadline, (tmp_path / "app.log").read_text()[-3000:]
                time.sleep(2)
        check_readme_call(url)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
