"""Fast checks of benchmarks/bench_verify.py: the AUC and the selections against hand-made verdicts, and a 2-step run
on the shipped models that resumes, keeps the plot's data in the JSON and reads it back."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SPEC = importlib.util.spec_from_file_location("bench_verify", ROOT / "benchmarks" / "bench_verify.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)
have_models = pytest.mark.skipif(
    not all((ROOT / "model_cards" / n).is_dir() for n in ("shapes-text", "shapes-text-joint", "shapes-classifier")),
    reason="shipped shapes models not present",
)


def test_auc_is_the_probability_a_positive_outranks_a_negative():
    assert bench.auc(np.array([3.0, 2.0, 1.0, 0.0]), np.array([True, True, False, False])) == 1.0
    assert bench.auc(np.array([0.0, 1.0, 2.0, 3.0]), np.array([True, True, False, False])) == 0.0
    assert bench.auc(np.array([1.0, 1.0]), np.array([True, False])) == 0.5  # ties count half
    assert np.isnan(bench.auc(np.array([1.0, 2.0]), np.array([True, True])))  # one class: undefined


def test_selections_pick_by_the_smallest_lift_and_bound_by_the_oracle():
    args = bench.parse_args(["--testbeds", "text", "--pairs", "1", "--images", "2", "--candidates", "2"])
    # 2 images x 2 candidates; candidate 1 of image 0 and candidate 0 of image 1 have both concepts
    both = np.array([False, True, True, False])
    lift = torch.tensor([[5.0, -1.0], [2.0, 3.0], [1.0, 1.0], [9.0, 0.5]], dtype=torch.float64)
    rec = dict(images=4, _renoise=lift, _tracked=lift[[1, 0, 3, 2]], _method=bench.methods(args)[0])
    v = {"judge": dict(both=both, first=np.array([True, False, True, False]), second=both)}
    sel = bench.selections(rec, v, args)["judge"]
    assert sel["plain"]["rate"] == 0.5
    assert sel["best-of-2 by renoise lift"]["rate"] == 1.0  # min lifts (-1, 2) and (1, 0.5): picks 1 and 0
    assert sel["best-of-2 by tracked lift"]["rate"] == 0.0  # the same lifts on swapped candidates pick the others
    assert sel["oracle best-of-2"]["rate"] == 1.0
    assert sel["best-of-2 by renoise lift, zmin"]["rate"] == 0.5  # standardised, both images tie: the first is kept
    assert sel["best-of-2 by renoise lift, mean"]["rate"] == 0.5  # means (2, 2.5) and (1, 4.75): picks 1 and 1
    assert sel["detection"]["renoise second"]["auc"] == 1.0  # second lifts 3 and 1 against -1 and 0.5
    assert sel["detection"]["renoise first"]["auc"] == 0.25  # first lifts 5 and 1 against 2 and 9: 1 of 4 pairs


@have_models
def test_a_two_step_run_resumes_and_plots_from_the_json(tmp_path):
    out, png = tmp_path / "v.json", tmp_path / "v.png"
    argv = ["--testbeds", "text", "--pairs", "1", "--images", "1", "--candidates", "2", "--steps", "2",
            "--bootstrap", "50", "--rows", "product", "--json", str(out), "--plot", str(png)]  # fmt: skip
    res = bench.main(argv)
    rows = {r["key"]: r for r in res["rows"]}
    assert list(rows) == ["text | product"]
    r = rows["text | product"]
    assert r["images"] == 2 and r["verification_rows_per_image"] == 3 * len(bench.parse_args([]).levels)
    assert set(r["selection"]) == {"classifier", "geometry"}
    assert len(r["plot"]["lift"]) == 2 and len(r["plot"]["first"]) == 2 and png.is_file()
    png.unlink()
    again = bench.main([*argv, "--resume"])  # nothing left to sample; the plot comes from the JSON
    assert again["rows"] == json.loads(out.read_text())["rows"] and png.is_file()
    with pytest.raises(SystemExit, match="other"):
        bench.main([*argv[:-4], "--steps", "3", "--json", str(out), "--resume"])


@have_models
def test_the_equal_rows_baseline_costs_what_a_verified_image_does(tmp_path):
    """--equal-rows: one plain sample per image at the steps whose network rows equal K x (sampling + lift rows)."""
    argv = ["--testbeds", "text", "--pairs", "1", "--images", "1", "--candidates", "2", "--steps", "2",
            "--bootstrap", "50", "--rows", "product", "--equal-rows"]  # fmt: skip
    res = bench.main(argv)
    r = res["rows"][0]
    verified = 2 * r["rows_per_image"]  # K candidates, each sampled and checked
    assert r["equal_rows_steps"] == round(verified / 3)  # the product of two prompts with CFG: 3 rows a step
    assert r["equal_rows_rows_per_image"] == pytest.approx(verified)
    assert set(r["equal_rows"]) == {"classifier", "geometry"}
    assert f"({r['equal_rows_steps']} steps)" in bench.markdown(res)


@have_models
def test_equal_rows_on_resume_fills_in_the_rows_that_lack_it(tmp_path):
    out = tmp_path / "v.json"
    argv = ["--testbeds", "text", "--pairs", "1", "--images", "1", "--candidates", "2", "--steps", "2",
            "--bootstrap", "50", "--rows", "product", "--json", str(out)]  # fmt: skip
    first = bench.main(argv)["rows"][0]
    assert "equal_rows" not in first
    again = bench.main([*argv, "--resume", "--equal-rows"])["rows"]
    assert len(again) == 1 and again[0]["plot"] == first["plot"]  # the row kept (its lifts), not resampled
    assert again[0]["equal_rows_rows_per_image"] == pytest.approx(2 * first["rows_per_image"])
    assert "equal_rows" in json.loads(out.read_text())["rows"][0]


@have_models
def test_steered_rows_on_resume_are_added_with_their_cost(tmp_path):
    """--steer on a resumed run: the kept row gains the steered rate and the rows it cost (K samplings, a renoise
    check per candidate at each check and at the end), not a resampled plain row."""
    from pipelines.verify import steering_steps

    out = tmp_path / "v.json"
    argv = ["--testbeds", "text", "--pairs", "1", "--images", "1", "--candidates", "2", "--steps", "4",
            "--bootstrap", "50", "--rows", "product", "--json", str(out)]  # fmt: skip
    first = bench.main(argv)["rows"][0]
    res = bench.main([*argv, "--resume", "--steer", "1.0"])
    row = res["rows"][0]
    assert json.dumps([row["plot"], row["selection"]]) == json.dumps([first["plot"], first["selection"]])  # (NaN AUCs)
    assert set(row["steered"]) == {"classifier", "geometry"} and row["steer"] == 1.0
    sampling = first["rows_per_image"] - first["verification_rows_per_image"]  # one candidate's sampling rows
    checks = first["verification_rows_per_image"]  # one renoise lift of one candidate
    n_checks = len(steering_steps(4)) + 1  # the checks on the way and the final choice
    assert row["steered_rows_per_image"] == pytest.approx(2 * sampling + 2 * checks * n_checks)
    assert f"({row['steered_rows_per_image']:.0f} rows, steer 1.0)" in bench.markdown(res)
    assert "text | product/steered/classifier/both" in np.load(bench.cands_path(out))


def test_pooled_rates_are_those_of_all_candidates_of_the_runs(tmp_path):
    """Two hand-made runs (8 candidates each, K = 2, 2 pairs): the pooled plain, best-of-2 and oracle rates and the
    equal-rows rate are those of the 16 candidates, and every run's pairs stay strata of their own."""
    key = "text | and"
    paths = []
    for i, (seed, both) in enumerate([(0, [1, 0, 0, 0, 1, 1, 0, 0]), (2, [0, 1, 1, 1, 1, 1, 0, 1])]):
        args = bench.parse_args(["--testbeds", "text", "--pairs", "2", "--images", "2", "--candidates", "2",
                                 "--seed", str(seed)])  # fmt: skip
        config = {k: getattr(args, k) for k in bench.COMPARED} | {"testbeds": ["text"], "steer": 0.0}
        row = {"key": key, "testbed": "text", "label": "and", "images": 8, "rows_per_image": 100.0 + i,
               "verification_rows_per_image": 12.0, "equal_rows": {}, "equal_rows_steps": 136}  # fmt: skip
        path = tmp_path / f"{i}.json"
        path.write_text(json.dumps({"config": config, "rows": [row]}))
        b = np.array(both, bool)
        lift = np.where(b[:, None], 1.0, -1.0) * np.array([[1.0, 2.0]])  # the lift ranks the good candidates first
        np.savez(bench.cands_path(path), **{f"{key}/renoise": lift, f"{key}/strata": np.repeat([0, 1], 4),
                 f"{key}/judge/both": b, f"{key}/judge/first": b, f"{key}/judge/second": b,
                 f"{key}/equal/strata": np.repeat([0, 1], 2), f"{key}/equal/judge/both": b[:4]})  # fmt: skip
        paths.append(str(path))
    out = bench.pool(paths, bench.parse_args(["--bootstrap", "50"]))
    (row,) = out["rows"]
    sel = row["selection"]["judge"]
    assert row["images"] == 16 and row["rows_per_image"] == 100.5
    assert sel["plain"]["rate"] == 9 / 16
    assert sel["oracle best-of-2"]["rate"] == 6 / 8  # groups (1,0) (0,0) (1,1) (0,0) | (0,1) (1,1) (1,1) (0,1)
    assert sel["best-of-2 by renoise lift"]["rate"] == 6 / 8  # the lift finds every group's good candidate
    assert row["equal_rows"]["judge"]["rate"] == 4 / 8
    assert out["config"]["images"] == 4 and out["config"]["seed"] == "0+2"


