"""Which log-SNR levels of the "renoise" lift detect which concept? Per-level detection AUC on the shapes testbeds.

    python benchmarks/bench_lift_levels.py --testbed lora --rows merge --images 32 --seed 100 \\
        --json benchmarks/results/lift_levels_lora.json
    python benchmarks/bench_lift_levels.py --testbed text --rows "text | and" --pairs 16 --images 8 --seed 100 \\
        --json benchmarks/results/lift_levels_text.json

One method of `bench_verify.py`'s testbeds (`--rows`, one candidate per image, `--steps` steps, guidance
`--guidance`, SDE, the checkpoint's clipping) samples `--images` images per pair (lora: per shape prompt). For every
image the renoise lift of each term (`pipelines.verify.renoise_lifts`: the term's and its reference's denoising losses
on the finished image noised again at one log-SNR level, one shared noise draw) is computed at every level of
`--grid`, `--draws` times with independent noise; the pipeline's own call (at its default levels) is left as it is.
The per-level lifts are recorded by wrapping the function the pipeline calls (`pipelines.compose_pipeline.
renoise_lifts`), so the images are the pipeline's own and are sampled once.

Reported per judge and term (the judges of bench_verify: classifier and geometric judge; the LoRA concept judge):
  - per level: the within-pair AUC of the lift for "this term's concept is in the image" (mean over the pairs with
    both outcomes, whose number is given: few pairs, noisy AUCs), for one noise draw (what the pipeline computes) and
    for the mean of the draws;
  - per level set of `--sets` (each a comma-separated list, e.g. "-1,-2,-3,-4"): the AUC of the set's lift as the
    pipeline computes it (midpoint-rule widths over the set's levels, one draw per level; each draw's AUC, then their
    mean; a set written "-1,-2,-3,-4x2" averages its lift over 2 independent draws, the --draws split into disjoint
    groups of 2, the AUCs of the groups then averaged), and the rate at which best-of-4 by each score rule
    (`compose.verify.score`: min, zmin, mean) keeps an image with both concepts, the images of a pair taken in
    groups of 4.
These levels are a measurement, not a tuned default: the seed (`--seed`, default 100) differs from bench_verify's
(0), so a level set chosen here is tested there on other images.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_verify as bv  # noqa: E402
from compose.verify import best_of, score  # noqa: E402

GRID = (5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0)
SETS = ("-1,-2,-3,-4", "3,2,1,0", "2,1,0,-1", "2,0,-2,-4", "3,1,-1,-3")
RULES = ("min", "zmin", "mean")
GROUP = 4  # best-of-K groups of the level sets' selection check


@contextlib.contextmanager
def per_level_lifts(grid, draws: int, store: list):
    """While active, every renoise lift the pipeline computes also records (len(grid), draws, rows, T) per-level
    lifts of the same finished images into `store`."""
    import pipelines.compose_pipeline as cp

    original = cp.renoise_lifts

    def wrapped(groups, x0, schedule, levels, draw_source, term_idx, ref_idx, repeats=1):
        per = [[original(groups, x0, schedule, (lam,), draw_source, term_idx, ref_idx) for _ in range(draws)]
               for lam in grid]  # fmt: skip
        store.append(torch.stack([torch.stack(d) for d in per]))
        return original(groups, x0, schedule, levels, draw_source, term_idx, ref_idx, repeats)

    cp.renoise_lifts = wrapped
    try:
        yield
    finally:
        cp.renoise_lifts = original


def set_lift(per: np.ndarray, grid: list, levels: list, draw: int) -> np.ndarray:
    """(rows, T) the lift of a level set as the pipeline computes it, from one draw of the per-level lifts."""
    from pipelines.verify import _widths

    lams = sorted(levels, reverse=True)
    return sum(w * per[grid.index(lam), draw] for w, lam in zip(_widths(lams), lams, strict=True))


def parse_set(name: str) -> tuple[list[float], int]:
    """A level set '-1,-2,-3,-4' (one noise draw per level) or '-1,-2,-3,-4x2' (its lift averaged over 2 draws):
    (levels, draws). ValueError for anything else."""
    body, _, d = name.strip().partition("x")
    levels = [float(v) for v in body.split(",")]
    D = int(d) if d else 1
    if D < 1 or not levels:
        raise ValueError(name)
    return levels, D


def report(per: np.ndarray, verdict: dict, strata: np.ndarray, grid: list, sets: list) -> dict:
    """Per-level and per-set AUCs, and the sets' best-of-4 rates, for one judge's verdicts."""
    T = per.shape[-1]
    concepts = ("first", "second") if T == 2 else ("both",)
    out = {"levels": {}, "sets": {}, "pairs": {}}

    def auc_of(s: np.ndarray, c: str) -> float:
        return bv.within_pair_auc(s, verdict[c], strata)["auc"]

    for t, c in enumerate(concepts):
        out["pairs"][c] = bv.within_pair_auc(per[0, 0, :, t], verdict[c], strata)["pairs"]
        out["levels"][c] = {
            f"{lam:g}": dict(one_draw=auc_of(per[i, 0, :, t], c), mean_of_draws=auc_of(per[i, :, :, t].mean(0), c))
            for i, lam in enumerate(grid)
        }
    both = verdict["both"]
    usable = (len(both) // GROUP) * GROUP
    for name in sets:
        levels, D = parse_set(name)
        one = [set_lift(per, grid, levels, d) for d in range(per.shape[1])]  # one per noise draw
        lifts = [np.mean(one[g * D : (g + 1) * D], 0) for g in range(len(one) // D)]  # the mean of D draws each
        rec = {}
        for t, c in enumerate(concepts):
            rec[f"auc {c}"] = float(np.mean([auc_of(lift[:, t], c) for lift in lifts]))  # nan: no pair has both
        for rule in RULES if T > 1 else ("min",):
            kept = [both[:usable][best_of(score(torch.tensor(lift[:usable]), rule, K=GROUP), GROUP).numpy()].mean()
                    for lift in lifts]  # fmt: skip
            rec[f"best-of-{GROUP} {rule}"] = float(np.mean(kept))
        out["sets"][name] = rec
    out["plain"] = float(both.mean())
    out[f"oracle best-of-{GROUP}"] = float(both[:usable].reshape(-1, GROUP).any(1).mean())
    return out


def markdown(result: dict) -> str:
    lines = []
    for key, row in result["rows"].items():
        for j, rep in row["judges"].items():
            lines += [f"**{key}, {j}** (plain {rep['plain']:.2f}, oracle best-of-{GROUP} "
                      f"{rep[f'oracle best-of-{GROUP}']:.2f}; {row['images']} images)", "",
                      "| term | " + " | ".join(rep["levels"][next(iter(rep["levels"]))]) + " |",
                      "|---|" + "---:|" * len(result["config"]["grid"])]  # fmt: skip
            for c, lv in rep["levels"].items():
                pairs = rep.get("pairs", {}).get(c, "?")
                lines.append(f"| {c} ({pairs} pairs; one draw / mean of {result['config']['draws']}) | "
                             + " | ".join(f"{v['one_draw']:.2f} / {v['mean_of_draws']:.2f}" for v in lv.values())
                             + " |")  # fmt: skip
            cols = list(next(iter(rep["sets"].values())))
            lines += ["", "| level set | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
            for name, rec in rep["sets"].items():
                lines.append(f"| {name} | " + " | ".join(f"{rec[c]:.2f}" for c in cols) + " |")
            lines.append("")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--testbed", choices=["text", "experts", "lora"], default="lora")
    p.add_argument("--rows", nargs="+", required=True, help="bench_verify methods whose 'testbed | label' match")
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--images", type=int, default=32, help="images per pair (lora: per shape prompt)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--grid", type=float, nargs="+", default=list(GRID), help="log-SNR levels, one lift each")
    p.add_argument("--draws", type=int, default=2, help="noise draws per level")
    p.add_argument("--sets", nargs="+", default=list(SETS),
                   help="level sets, e.g. '3,2,1,0'; argparse reads a value that starts with '-' as an option, so "
                   "start a set with a level >= 0 or a space (' -1,-2,-3,-4')")  # fmt: skip
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--save-lifts", default=None, help="an .npz of the per-level lifts (levels, draws, images, "
                   "terms), the judges' verdicts and the pair of every image, for analyses without sampling again")
    args = p.parse_args(argv)
    if args.images < 1 or args.draws < 1 or args.steps < 1 or not 1 <= args.pairs <= 16:
        p.error("--images, --draws, --steps >= 1; --pairs 1..16")
    if args.images % GROUP:
        p.error(f"--images {args.images}: give a multiple of {GROUP} (best-of-{GROUP} groups stay within a pair)")
    for s in args.sets:
        try:
            levels, D = parse_set(s)
        except ValueError:
            p.error(f"--sets {s!r}: give comma-separated numbers, e.g. '-1,-2,-3,-4', optionally 'x' and the draws "
                    "to average, e.g. '-1,-2,-3,-4x2'")  # fmt: skip
        if D > args.draws:
            p.error(f"--sets {s!r} averages {D} draws; give --draws {D} or more")
        if missing := [v for v in levels if v not in args.grid]:
            p.error(f"--sets {s!r}: levels {missing} are not in --grid {args.grid}; add them to --grid")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from examples.shapes.classifier import load_classifier
    from examples.shapes.geometry import load_geometry_judge

    va = bv.parse_args(["--testbeds", args.testbed, "--pairs", str(args.pairs), "--images", str(args.images),
                        "--candidates", "1", "--steps", str(args.steps), "--guidance", str(args.guidance),
                        "--seed", str(args.seed), "--rows", *args.rows])  # fmt: skip
    judges = (load_classifier(bv.CARDS / "shapes-classifier"), load_geometry_judge())
    grid = [float(v) for v in args.grid]
    result = {"config": {k: getattr(args, k) for k in ("testbed", "pairs", "images", "steps", "guidance", "draws",
                                                       "seed", "sets")} | {"grid": grid}, "rows": {}}  # fmt: skip
    for m in bv.methods(va):
        pipe = bv.load_pipe(m["models"], m["testbed"] == "lora")
        store, images = [], []
        t0 = time.perf_counter()
        with per_level_lifts(grid, args.draws, store):
            for i, (seed, prompt, lora) in enumerate(bv.calls_of(m, va)):
                kw = bv.call_kwargs(m, va, seed, prompt, lora, args.steps)
                images.append(pipe(batch_size=args.images, lift="renoise", **kw).images.float().cpu())
                print(f"#   {m['key']}: call {i + 1}, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        per = torch.cat(store, 2).numpy()  # (levels, draws, images, T)
        v = bv.verdicts(m, torch.cat(images), va, judges)
        strata = np.repeat(np.arange(len(bv.calls_of(m, va))), args.images)
        if args.save_lifts:
            arrays = {f"{j}/{c}": np.asarray(vv[c]) for j, vv in v.items() for c in vv}
            path = Path(args.save_lifts)
            if len(bv.methods(va)) > 1:  # one file per method
                path = path.with_name(f"{path.stem}_{len(result['rows'])}{path.suffix}")
            np.savez_compressed(path, lifts=per, grid=np.asarray(grid), strata=strata, **arrays)
        result["rows"][m["key"]] = dict(images=int(per.shape[2]), seconds=time.perf_counter() - t0,
                                        judges={j: report(per, x, strata, grid, args.sets) for j, x in v.items()})
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
