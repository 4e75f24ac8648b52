"""Fast checks of benchmarks/bench_shapes.py: its metrics, coin flip, flags, and a 2-step run on the shipped models."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("bench_shapes", ROOT / "benchmarks" / "bench_shapes.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)
SHAPES, COLOURS = bench.SHAPES, bench.COLOURS


def one_hot(idx: list[int], k: int, conf: float = 1.0) -> torch.Tensor:
    p = torch.full((len(idx), k), (1 - conf) / (k - 1))
    p[torch.arange(len(idx)), torch.tensor(idx)] = conf
    return p


def test_and_metrics_counts_colour_shape_and_both():
    ps = one_hot([SHAPES.index("circle"), SHAPES.index("circle"), SHAPES.index("star"), SHAPES.index("star")], 4)
    pc = one_hot([COLOURS.index("red"), COLOURS.index("blue"), COLOURS.index("red"), COLOURS.index("blue")], 4)
    m = bench.and_metrics(ps, pc, "red", "circle")
    assert m == {"both": 0.25, "colour": 0.5, "shape": 0.5}


def test_or_metrics_half_a_and_validity_threshold():
    ps = torch.cat(
        [
            one_hot([SHAPES.index("circle")], 4, 0.95),
            one_hot([SHAPES.index("square")], 4, 0.5),
            one_hot([SHAPES.index("triangle")], 4, 0.99),
            one_hot([SHAPES.index("star")], 4, 0.99),
        ]
    )
    pc = one_hot([0, 1, 2, 3], 4, 0.95)
    m = bench.or_metrics(ps, pc)
    assert m["half_a"] == 0.5
    assert m["valid"] == 0.75  # the square at 0.5 confidence is not valid


def test_coin_flip_takes_half_from_each():
    a, b = torch.zeros(6, 3, 2, 2), torch.ones(6, 3, 2, 2)
    mixed = bench.coin_flip(a, b)
    assert mixed[0::2].eq(0).all() and mixed[1::2].eq(1).all()
    assert a.eq(0).all()  # inputs untouched


def test_rows_and_flags():
    rows = bench.and_rows(text=True, experts=True)
    assert [r["label"] for r in rows].count("SuperDiff AND (SDE)") == 2
    assert (
        sum(r.get("joint", False) for r in rows) == 1
    )  # the joint prompt only on the one model that knows both words
    args = bench.parse_args([])
    assert args.steps == [50] and args.guidance == 4.0 and args.pairs == 4 and not args.all_pairs
    assert bench.parse_args(["--steps", "50", "200"]).steps == [50, 200]
    assert len(bench.ALL_PAIRS) == 16 and len(set(bench.DEFAULT_PAIRS)) == 4
    with pytest.raises(SystemExit):
        bench.parse_args(["--pairs", "0"])


NEEDED = [
    "shapes-text",
    "shapes-text-colour",
    "shapes-text-shape",
    "shapes-uncond-a",
    "shapes-uncond-b",
    "shapes-classifier",
]


@pytest.mark.skipif(
    not all((ROOT / "model_cards" / n).is_dir() for n in NEEDED), reason="shipped shapes models not present"
)
def test_two_step_run_on_shipped_models(tmp_path, capsys):
    out = tmp_path / "b.json"
    grid = tmp_path / "grid.png"
    bench.main(
        [
            "--pairs",
            "1",
            "--images",
            "2",
            "--or-images",
            "2",
            "--steps",
            "2",
            "--json",
            str(out),
            "--examples",
            str(grid),
        ]
    )
    printed = capsys.readouterr().out
    assert "| steps | models | method | both | colour | shape | s/img |" in printed
    assert "| steps | models | method | red circle |" in printed  # the per-pair table
    from PIL import Image

    # nine AND rows of two 24x24 tiles at scale 3 under 14-pixel labels
    assert Image.open(grid).size == (2 + 2 * 74, 2 + 9 * (72 + 14 + 2))
    assert "SuperDiff OR (T = 100)" in printed
    res = json.loads(out.read_text())
    assert len(res["and"]) == 9 and len(res["or"]) == 6
    for r in res["and"]:
        assert 0 <= r["both"] <= min(r["colour"], r["shape"]) <= 1 and r["sec_per_image"] > 0
