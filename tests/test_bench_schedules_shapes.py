"""Smoke run of benchmarks/bench_schedules_shapes.py on the shipped model A with tiny settings: the table, the
schedule file it writes, and the teacher cache (a second run reads the teacher and gives the same numbers)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("bench_sch_shapes", ROOT / "benchmarks" / "bench_schedules_shapes.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def test_tiny_run_writes_a_loadable_file_and_reuses_its_teacher(tmp_path, capsys):
    from compose import ld3

    argv = ["--setups", "A", "--nfe", "3", "--train", "2", "--select", "2", "--test", "2", "--teacher-steps", "5",
            "--iters", "2", "--batch", "2", "--threads", "2", "--teacher-cache", str(tmp_path / "cache")]  # fmt: skip
    bench.main(argv + ["--out-dir", str(tmp_path / "files"), "--json", str(tmp_path / "one.json")])
    first = capsys.readouterr()
    assert "| A | 3 |" in first.out and "teacher (5 steps, 6 noises)" in first.err
    info = ld3.load_schedule(tmp_path / "files" / "a-dpm2m-nfe3.json")
    assert info["nfe"] == 3 and len(info["grid"]) == 4 and info["test_size"] == 2
    bench.main(argv + ["--json", str(tmp_path / "two.json")])
    assert "teacher read from" in capsys.readouterr().err
    one, two = (json.loads((tmp_path / f"{n}.json").read_text())["rows"][0] for n in ("one", "two"))
    assert one["named"] == two["named"] and one["learned"] == two["learned"] and one["grid"] == two["grid"]
