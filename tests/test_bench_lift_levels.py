"""benchmarks/bench_lift_levels.py: a level set's lift is the pipeline's quadrature of the per-level lifts, the
report finds the level that carries a concept, and a tiny run on the shipped models records every level."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SPEC = importlib.util.spec_from_file_location("bench_lift_levels", ROOT / "benchmarks" / "bench_lift_levels.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def test_a_level_set_is_the_midpoint_rule_over_its_levels():
    grid = [2.0, 1.0, 0.0, -2.0]
    per = np.random.default_rng(0).normal(size=(4, 1, 5, 2))
    one = bench.set_lift(per, grid, [1.0], 0)
    np.testing.assert_array_equal(one, per[1, 0])  # one level: width 1
    # levels 2, 0, -2: cells [3, 1], [1, -1], [-1, -3]: widths 2 each
    np.testing.assert_allclose(bench.set_lift(per, grid, [0.0, 2.0, -2.0], 0), 2 * (per[0, 0] + per[2, 0] + per[3, 0]))


def test_the_report_finds_the_level_that_carries_the_concept():
    rng = np.random.default_rng(1)
    n, grid = 64, [1.0, -1.0]
    has = np.tile([True, False, False, False], n // 4)  # one image of every group of 4 shows the second concept
    per = rng.normal(size=(2, 2, n, 2))
    per[0, :, :, 1] += 10.0 * has  # level 1 sees it, level -1 is noise
    verdict = dict(first=np.ones(n, bool), second=has, both=has)
    rep = bench.report(per, verdict, np.repeat([0, 1], n // 2), grid, ["1", "-1"])
    assert rep["levels"]["second"]["1"]["one_draw"] == 1.0
    assert abs(rep["levels"]["second"]["-1"]["one_draw"] - 0.5) < 0.25
    assert rep["plain"] == 0.25 and rep["oracle best-of-4"] == 1.0 and rep["pairs"] == {"first": 0, "second": 2}
    assert rep["sets"]["1"]["best-of-4 mean"] == 1.0  # the informative level picks the one good image of each group
    assert rep["sets"]["-1"]["best-of-4 mean"] < 0.6


def test_a_set_of_several_draws_averages_their_lifts_and_reads_the_concept_better():
    assert bench.parse_set(" -1,-2x2") == ([-1.0, -2.0], 2) and bench.parse_set("3,2") == ([3.0, 2.0], 1)
    rng = np.random.default_rng(2)
    n, grid = 256, [0.0]
    has = np.tile([True, False, False, False], n // 4)
    per = rng.normal(size=(1, 4, n, 2)) * 2.0
    per[0, :, :, 1] += 1.5 * has  # every draw sees the concept through the same noise level
    verdict = dict(first=np.ones(n, bool), second=has, both=has)
    rep = bench.report(per, verdict, np.zeros(n, int), grid, ["0", "0x2", "0x4"])
    aucs = [rep["sets"][s]["auc second"] for s in ("0", "0x2", "0x4")]
    # the mean of D draws has 1/D of the noise's variance: the AUC is Phi(1.5 / (2 sqrt(2 / D))) for D = 1, 2, 4
    def phi(z: float) -> float:
        return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))

    for D, a in zip((1, 2, 4), aucs, strict=True):
        assert abs(a - phi(1.5 / (2.0 * math.sqrt(2.0 / D)))) < 0.06
    assert aucs[0] < aucs[1] < aucs[2]


def test_bad_sets_are_refused_before_any_sampling():
    with pytest.raises(SystemExit):
        bench.parse_args(["--rows", "merge", "--grid", "1", "0", "--sets", "1,2"])  # 2 is not in the grid
    with pytest.raises(SystemExit):
        bench.parse_args(["--rows", "merge", "--sets", "1;2"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--rows", "merge", "--images", "6"])  # groups of 4 would cross pairs
    with pytest.raises(SystemExit):
        bench.parse_args(["--rows", "merge", "--grid", "1", "--sets", "1x4", "--draws", "2"])  # 4 draws of 2
    with pytest.raises(SystemExit):
        bench.parse_args(["--rows", "merge", "--grid", "1", "--sets", "1x0"])


@pytest.mark.skipif(not (ROOT / "model_cards" / "shapes-text").is_dir(), reason="shipped shapes models not present")
def test_a_tiny_run_records_every_level_of_every_image(tmp_path):
    path = tmp_path / "lifts.npz"
    res = bench.main(["--testbed", "text", "--rows", "text | and", "--pairs", "1", "--images", "4", "--steps", "2",
                      "--grid", "1", "-1", "--sets", "1,-1", "1,-1x2", "--draws", "2",
                      "--save-lifts", str(path)])  # fmt: skip
    row = res["rows"]["text | and"]
    saved = np.load(path)
    assert saved["lifts"].shape == (2, 2, 4, 2) and list(saved["grid"]) == [1.0, -1.0]
    assert saved["geometry/both"].shape == (4,) and list(saved["strata"]) == [0, 0, 0, 0]
    assert row["images"] == 4 and set(row["judges"]) == {"classifier", "geometry"}
    assert set(row["judges"]["classifier"]["levels"]["first"]) == {"1", "-1"}
    import pipelines.compose_pipeline as cp
    from pipelines.verify import renoise_lifts

    assert cp.renoise_lifts is renoise_lifts  # the wrapper is gone after the run
