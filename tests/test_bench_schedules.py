"""Smoke run of benchmarks/bench_schedules.py with tiny settings: the tables hold what they claim."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("bench_schedules", ROOT / "benchmarks" / "bench_schedules.py")
bench_schedules = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench_schedules)


def test_bench_schedules_quick(tmp_path, capsys):
    out = tmp_path / "b.json"
    # --test 0 reports on the selection noises, where learning (which starts at the best hand-made grid and keeps
    # the best iterate) can never be worse; the default reports on disjoint test noises, where it can
    res = bench_schedules.main(["--quick", "--setups", "A", "--solvers", "dpm2m", "--test", "0", "--json", str(out)])
    text = capsys.readouterr().out
    assert "| A | dpm2m | 4 |" in text and "Spearman" in text
    row = res["grids"][0]
    assert row["learned"] <= row[row["best_hand"]] + 1e-12
    actions = {r["schedule"]: r["kinetic_action"] for r in res["schedules"]}
    assert actions["OT"] == pytest.approx(2 * 0.999, rel=1e-6)
    assert actions["cosine"] == pytest.approx(math.pi**2 / 4 * 0.999, rel=1e-6)
    assert actions["VP-linear"] == pytest.approx(3.65, abs=0.01)
    assert json.loads(out.read_text())["settings"]["quick"] is True


def test_bench_schedules_parts_can_be_skipped(capsys):
    res = bench_schedules.main(["--quick", "--no-grids"])
    text = capsys.readouterr().out
    assert res["grids"] == [] and len(res["schedules"]) == 4
    assert "Distance to the teacher" not in text and "Spearman" in text
    with pytest.raises(SystemExit, match="--no-grids and --no-diagnostics"):
        bench_schedules.main(["--quick", "--no-grids", "--no-diagnostics"])


def test_bench_schedules_learns_solver_offsets_when_asked(capsys):
    res = bench_schedules.main(["--quick", "--setups", "A", "--solvers", "unipc", "--test", "0", "--no-diagnostics",
                                "--time-shift", "--solver-offsets"])  # fmt: skip
    assert "| A | unipc | 4 |" in capsys.readouterr().out
    row = res["grids"][0]
    assert row["learned"] <= row[row["best_hand"]] + 1e-12
    assert len(row["learned_solver_offsets"]) == 4 and len(row["learned_network_times"]) == 4
