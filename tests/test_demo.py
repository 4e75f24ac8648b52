"""The main demo (examples/demo.py) on the shipped shapes models: it runs, writes its grid, and fails clearly."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples import demo  # noqa: E402
from examples.shapes.data import COLOURS, SHAPES  # noqa: E402


def test_demo_runs_and_writes_a_labelled_grid(tmp_path, capsys):
    out = tmp_path / "demo.png"
    demo.main(["--out", str(out), "--images", "2", "--steps", "3"])
    printed = capsys.readouterr().out
    from PIL import Image

    image = np.asarray(Image.open(out).convert("RGB"))
    # seven rows of two 24x24 tiles at scale 3, each under a 14-pixel label, 2-pixel padding
    assert image.shape == (2 + 7 * (72 + 14 + 2), 2 + 2 * (72 + 2), 3)
    tiles = image[2 + 14 : 2 + 14 + 72, 2 : 2 + 72].astype(float)
    assert tiles.std() > 1.0, "the first tile is flat: nothing was drawn"
    rows = [line for line in printed.splitlines() if line.startswith(("ceiling", "joint", "product", "the same", "AND",
                                                                       "OR"))]  # fmt: skip
    assert len(rows) == 7 and "flow transformer" in rows[6] and "best of 4" in rows[3]
    for line in rows:
        figures = [float(v) for v in line.split()[-7:]]  # red circle both, both G, half A, valid, s/img
        assert all(0.0 <= v <= 1.0 for v in figures[:6]) and figures[6] > 0


def test_demo_same_seed_same_grid(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for path in (a, b):
        demo.main(["--out", str(path), "--images", "1", "--steps", "2", "--seed", "3"])
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


@pytest.mark.parametrize("flag", ["--images", "--steps"])
def test_demo_refuses_non_positive_counts(flag, capsys):
    with pytest.raises(SystemExit):
        demo.main([flag, "0"])
    assert flag in capsys.readouterr().err


def test_missing_model_names_folder_and_restore(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "CARDS", tmp_path)
    with pytest.raises(SystemExit) as e:
        demo.load(["shapes-uncond-a"])
    msg = str(e.value)
    assert str(tmp_path / "shapes-uncond-a") in msg
    assert "git checkout --" in msg and "train_unconditional.py --shapes circle square" in msg
    with pytest.raises(SystemExit, match="its card gives the command"):  # a folder the demo has no recipe for
        demo.model_dir("shapes-text-shape-snapshot")


def test_corrupt_model_names_folder_and_restore(tmp_path, monkeypatch):
    broken = tmp_path / "shapes-uncond-a"
    shutil.copytree(ROOT / "model_cards" / "shapes-uncond-a", broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated download
    monkeypatch.setattr(demo, "CARDS", tmp_path)
    with pytest.raises(SystemExit) as e:
        demo.load(["shapes-uncond-a"])
    msg = str(e.value)
    assert str(broken) in msg and "git checkout --" in msg


def test_unknown_words_are_tokenised_not_fatal():
    """Words outside the shipped vocabulary map to the tokenizer's unknown token; sampling still runs."""
    pipe = demo.load(["shapes-text"])
    tok = pipe.tokenizer
    ids = tok("a purple dodecahedron", padding="max_length", max_length=tok.model_max_length).input_ids
    assert tok.unk_token_id in ids
    out = pipe(
        prompt=["a purple dodecahedron", "a circle"],
        operator="and",
        num_inference_steps=2,
        batch_size=1,
        output_type="pt",
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 3, 24, 24) and torch.isfinite(out.images).all()
    assert "purple" not in COLOURS and "dodecahedron" not in SHAPES


def test_demo_prints_progress_per_row_with_the_time_left(tmp_path, capsys):
    """Slow must never look like hung (issue 24.6): every row says its step, its time and the time left, on stderr;
    stdout keeps the table alone."""
    demo.main(["--out", str(tmp_path / "d.png"), "--images", "1", "--steps", "3"])
    captured = capsys.readouterr()
    err = captured.err
    assert "[demo] loading the shipped models" in err and "sampling 7 rows x 1 images x 3 steps" in err
    assert "timing one step of each row" in err and "(an estimate from one timed step per row" in err
    for i in range(1, 8):
        assert f"[demo] row {i}/7 " in err and f"[demo] row {i}/7 done in " in err
    assert err.count("s left") >= 4  # after every row but the last, and before rows 2-5
    assert "[demo]" not in captured.out and len(captured.out.splitlines()) == 1 + 7 + 1  # header, rows, "wrote"
    demo.main(["--out", str(tmp_path / "q.png"), "--images", "1", "--steps", "2", "--no-progress"])
    assert "[demo]" not in capsys.readouterr().err


def test_progress_estimate_is_planned_per_row_and_smoothed(monkeypatch):
    """The estimate plans each row by its measured seconds per step (rows of different cost), is exact while steps
    take what was measured, moves little for one step ten times slower or a short burst of them (the old one swung
    91 s -> 936 s -> 246 s), and follows a lasting slowdown as it goes on."""
    import io

    now = [0.0]
    monkeypatch.setattr(demo.time, "perf_counter", lambda: now[0])
    stream = io.StringIO()
    p = demo.Progress([1.0, 3.0], steps=20, stream=stream, every=0.0, prior_steps=10)  # prior: 20 planned seconds
    assert p.seconds_left() == 80.0  # 20 steps of 1 s, then 20 of 3 s
    assert "about 80 s left (an estimate)" in p.left()
    p.start_row("one")
    estimates = []
    for k, dt in enumerate([1.0] * 5 + [10.0] + [1.0] * 4 + [10.0] * 3 + [1.0] * 7, start=1):  # busy moments
        now[0] += dt
        p.step(k)
        estimates.append(p.seconds_left())
    assert estimates[4] == pytest.approx(75.0)  # on plan: exact
    assert estimates[5] / estimates[4] == pytest.approx((15 + 20) / (6 + 20) * 74 / 75)  # one 10x step: 1.33x
    spans = [b / a for a, b in zip(estimates, estimates[1:], strict=False)]
    assert max(spans) < 1.5 and max(estimates) / min(estimates[:10]) < 3  # a burst of three: under 3x in all
    p.end_row()
    assert stream.getvalue().splitlines()[-1].startswith("[demo] row 1/2 done in 56.0 s, about ")
    p.start_row("two")
    for k in range(1, 21):  # a lasting slowdown: every step twice its plan
        now[0] += 6.0
        p.step(k)
    assert 1.7 < p.ratio < 2.0 and p.seconds_left() == 0.0


def test_demo_threads_option(tmp_path, capsys):
    demo.main(["--out", str(tmp_path / "t.png"), "--images", "1", "--steps", "2", "--threads", "2"])
    assert torch.get_num_threads() == 2
    assert "on 2 thread(s): about " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--threads", "0"])
