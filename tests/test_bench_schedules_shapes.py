"""Smoke run of benchmarks/bench_schedules_shapes.py on the shipped model A with tiny settings: the table, the
schedule file it writes, and the teacher cache (a second run reads the teacher and gives the same numbers)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("bench_sch_shapes", ROOT / "benchmarks" / "bench_schedules_shapes.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def test_tiny_run_writes_a_loadable_file_and_reuses_its_teacher(tmp_path, capsys):
    from compose import ld3

    argv = ["--setups", "A", "--nfe", "3", "--train", "2", "--select", "2", "--test", "2", "--teacher-steps", "5",
            "--iters", "2", "--batch", "2", "--threads", "1", "--teacher-cache", str(tmp_path / "cache")]  # fmt: skip
    bench.main(argv + ["--out-dir", str(tmp_path / "files"), "--json", str(tmp_path / "one.json")])
    first = capsys.readouterr()
    assert "| A | 3 |" in first.out and "teacher (5 steps, 6 noises)" in first.err
    info = ld3.load_schedule(tmp_path / "files" / "a-dpm2m-nfe3.json")
    assert info["nfe"] == 3 and len(info["grid"]) == 4 and info["test_size"] == 2
    bench.main(argv + ["--json", str(tmp_path / "two.json")])
    assert "teacher read from" in capsys.readouterr().err
    one, two = (json.loads((tmp_path / f"{n}.json").read_text())["rows"][0] for n in ("one", "two"))
    assert one["named"] == two["named"] and one["learned"] == two["learned"] and one["grid"] == two["grid"]


def test_floor_report_reruns_the_teacher_with_other_probes_and_searches_random_grids(tmp_path, capsys):
    import torch

    files = ROOT / "model_cards" / "schedules-shapes-uncond"
    argv = ["--setups", "A", "OR", "--nfe", "5", "--train", "2", "--select", "2", "--test", "2", "--teacher-steps",
            "6", "--threads", "1", "--random-grids", "3", "--floor-of", str(files),
            "--json", str(tmp_path / "fl.json")]  # fmt: skip
    bench.main(argv)
    assert "| OR | 5 |" in capsys.readouterr().out
    a, o = json.loads((tmp_path / "fl.json").read_text())["floor"]
    # A's probability-flow ODE has no Hutchinson probes: a rerun is the same; OR's densities use probes: it is not
    assert a["teacher_rerun"] == {"mean": 0.0, "median": 0.0, "flips": 0.0} and o["teacher_rerun"]["mean"] > 0
    assert a["file_cut_pct"] == 100.0 * (1.0 - a["file_distance"] / a["best_named_distance"])
    grid = torch.tensor(a["random_best_grid"])  # 5 evaluations from t_max to t_min, then the data
    assert grid.numel() == 6 and bool((grid[1:] < grid[:-1]).all())
    assert abs(float(grid[0]) - 1.0) < 1e-6 and abs(float(grid[-2]) - 1e-3) < 1e-6 and float(grid[-1]) == 0.0


def test_unipc_transfer_of_a_files_agrees_with_the_floor_report(tmp_path, capsys):
    """--transfer-from runs model A's file for a set-up; for A itself that is the floor report's file distance on the
    same noises and teacher. Named grids are measured with each solver, and the best of them is the reference."""
    files = ROOT / "model_cards" / "schedules-shapes-uncond"
    common = ["--nfe", "5", "--train", "2", "--select", "2", "--test", "2", "--teacher-steps", "6", "--threads", "1",
              "--solver", "unipc"]  # fmt: skip
    bench.main(["--setups", "A", "OR", *common, "--compare-solvers", "dpm2m", "--transfer-from", str(files),
                "--json", str(tmp_path / "tr.json"), "--out-dir", str(tmp_path / "files")])  # fmt: skip
    assert "| OR | 5 | 1 |" in capsys.readouterr().out
    a, o = json.loads((tmp_path / "tr.json").read_text())["transfer"]
    assert len(a["named"]) == 10 and a["best_named_distance"] == min(a["named"].values())
    assert a["file"].endswith("a-unipc-nfe5.json") and o["file"] == a["file"]
    assert o["file_distance"] != a["file_distance"]
    assert len(o["file_largest"]) == 2 and o["file_largest"][0] >= o["file_median"] >= o["file_largest"][1]
    # --out-dir: A's grid written as OR's own file (the pipeline takes it for OR), with what it measured for OR
    from compose import ld3

    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == ["or-unipc-nfe5.json"]
    info = ld3.load_schedule(tmp_path / "files" / "or-unipc-nfe5.json")
    source = ld3.load_schedule(files / "a-unipc-nfe5.json")
    assert info["model"] == "shapes-uncond-a,shapes-uncond-b" and info["operator"].startswith("OR(")
    assert info["grid"] == source["grid"] and info["network_times"] == source["network_times"]
    assert info["test_distance"] == o["file_distance"] and info["test_probes"] == 1
    assert info["transferred_from"]["file"] == "a-unipc-nfe5.json"
    bench.main(["--setups", "A", *common, "--floor-of", str(files), "--json", str(tmp_path / "fl.json")])
    (floor,) = json.loads((tmp_path / "fl.json").read_text())["floor"]
    assert floor["file_distance"] == a["file_distance"]


def test_and_clamp_bounds_the_students_weights_and_leaves_the_teacher_alone():
    """--and-clamp: the students solve AND(a, b, clamp=...); the teacher is SuperDiff's unclamped AND, so the
    distances compare students against one target. A tight clamp changes the solve: the check can fail."""
    import torch

    from compose import ld3

    args = bench.parse_args(["--setups", "AND", "--nfe", "3", "--train", "1", "--select", "1", "--test", "2",
                             "--teacher-steps", "4", "--and-clamp", "0.45", "0.55"])  # fmt: skip
    data = bench.prepare("AND", args, lambda s: None, parts=("test",))
    assert data["expr"].clamp == (0.45, 0.55)
    a, b = data["expr"].children
    x, grid = data["xs"]["test"], data["teacher_grid"]

    def run(expr):
        torch.manual_seed(args.seed + 1 + 3)  # the test part's teacher probes
        with torch.no_grad():
            return ld3.solve(expr, x, grid, "dpm2m", divergence_kind="hutchinson_fd")

    torch.testing.assert_close(data["ys"]["test"], run(bench.compose.AND(a, b)))
    assert float((data["ys"]["test"] - run(data["expr"])).abs().max()) > 1e-3
    with pytest.raises(SystemExit, match="--and-clamp bounds AND"):
        bench.parse_args(["--setups", "A", "OR", "--and-clamp", "0", "1"])


def test_floor_report_reruns_the_teachers_own_solver_and_operator(tmp_path):
    """With --solver unipc and --and-clamp the floor report's teacher rerun is still the teacher's set-up: the
    unclamped AND with DPM-Solver++(2M), other probes (it used to run the students' solver and clamped AND)."""
    import torch

    from compose import ld3

    files = ROOT / "model_cards" / "schedules-shapes-uncond"
    argv = ["--setups", "AND", "--nfe", "5", "--train", "1", "--select", "1", "--test", "2", "--teacher-steps", "6",
            "--solver", "unipc", "--and-clamp", "0.45", "0.55", "--threads", "1"]  # fmt: skip
    bench.main([*argv, "--floor-of", str(files), "--json", str(tmp_path / "fl.json")])
    (row,) = json.loads((tmp_path / "fl.json").read_text())["floor"]
    args = bench.parse_args(argv)
    data = bench.prepare("AND", args, lambda s: None, parts=("test",))
    a, b = data["expr"].children
    torch.manual_seed(args.seed + 1 + 1003)
    with torch.no_grad():
        again = ld3.solve(bench.compose.AND(a, b), data["xs"]["test"], data["teacher_grid"], "dpm2m",
                          divergence_kind="hutchinson_fd")  # fmt: skip
    want = float(bench.distances(data["ys"]["test"], again).mean())
    assert abs(row["teacher_rerun"]["mean"] - want) < 1e-4 * (1 + want), (row["teacher_rerun"], want)
