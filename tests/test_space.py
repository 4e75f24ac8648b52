"""The Space demo (examples/space/): the generation function against direct pipeline calls, every bad input as a
message, the app through gradio_client against a local launch, the Space front matter and the Space bundle."""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
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
LIMITS = J.Limits(max_steps=6, max_images=3, max_terms=3, max_side=48)


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
        (dict(models=[], other="/no/such/model"), "models: cannot read '/no/such/model'"),
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
    assert sched and all(n.startswith("a-") for n in sched) and "a-unipc-nfe4.json" in sched
    code = (
        "import app; from pipelines import jobs; print(jobs.__file__); print(jobs.shipped_models()); "
        "print(jobs.parse_job({'models': ['shapes-uncond-a'], 'prompts': [], "
        "'schedule': 'model_cards/schedules-shapes-uncond/a-unipc-nfe4.json'}).solver)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], cwd=dest, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    where, models, solver = res.stdout.strip().splitlines()[-3:]
    assert where.startswith(str(dest)) and "shapes-uncond-a" in models and solver == "unipc"
