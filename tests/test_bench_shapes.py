"""Fast checks of benchmarks/bench_shapes.py: bootstrap intervals, both judges' metrics and agreement, the row list,
the UNet row counter, --resume, and a 2-step run on the shipped models."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("bench_shapes", ROOT / "benchmarks" / "bench_shapes.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)
SHAPES, COLOURS = bench.SHAPES, bench.COLOURS
NEEDED = ["shapes-text", "shapes-text-colour", "shapes-text-shape", "shapes-uncond-a", "shapes-uncond-b"]
have_models = pytest.mark.skipif(
    not all((ROOT / "model_cards" / n).is_dir() for n in [*NEEDED, "shapes-classifier"]),
    reason="shipped shapes models not present",
)


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_n():
    widths = []
    for n in (20, 80, 320):
        v = (np.arange(n) % 10) < 3  # a rate of exactly 0.3
        lo, hi = bench.bootstrap_ci(v, n_boot=2000)
        assert lo <= v.mean() <= hi and lo < hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert widths[2] == pytest.approx(2 * 1.96 * np.sqrt(0.3 * 0.7 / 320), rel=0.2)  # the normal approximation
    v = np.random.default_rng(1).random(50) < 0.5
    assert np.array_equal(bench.bootstrap_ci(v), bench.bootstrap_ci(v))  # fixed seed
    # resampling within strata: two strata of constant outcome leave nothing to vary
    strata = np.repeat([0, 1], 10)
    assert bench.bootstrap_ci(strata == 0, strata).tolist() == [0.5, 0.5]
    assert bench.fmt({"rate": 0.5625, "ci": [0.5, 0.62]}) == "0.56 [0.50, 0.62]"


def verdicts(cs, cc, gs, gc, valid=None) -> dict:
    return {
        "classifier_shape": bench.encode(cs),
        "classifier_colour": bench.encode(cc),
        "classifier_valid": bench.encode(valid if valid is not None else [1] * len(cs)),
        "geometry_shape": bench.encode(gs),
        "geometry_colour": bench.encode(gc),
    }


def test_and_metrics_under_both_judges_with_agreement():
    red, blue, circle, star = COLOURS.index("red"), COLOURS.index("blue"), SHAPES.index("circle"), SHAPES.index("star")
    pairs = [("red", "circle"), ("blue", "star")]
    v = verdicts(
        cs=[circle, circle, star, circle],
        cc=[red, red, blue, blue],
        gs=[circle, -1, star, -1],
        gc=[red, red, blue, -1],
    )
    m = bench.and_metrics(v, pairs, per_pair=2, n_boot=200)
    assert m["classifier"]["both"]["rate"] == 0.75 and m["classifier"]["shape"]["rate"] == 0.75
    assert m["geometry"]["both"]["rate"] == 0.5 and m["geometry"]["colour"]["rate"] == 0.75
    assert m["geometry"]["none"]["rate"] == 0.5
    assert m["agree"]["colour"]["rate"] == 0.75 and m["agree"]["shape"]["rate"] == 0.5
    assert m["agree"]["both"]["rate"] == 0.75  # image 2: C says the pair, G says none
    assert [d["pair"] for d in m["per_pair"]] == ["red circle", "blue star"]
    assert (
        m["per_pair"][0]["geometry"]["both"]["rate"] == 0.5 and m["per_pair"][1]["classifier"]["both"]["rate"] == 0.5
    )
    for r in [m["classifier"]["both"], m["agree"]["shape"], m["per_pair"][1]["geometry"]["shape"]]:
        assert r["ci"][0] <= r["rate"] <= r["ci"][1]


def test_or_metrics_and_coin_flip():
    circle, square, star = SHAPES.index("circle"), SHAPES.index("square"), SHAPES.index("star")
    v = verdicts(cs=[circle, square, star, star], cc=[0, 1, 2, 3], gs=[circle, -1, star, square],
                 gc=[0, 1, 2, -1], valid=[1, 0, 1, 1])  # fmt: skip
    m = bench.or_metrics(v, n_boot=200)
    assert m["classifier"]["half_a"]["rate"] == 0.5 and m["classifier"]["valid"]["rate"] == 0.75
    assert m["geometry"]["half_a"]["rate"] == 0.5 and m["geometry"]["valid"]["rate"] == 0.5
    assert m["agree"]["shape"]["rate"] == 0.5 and m["agree"]["half_a"]["rate"] == 0.5
    a = verdicts([0] * 4, [0] * 4, [0] * 4, [0] * 4)
    b = verdicts([3] * 4, [1] * 4, [-1] * 4, [1] * 4)
    assert bench.coin_flip_verdicts(a, b)["geometry_shape"] == "0-0-"
    ia, ib = torch.zeros(6, 3, 2, 2), torch.ones(6, 3, 2, 2)
    mixed = bench.coin_flip(ia, ib)
    assert mixed[0::2].eq(0).all() and mixed[1::2].eq(1).all() and ia.eq(0).all()


def test_rows_have_sde_and_ode_for_every_operator():
    rows = bench.and_rows(particles=3)
    names = ["joint prompt", "average of scores", "product (Composable Diffusion)", "SuperDiff AND", "product_smc"]
    for pipe in ("text", "experts", "flow"):
        for name in names:
            if pipe == "experts" and name == "joint prompt":
                continue  # the joint prompt only on the models that know both words
            got = {r["method"]: r for r in rows if r["pipe"] == pipe and r["label"].startswith(name + " (")}
            assert set(got) == {"sde", "ode"}, (pipe, name)
            assert got["sde"]["label"].endswith("(SDE)" if name != "product_smc" else "(SDE, 3 particles)")
            assert "ODE, hutchinson_fd, euler" in got["ode"]["label"]
    smc = {r["method"]: r for r in rows if r["kw"].get("operator") == "product_smc" and r["pipe"] == "text"}
    assert smc["sde"]["refused"] is None and smc["sde"]["kw"]["num_particles"] == 3
    refusal = bench.smc_refusal(3, "ode")  # the pipeline's own answer: today the particle weights need the SDE
    assert smc["ode"]["refused"] == refusal
    ors = bench.or_rows(divergence="hutchinson", solver="dpm2m", probes=2)
    assert len(ors) == 12 and {r["method"] for r in ors} == {"sde", "ode"}
    assert sum("coin flip" in r["label"] for r in ors) == 2
    ode = [r for r in ors if r["method"] == "ode" and r["kw"]]
    assert all(r["kw"]["divergence"] == "hutchinson" and r["kw"]["solver"] == "dpm2m" for r in ode)
    args = bench.parse_args(["--rows", "ODE", "experts", "--particles", "2"])
    keys = [bench.row_key(s, r) for s, r in bench.build_rows(args)]
    assert keys and all("(ODE" in k or "experts" in k for k in keys)
    assert any("(SDE)" in k for k in keys) and not any("model A alone (SDE)" in k for k in keys)
    args = bench.parse_args([])
    assert (args.steps, args.images_per_pair, args.or_images, args.particles) == ([50], 16, 256, 4)
    assert bench.parse_args(["--images", "3"]).images_per_pair == 3  # the old spelling
    assert len(bench.ALL_PAIRS) == 16
    for bad in (["--pairs", "0"], ["--resume"], ["--particles", "1"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_unet_counter_counts_calls_and_rows():
    class Net(torch.nn.Module):
        def forward(self, sample, timestep, **kw):
            return sample

    class Model:
        def __init__(self, network):
            self.network = network

    class Pipe:
        def __init__(self, nets):
            self.models = [Model(n) for n in nets]

    a, b = Net(), Net()
    pipe = Pipe([a, b, a])  # a checkpoint used twice is counted once per call
    with bench.UNetCounter(pipe) as c:
        for _ in range(3):
            a(torch.zeros(4, 1), 0)
        b(sample=torch.zeros(5, 1), timestep=0)
    assert (c.calls, c.rows) == (4, 17)
    a(torch.zeros(4, 1), 0)  # hooks are gone after the block
    assert (c.calls, c.rows) == (4, 17)


@have_models
def test_nfe_counter_on_a_tiny_run():
    torch.set_num_threads(1)
    pipe = bench.load(["shapes-uncond-a"])
    with bench.UNetCounter(pipe) as c:
        pipe(generator=torch.Generator().manual_seed(0), batch_size=2, num_inference_steps=2, output_type="pt")
    assert c.rows == 2 * c.calls  # one UNet, both images in every call
    assert c.calls in (2, 3)  # N steps (+ a final denoising in older pipelines): counted, not assumed
    text = bench.load(["shapes-text"])
    with bench.UNetCounter(text) as c:
        out = text(prompt=["a red shape", "a circle"], operator="product_smc", num_particles=2, guidance_scale=4.0,
                   generator=torch.Generator().manual_seed(0), batch_size=2, num_inference_steps=2,
                   output_type="pt")  # fmt: skip
    # the pipeline's own count: evaluations per particle x 2 particles x (2 terms + the unconditional row)
    assert c.rows / 2 == pytest.approx(float(out.evaluations.double().mean()) * 2 * 3)
    flow = bench.load(["shapes-text-flow"])  # a transformer, called with hidden_states=
    with bench.UNetCounter(flow) as c:
        flow(prompt="a red shape", guidance_scale=4.0, generator=torch.Generator().manual_seed(0), batch_size=2,
             num_inference_steps=3, output_type="pt")  # fmt: skip
    assert (c.calls, c.rows) == (3, 3 * 2 * 2)  # 3 steps, one call each: 2 images x (prompt + unconditional)


def test_resume_skips_rows_already_in_the_json(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run_row(row, steps, pipes, judges, args):
        calls.append(bench.row_key(steps, row))
        n = args.or_images
        v = verdicts([len(calls) % 4] * n, [0] * n, [-1] * n, [0] * n)
        return dict(images=n, nfe_per_image=2.0 * steps, unet_calls_per_image=1.0, sec_per_image=0.01,
                    max_abs_kappa=1.0, verdicts=v), np.zeros((n, 24, 24, 3), np.uint8)  # fmt: skip

    monkeypatch.setattr(bench, "run_row", fake_run_row)
    monkeypatch.setattr(bench, "load", lambda names, device="cpu": object())
    out = tmp_path / "r.json"
    base = ["--skip-and", "--or-images", "4", "--steps", "2", "--json", str(out), "--bootstrap", "100"]
    bench.main([*base, "--rows", "model A alone (SDE)"])
    assert calls == ["2 steps | shapes-uncond-a | model A alone (SDE)"]
    first = json.loads(out.read_text())["or"][0]
    bench.main([*base, "--rows", "model A alone", "model B alone", "coin flip", "--resume", "--grid",
                str(tmp_path / "g.png")])  # fmt: skip
    assert "1 already in" in capsys.readouterr().err
    assert len(calls) == 4 and calls.count(calls[0]) == 1  # A (ODE), B (SDE), B (ODE) ran; A (SDE) did not
    res = json.loads(out.read_text())
    keys = [r["key"] for r in res["or"]]
    assert len(keys) == 6 and keys[0] == first["key"] and res["or"][0] == first
    coin = next(r for r in res["or"] if r["key"] == "2 steps | A / B | coin flip A / B (upper bound) (SDE)")
    assert coin["verdicts"]["classifier_shape"] == "1313"  # even images from A (SDE, 1st call), odd from B (3rd)
    assert coin["nfe_per_image"] == 4.0
    assert (tmp_path / "g.png").is_file() and Path(str(out) + ".tiles.npz").is_file()
    bench.main([*base, "--resume"])  # every other OR row now; those done stay
    assert len(calls) == 10 and len(json.loads(out.read_text())["or"]) == 12
    with pytest.raises(SystemExit, match="other or_images"):
        bench.main([*base[:1], "--or-images", "8", *base[3:], "--resume"])


@have_models
def test_two_step_run_on_shipped_models(tmp_path, capsys):
    out, grid = tmp_path / "b.json", tmp_path / "grid.png"
    rows = ["joint prompt", "text | product_smc", "model A alone (SDE)", "model B alone (SDE)", "coin flip A / B "
            "(upper bound) (SDE)"]  # fmt: skip
    bench.main(["--pairs", "1", "--images-per-pair", "2", "--or-images", "2", "--steps", "2", "--bootstrap", "200",
                "--json", str(out), "--grid", str(grid), "--rows", *rows])  # fmt: skip
    printed = capsys.readouterr().out
    assert "| steps | models | method | NFE/img | s/img | both C | both G |" in printed
    assert "Per pair, the share that is both (geometric judge):" in printed
    assert "| steps | method | NFE/img | s/img | half A C | half A G |" in printed
    res = json.loads(out.read_text())
    joint = ["joint prompt (SDE)", "joint prompt (ODE, hutchinson_fd, euler)"]
    assert [r["method"] for r in res["and"]] == [*joint, *joint, "product_smc (SDE, 4 particles)", *joint]
    ceiling = "shapes-text-joint (ceiling)"
    assert [r["models"] for r in res["and"]] == [ceiling] * 2 + ["shapes-text"] * 3 + ["shapes-text-flow"] * 2
    assert [r["method"] for r in res["refused"]] == ["product_smc (ODE, hutchinson_fd, euler, 4 particles)"]
    assert len(res["or"]) == 3
    assert "Judge sanity: share of images on which the two judges give the same shape" in printed
    assert all("agree" in d for r in res["and"] for d in r["per_pair"])
    _, _, joint_sde, joint_ode, smc, flow_sde, flow_ode = res["and"]
    assert joint_sde["nfe_per_image"] in (4, 6)  # (1 term + 1 unconditional) x (2 steps, + 1 final in old pipelines)
    assert flow_sde["nfe_per_image"] == 4 and flow_ode["nfe_per_image"] > 4  # the transformer's rows, counted
    assert joint_ode["nfe_per_image"] > joint_sde["nfe_per_image"]  # the probe points of the divergence
    assert smc["nfe_per_image"] == pytest.approx(smc["smc"]["evaluations_per_particle"] * 4 * 3)
    for r in res["and"]:
        for j in ("classifier", "geometry"):
            b = r[j]["both"]
            assert 0 <= b["ci"][0] <= b["rate"] <= b["ci"][1] <= 1
        assert len(r["verdicts"]["geometry_shape"]) == 2 and r["sec_per_image"] > 0
    from PIL import Image

    # 10 rows of 2 tiles (24 px at scale 3 + a 5 px bar + 1 + 24 px of text) under a 4-line legend; 520 px wide
    assert Image.open(grid).size == (520, 3 + 4 * 14 + 10 * (14 + 102 + 3))