@have_models
def test_runs_of_other_seeds_pool_into_one_table(tmp_path):
    """Every candidate's lifts and verdicts are saved beside the JSON; --pool joins runs of the same options and
    other seeds: its rates are the candidates' rates over both runs, and overlapping seeds or other options are
    refused."""
    common = ["--testbeds", "text", "--pairs", "1", "--images", "2", "--candidates", "2", "--steps", "2",
              "--bootstrap", "50", "--rows", "text | and", "--equal-rows"]  # fmt: skip
    a, b, c = (tmp_path / f"{x}.json" for x in "abc")
    ra = bench.main([*common, "--seed", "0", "--json", str(a)])["rows"][0]
    rb = bench.main([*common, "--seed", "1", "--json", str(b)])["rows"][0]
    saved = np.load(bench.cands_path(a))
    assert saved["text | and/renoise"].shape == (4, 2) and saved["text | and/equal/geometry/both"].shape == (2,)
    pooled = bench.main(["--pool", str(a), str(b), "--json", str(c), "--bootstrap", "50"])
    (row,) = pooled["rows"]
    assert row["images"] == 8 and pooled["config"]["seed"] == "0+1"
    assert json.loads(c.read_text())["config"] == pooled["config"]  # written to --json
    for j in ("classifier", "geometry"):
        for name in ("plain", "oracle best-of-2", "best-of-2 by renoise lift"):
            mean = (ra["selection"][j][name]["rate"] + rb["selection"][j][name]["rate"]) / 2  # equal sizes
            assert row["selection"][j][name]["rate"] == pytest.approx(mean)
        eq = (ra["equal_rows"][j]["rate"] + rb["equal_rows"][j]["rate"]) / 2
        assert row["equal_rows"][j]["rate"] == pytest.approx(eq)
    with pytest.raises(SystemExit, match="overlap"):
        bench.main(["--pool", str(a), str(a)])
    bench.main([*common[:-1], "--seed", "5", "--steps", "3", "--json", str(c)])
    with pytest.raises(SystemExit, match="other \\['steps'\\]"):
        bench.main(["--pool", str(a), str(c)])
    bench.cands_path(b).unlink()
    with pytest.raises(SystemExit, match="cands.npz is missing"):
        bench.main(["--pool", str(a), str(b)])
