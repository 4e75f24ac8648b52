"""Learned step schedules (LD3) on the shipped unconditional shapes models, and the schedule files we ship.

For each set-up (`shapes-uncond-a` alone, OR(a, b), AND(a, b); DPM-Solver++(2M) on the probability-flow ODE, or
another `--solver`, e.g. unipc, with `--compare-solvers` measuring the named grids under other solvers too) the
teacher (DPM-Solver++(2M), `--teacher-steps` log-SNR steps) runs ONCE on three disjoint sets of noises: training
(the LD3 loss), selection (the best iterate and the starting grid are picked on it) and test (every number in the
table). Then for each NFE: the distance to the teacher of every named grid, `compose.ld3.learn_schedule` started
from the grid closest on the selection noises, and the learned grid on the test noises. OR and AND track the
densities with the Hutchinson finite-difference divergence (one extra forward per model and step, as the pipeline's
`divergence="hutchinson_fd"`); the global RNG is re-seeded before every evaluation, so all grids see the same probes.

The operator metrics of the quality benchmark (`bench_shapes.py`) on the test outputs, by the shipped classifier:
valid = share with confidence > 0.9 on both heads; half A = share classified circle or square (model A's half).

    python benchmarks/bench_schedules_shapes.py --setups A OR AND --nfe 4 6 8 \
        --out-dir model_cards/schedules-shapes-uncond --json benchmarks/results/schedules_shapes.json

Writes one schedule file per (set-up, NFE) into --out-dir (keys of `compose.ld3.REQUIRED_KEYS` plus the test
distances), prints a markdown table and writes everything as JSON with --json. Then, from that JSON, the per-grid
step lengths along the teacher trajectory (their uniformity) for `shapes-uncond-a`:

    python benchmarks/bench_schedules_shapes.py --steps-from benchmarks/results/schedules_shapes.json \
        --json benchmarks/results/schedules_shapes_steps.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import compose  # noqa: E402
from compose import ld3  # noqa: E402
from pipelines.unconditional import DiffusersUnconditional  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CARDS = ROOT / "model_cards"
SETUPS = ("A", "OR", "AND")
FILE_NAMES = {"A": "a", "OR": "or", "AND": "and"}
LABELS = {"valid": "valid", "half_a": "half A"}
SOLVER_NAMES = {"euler": "Euler", "dpm2m": "DPM-Solver++(2M)", "unipc": "UniPC (bh2, 2M predictor + UniC)"}


def build(setup: str):
    a = DiffusersUnconditional(str(CARDS / "shapes-uncond-a"))
    if setup == "A":
        return a, None
    b = DiffusersUnconditional(str(CARDS / "shapes-uncond-b"))
    return (compose.OR(a, b) if setup == "OR" else compose.AND(a, b)), "hutchinson_fd"


def distances(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (out - ref).reshape(out.shape[0], -1).norm(dim=1)


def metrics(images: torch.Tensor, clf) -> dict:
    """valid and half-A shares of images in [-1, 1] (the classifier's input range) by the shipped classifier
    (`examples.shapes.eval_unconditional.judge`: valid = confidence > 0.9 on both heads)."""
    from examples.shapes.data import SHAPES
    from examples.shapes.eval_unconditional import judge

    v = judge(images.clamp(-1, 1), clf)
    half_a = torch.isin(v["_shape_idx"], torch.tensor([SHAPES.index("circle"), SHAPES.index("square")]))
    return {"half_a": float(half_a.float().mean()), "valid": v["valid_frac"]}


def heading(cfg: dict) -> str:
    probes, tp = cfg.get("probes", 1), cfg.get("teacher_probes") or cfg.get("probes", 1)
    hutch = f" ({probes} Hutchinson probes per step, teacher {tp})" if (probes, tp) != (1, 1) else ""
    return (
        f"Shipped models, {SOLVER_NAMES[cfg.get('solver', 'dpm2m')]}: {cfg['train']} training / {cfg['select']} "
        f"selection / {cfg['test']} test "
        f"noises, teacher {cfg['teacher_steps']} log-SNR steps{hutch}, {cfg['iters']} Adam steps "
        f"(batch {cfg['batch']}, lr {cfg['lr']}), time shift {'off' if cfg['no_time_shift'] else 'on'}"
        f"{', learned solver coefficients' if cfg.get('solver_offsets') else ''}; mean L2 "
        "distance to the teacher on the test noises (bold: best named grid)\n"
    )


def teacher_probes(args) -> int:
    """Hutchinson probes per step of the teacher: --teacher-probes, else --probes."""
    return args.teacher_probes or args.probes


def prepare(setup: str, args, log, parts=("train", "select", "test")) -> dict:
    """The set-up's model, schedule, noises (training / selection / test, split from one seeded draw), a batched
    solver with fixed Hutchinson probes per call (`seed_offset`), and the teacher's states on the noises of `parts`
    (read from or written to --teacher-cache when all three are asked for)."""
    expr, div = build(setup)
    target = expr  # the teacher's expression; --and-clamp bounds the students' AND weights only
    if setup == "AND" and args.and_clamp is not None:
        expr = compose.AND(*target.children, clamp=tuple(args.and_clamp))
    sch = compose.Composer(expr, method="ode").schedule
    shape = (expr.leaves()[0] if isinstance(expr, compose.Expr) else expr).sample_shape
    g = torch.Generator().manual_seed(args.seed)
    n_all = args.train + args.select + args.test
    x = torch.randn((n_all, *shape), generator=g) * float(sch.sigma(sch.t_max))
    xs = {"train": x[: args.train], "select": x[args.train : args.train + args.select]}
    xs["test"] = x[args.train + args.select :]

    def solve(z, ts, net=None, seed_offset: int = 0, probes: int = args.probes, solver: str = args.solver, of=expr,
              off=None):  # fmt: skip
        torch.manual_seed(args.seed + 1 + seed_offset)  # the same Hutchinson probes for every grid
        kw = dict(divergence_kind=div, probes=probes, solver_offsets=off)
        with torch.no_grad():
            return torch.cat(
                [ld3.solve(of, z[i : i + args.chunk], ts, solver, net, **kw) for i in range(0, z.shape[0], args.chunk)]
            )

    t0 = time.time()
    key = f"{setup}-seed{args.seed}-{args.train}-{args.select}-{args.test}-steps{args.teacher_steps}-chunk{args.chunk}"
    tp = teacher_probes(args)
    key += f"-probes{tp}" if div and tp != 1 else ""
    cached = Path(args.teacher_cache) / f"teacher-{key}.pt" if args.teacher_cache else None
    teacher_grid = compose.make_grid(sch, args.teacher_steps, "log_snr")
    if cached is not None and cached.exists():
        ys = torch.load(cached)
        teacher_s = ys.pop("seconds")
        log(f"{setup}: teacher read from {cached} (it took {teacher_s:.0f} s)")
    else:
        offsets = {"train": 1, "select": 2, "test": 3}  # the probes of each part's teacher run
        kw = dict(probes=tp, solver="dpm2m", of=target)
        ys = {k: solve(xs[k], teacher_grid, seed_offset=offsets[k], **kw) for k in parts}
        teacher_s = time.time() - t0
        n_noises = sum(len(xs[k]) for k in parts)
        log(f"{setup}: teacher ({args.teacher_steps} steps, {n_noises} noises) {teacher_s:.0f} s")
        if cached is not None and len(parts) == 3:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.save(dict(ys, seconds=teacher_s), cached)
    return dict(expr=expr, target=target, div=div, sch=sch, xs=xs, ys=ys, solve=solve, teacher_grid=teacher_grid,
                teacher_s=teacher_s, teacher_probes=tp)  # fmt: skip


def run_setup(setup: str, args, clf, log) -> list[dict]:
    data = prepare(setup, args, log)
    expr, div, sch, solve, teacher_s = data["expr"], data["div"], data["sch"], data["solve"], data["teacher_s"]
    x_train, x_sel, x_test = (data["xs"][k] for k in ("train", "select", "test"))
    y_train, y_sel, y_test = (data["ys"][k] for k in ("train", "select", "test"))
    teacher_metrics = metrics(y_test, clf)
    lookup = {id(x_train): y_train, id(x_sel): y_sel}
    rows = []
    for nfe in args.nfe:
        row = {"setup": setup, "solver": args.solver, "nfe": nfe, "teacher_steps": args.teacher_steps}
        row["teacher_seconds"] = round(teacher_s, 1)
        row["teacher_metrics"] = teacher_metrics
        named, named_metrics = {}, {}
        for kind in compose.GRIDS:
            out = solve(x_test, compose.make_grid(sch, nfe, kind))
            named[kind] = float(distances(out, y_test).mean())
            named_metrics[kind] = metrics(out, clf)
        other = {  # the named grids with the other --compare-solvers: the best hand-made set-up may use another solver
            sv: {k: float(distances(solve(x_test, compose.make_grid(sch, nfe, k), solver=sv), y_test).mean())
                 for k in compose.GRIDS}
            for sv in args.compare_solvers if sv != args.solver
        }  # fmt: skip
        best = min(named, key=named.get)
        best_any = min(
            [(named[best], best)] + [(min(v.values()), f"{min(v, key=v.get)} ({sv})") for sv, v in other.items()]
        )
        init = "best"
        if args.init_from:
            path = Path(args.init_from) / f"a-{args.solver}-nfe{nfe}.json"
            init = dict(ld3.load_schedule(path), path=str(path))
        res = ld3.learn_schedule(
            expr,
            nfe,
            x_train,
            x_sel,
            solver=args.solver,
            teacher=lambda z: lookup[id(z)],
            teacher_steps=args.teacher_steps,
            init=init,
            time_shift=not args.no_time_shift,
            solver_offsets=args.solver_offsets,
            divergence_kind=div,
            weight_grad=not args.detach_weights,
            iters=args.iters,
            lr=args.lr,
            batch_size=args.batch,
            ball=args.ball,
            generator=torch.Generator().manual_seed(args.seed),
            probes=args.probes,
            teacher_probes=data["teacher_probes"],
            log=lambda s, nfe=nfe: log(f"  {setup} nfe {nfe}: {s}"),
        )
        out = solve(x_test, res.grid, res.network_times, off=res.solver_offsets)
        d = distances(out, y_test)
        row.update(
            named=named,
            named_metrics=named_metrics,
            best_named=best,
            learned=float(d.mean()),
            learned_se=float(d.std() / len(d) ** 0.5),
            learned_metrics=metrics(out, clf),
            cut_pct=100.0 * (1.0 - float(d.mean()) / named[best]),
            **(
                {
                    "named_other": other,
                    "best_any": best_any[1],
                    "cut_any_pct": 100.0 * (1.0 - float(d.mean()) / best_any[0]),
                }
                if other
                else {}
            ),  # fmt: skip
            learn_seconds=round(res.seconds, 1),
            grid=[float(t) for t in res.grid],
            network_times=None if res.network_times is None else [float(t) for t in res.network_times],
            solver_offsets=res.info.get("solver_offsets"),
            init=res.info["init"],
        )
        rows.append(row)
        log(
            f"{setup} nfe {nfe}: best named {best} {named[best]:.3f}, learned {row['learned']:.3f} "
            f"({row['cut_pct']:.0f}% cut), learning {res.seconds:.0f} s"
        )
        if args.out_dir:
            info = dict(res.info)
            info.update(
                teacher_seconds=round(teacher_s, 1),
                test_size=int(x_test.shape[0]),
                test_distance=row["learned"],
                test_distance_named=named,
                command=command_line(args),
            )
            write_schedule(args, setup, nfe, info, log)
    return rows


def command_line(args) -> str:
    return "python benchmarks/bench_schedules_shapes.py " + " ".join(args.argv)


def write_schedule(args, setup: str, nfe: int, info: dict, log) -> None:
    """Save `info` as the set-up's schedule file for this solver and NFE in --out-dir."""
    path = Path(args.out_dir) / f"{FILE_NAMES[setup]}-{args.solver}-nfe{nfe}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    ld3.save_schedule(path, info)
    log(f"  wrote {path}")


def floor_report(setup: str, args, clf, log) -> list[dict]:
    """How much of the distance to the teacher a grid can remove, per NFE, on the test noises.

    teacher rerun: the teacher run again with other Hutchinson probes (OR / AND; A is deterministic): its distance to
    the teacher of the table is error that no student can remove, and `flips` is the share of noises whose image
    changes shape class between the two runs (for OR: which model the sample follows). student rerun: the same for
    the schedule file in --floor-of. random grids (--random-grids N): N grids with uniform random interior times
    (no time shift), the best on the selection noises measured on the test noises: a grid search next to LD3's.
    """
    parts = ("select", "test") if args.random_grids else ("test",)
    data = prepare(setup, args, log, parts=parts)
    sch, solve, xs, ys = data["sch"], data["solve"], data["xs"], data["ys"]
    x_test, y_test = xs["test"], ys["test"]

    def shape_class(images: torch.Tensor) -> torch.Tensor:
        return clf.predict(images.clamp(-1, 1))[0].argmax(1)

    def rerun(out: torch.Tensor, again: torch.Tensor) -> dict:
        d = distances(out, again)
        flips = (shape_class(out) != shape_class(again)).float().mean()
        return {"mean": float(d.mean()), "median": float(d.median()), "flips": float(flips)}

    if data["div"] is None:
        teacher = {"mean": 0.0, "median": 0.0, "flips": 0.0}
    else:
        kw = dict(probes=data["teacher_probes"], solver="dpm2m", of=data["target"])  # the teacher's own set-up
        teacher = rerun(y_test, solve(x_test, data["teacher_grid"], seed_offset=1003, **kw))
    log(f"{setup}: teacher rerun {teacher}")
    rows = []
    for nfe in args.nfe:
        row = {"setup": setup, "nfe": nfe, "teacher_rerun": teacher}
        named = {
            k: float(distances(solve(x_test, compose.make_grid(sch, nfe, k)), y_test).mean()) for k in compose.GRIDS
        }
        row["best_named"] = min(named, key=named.get)
        row["best_named_distance"] = named[row["best_named"]]
        path = Path(args.floor_of) / f"{FILE_NAMES[setup]}-{args.solver}-nfe{nfe}.json"
        expr = data["expr"]
        ts, net, off = compose.resolve_grid(
            sch, str(path), expect={**ld3.expression_keys(expr), "solver": args.solver, "nfe": nfe}
        )
        out = solve(x_test, ts, net, off=off)
        row["file"] = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
        row["file_distance"] = float(distances(out, y_test).mean())
        row["file_cut_pct"] = 100.0 * (1.0 - row["file_distance"] / row["best_named_distance"])
        if data["div"]:
            row["student_rerun"] = rerun(out, solve(x_test, ts, net, seed_offset=1000, off=off))
        else:
            row["student_rerun"] = teacher
        if args.random_grids:
            g = torch.Generator().manual_seed(args.seed + 11)
            best = None
            for _ in range(args.random_grids):
                # nfe evaluation times: t_max, nfe - 2 random ones, t_min; then the step to the data
                u = torch.rand(nfe - 2, generator=g, dtype=torch.float64).sort(descending=True).values
                inner = sch.t_min + (sch.t_max - sch.t_min) * u
                grid = torch.cat([torch.tensor([sch.t_max]), inner, torch.tensor([sch.t_min, 0.0])]).to(torch.float64)
                v = float(distances(solve(xs["select"], grid), ys["select"]).mean())
                if best is None or v < best[0]:
                    best = (v, grid)
            row["random_grids"] = args.random_grids
            row["random_best_select"] = best[0]
            row["random_best_grid"] = [float(t) for t in best[1]]
            row["random_best_distance"] = float(distances(solve(x_test, best[1]), y_test).mean())
        rows.append(row)
        log(f"{setup} nfe {nfe}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("setup", "nfe")))
    return rows


def transfer_report(setup: str, args, log) -> list[dict]:
    """Model A's learned file of the same solver and NFE (in --transfer-from), its grid and network times used
    unchanged for `setup`, next to every named grid (with --solver and each of --compare-solvers) on the test noises:
    what the composition gains from the single model's schedule without learning its own. With --out-dir, writes
    it as the set-up's own file (`compose.ld3.transfer_schedule`, with the distances measured here)."""
    data = prepare(setup, args, log, parts=("test",))
    sch, solve, x_test, y_test = data["sch"], data["solve"], data["xs"]["test"], data["ys"]["test"]
    rows = []
    for nfe in args.nfe:
        named = {}
        for sv in dict.fromkeys([args.solver, *args.compare_solvers]):
            for k in compose.GRIDS:
                out = solve(x_test, compose.make_grid(sch, nfe, k), solver=sv)
                named[f"{k} ({sv})"] = float(distances(out, y_test).mean())
        best = min(named, key=named.get)
        path = Path(args.transfer_from) / f"a-{args.solver}-nfe{nfe}.json"
        ts, net, off = compose.resolve_grid(
            sch, str(path), expect={"model": "shapes-uncond-a", "solver": args.solver, "nfe": nfe}
        )
        d = distances(solve(x_test, ts, net, off=off), y_test)
        row = {"setup": setup, "nfe": nfe, "solver": args.solver, "probes": args.probes, "named": named}
        row.update(best_named=best, best_named_distance=named[best], file=str(path), file_distance=float(d.mean()),
                   file_se=float(d.std() / len(d) ** 0.5), file_median=float(d.median()),
                   file_largest=[float(v) for v in d.sort(descending=True).values[:3]])  # fmt: skip
        row["cut_pct"] = 100.0 * (1.0 - row["file_distance"] / named[best])
        rows.append(row)
        log(f"{setup} nfe {nfe}: best named {best} {named[best]:.3f}, A's file {row['file_distance']:.3f} "
            f"({row['cut_pct']:.0f}% cut)")  # fmt: skip
        if args.out_dir and setup != "A":  # A's grid as the set-up's own schedule file, with what it measured here
            info = ld3.transfer_schedule(
                path, data["expr"], test_size=int(x_test.shape[0]), test_distance=row["file_distance"],
                test_distance_named=named, test_probes=args.probes, test_teacher_probes=data["teacher_probes"],
                command=command_line(args),
            )  # fmt: skip
            write_schedule(args, setup, nfe, info, log)
    return rows


def recheck_report(setup: str, args, log) -> list[dict]:
    """Every shipped file of `setup` in --recheck, run by today's sampler on the test noises against today's teacher,
    next to the distance recorded in the file and to every named grid with the same network evaluations (issue 19:
    N steps are N evaluations; format-1 files counted solver steps and are read as format 2 on load)."""
    data = prepare(setup, args, log, parts=("test",))
    sch, solve, x_test, y_test = data["sch"], data["solve"], data["xs"]["test"], data["ys"]["test"]
    rows = []
    for path in sorted(Path(args.recheck).glob(f"{setup.lower()}-*-nfe*.json")):
        learned = ld3.load_schedule(str(path))
        solver, nfe = learned["solver"], int(learned["nfe"])
        ts, net, off = compose.resolve_grid(sch, str(path), expect={"solver": solver, "nfe": nfe})
        d = distances(solve(x_test, ts, net, solver=solver, off=off), y_test)
        named = {k: float(distances(solve(x_test, compose.make_grid(sch, nfe, k), solver=solver), y_test).mean())
                 for k in compose.GRIDS}  # fmt: skip
        best = min(named, key=named.get)
        row = {"setup": setup, "file": path.name, "solver": solver, "nfe": nfe, "probes": args.probes,
               "recorded": learned.get("test_distance"), "distance": float(d.mean()),
               "se": float(d.std() / len(d) ** 0.5), "best_named": best, "best_named_distance": named[best],
               "named": named}  # fmt: skip
        row["cut_pct"] = 100.0 * (1.0 - row["distance"] / named[best])
        rows.append(row)
        log(f"{path.name}: recorded {row['recorded']}, now {row['distance']:.3f} (best {best} {named[best]:.3f})")
    return rows


def recheck_markdown(rows: list[dict]) -> str:
    out = ["| file | evaluations | recorded in the file | today | best named grid today | cut today |",
           "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        rec = f"{r['recorded']:.2f}" if isinstance(r["recorded"], (int, float)) else "-"
        best = f"{r['best_named_distance']:.2f} ({r['best_named']})"
        out.append(f"| `{r['file']}` | {r['nfe']} | {rec} | {r['distance']:.2f} ± {r['se']:.2f} | {best} | "
                   f"{r['cut_pct']:.0f}% |")  # fmt: skip
    return "\n".join(out)


def transfer_markdown(rows: list[dict]) -> str:
    out = ["| set-up | NFE | probes | best named grid | A's learned file | cut | its median (largest) |",
           "|---|---:|---:|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        best = f"{r['best_named_distance']:.2f}, {r['best_named']}"
        file = f"{r['file_distance']:.2f} ± {r['file_se']:.2f}"
        spread = f"{r['file_median']:.2f} ({r['file_largest'][0]:.1f})" if "file_median" in r else "-"
        out.append(f"| {r['setup']} | {r['nfe']} | {r['probes']} | {best} | {file} | {r['cut_pct']:.0f}% | {spread} |")
    return "\n".join(out)


def floor_markdown(rows: list[dict]) -> str:
    head = ["set-up", "NFE", "best named", "shipped file", "cut", "random grids: best",
            "teacher rerun (median, flips)", "student rerun (median, flips)"]  # fmt: skip
    out = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(head) - 2)]

    def rr(r: dict) -> str:
        return f"{r['mean']:.2f} ({r['median']:.2f}, {100 * r['flips']:.0f}%)"

    for r in rows:
        rand = f"{r['random_best_distance']:.2f} (of {r['random_grids']})" if "random_grids" in r else "-"
        cells = [r["setup"], str(r["nfe"]), f"{r['best_named_distance']:.2f} ({r['best_named']})",
                 f"{r['file_distance']:.2f}", f"{r['file_cut_pct']:.0f}%", rand, rr(r["teacher_rerun"]),
                 rr(r["student_rerun"])]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def markdown(rows: list[dict]) -> str:
    head = ["set-up", "NFE", *compose.GRIDS, "learned (LD3)", "cut vs best named", "learn s", "teacher s"]
    out = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(head) - 2)]
    for r in rows:
        cells = [r["setup"], str(r["nfe"])]
        for k in compose.GRIDS:
            v = f"{r['named'][k]:.2f}"
            cells.append(f"**{v}**" if k == r["best_named"] else v)
        cells += [f"{r['learned']:.2f} ± {r['learned_se']:.2f}", f"{r['cut_pct']:.0f}%"]
        cells += [f"{r['learn_seconds']:.0f}", f"{r['teacher_seconds']:.0f}"]
        out.append("| " + " | ".join(cells) + " |")
    others = [r for r in rows if "best_any" in r]
    if others:
        out += ["", "| set-up | NFE | best named grid, any solver | learned | cut |", "|---|---:|---|---:|---:|"]
        for r in others:
            best = min([r["named"][r["best_named"]], *(min(v.values()) for v in r["named_other"].values())])
            out.append(f"| {r['setup']} | {r['nfe']} | {best:.2f}, {r['best_any']} | {r['learned']:.2f} | "
                       f"{r['cut_any_pct']:.0f}% |")  # fmt: skip
    out += ["", "| set-up | NFE | metric | teacher | best named grid | learned |", "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        keys = ("valid", "half_a") if r["setup"] != "A" else ("valid",)
        for k in keys:
            best = r["named_metrics"][r["best_named"]][k]
            out.append(
                f"| {r['setup']} | {r['nfe']} | {LABELS[k]} | {r['teacher_metrics'][k]:.2f} | "
                f"{best:.2f} ({r['best_named']}) | {r['learned_metrics'][k]:.2f} |"
            )
    return "\n".join(out)


def step_report(rows: list[dict], args, log) -> list[dict]:
    """Uniformity of each grid's steps along the teacher trajectory (set-up A): `compose.thermo.step_lengths` of the
    teacher (DPM-Solver++(2M), `--substeps` log-SNR steps per grid step) sampled at the grid's times; cv = std / mean
    of the per-step displacements (0 for a constant-speed walk), max / min their ratio."""
    from compose import thermo

    model = DiffusersUnconditional(str(CARDS / "shapes-uncond-a"))
    sch = model.schedule
    g = torch.Generator().manual_seed(args.seed + 7)
    x_T = torch.randn((args.step_noises, *model.sample_shape), generator=g) * float(sch.sigma(sch.t_max))
    out = []
    for r in rows:
        if r["setup"] != "A":
            continue
        grids = {k: compose.make_grid(sch, r["nfe"], k) for k in compose.GRIDS}
        grids["learned"] = torch.tensor(r["grid"], dtype=torch.float64)
        rec = {"nfe": r["nfe"], "cv": {}, "ratio": {}}
        for name, ts in grids.items():
            st = thermo.step_lengths(thermo.teacher_trajectory(model, x_T, ts, substeps=args.substeps))
            rec["cv"][name], rec["ratio"][name] = st["cv"], st["ratio"]
        log(f"A nfe {r['nfe']}: step cv " + ", ".join(f"{k} {v:.2f}" for k, v in rec["cv"].items()))
        out.append(rec)
    return out


def step_markdown(recs: list[dict]) -> str:
    names = [*compose.GRIDS, "learned"]
    out = ["| NFE | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for r in recs:
        cells = [f"{r['cv'][k]:.2f} ({r['ratio'][k]:.1f})" for k in names]
        out.append(f"| {r['nfe']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    p.add_argument("--nfe", type=int, nargs="+", default=[4, 6, 8])
    p.add_argument("--solver", default="dpm2m", choices=compose.SOLVERS, help="the student's ODE solver")
    p.add_argument(
        "--compare-solvers",
        nargs="+",
        default=[],
        choices=compose.SOLVERS,
        help="also measure the named grids with these solvers; the cut is then also given against the best of all",
    )
    p.add_argument("--train", type=int, default=64, help="training noises")
    p.add_argument("--select", type=int, default=32, help="noises that pick the start grid and the best iterate")
    p.add_argument("--test", type=int, default=64, help="held-out noises of the table")
    p.add_argument("--teacher-steps", type=int, default=100)
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--ball", type=float, default=0.0, help="relaxed-loss radius r (0: the plain distance)")
    p.add_argument("--no-time-shift", action="store_true", help="learn the grid only (no decoupled network times)")
    p.add_argument(
        "--solver-offsets",
        action="store_true",
        help="learn the solver's coefficients too (ld3.learn_schedule(solver_offsets=True); dpm2m / unipc)",
    )
    p.add_argument("--detach-weights", action="store_true", help="OR / AND: hold the weights constant in the backward")
    p.add_argument("--chunk", type=int, default=32, help="noises per solver call")
    p.add_argument("--probes", type=int, default=1, help="OR / AND: Hutchinson probes per step of every grid")
    p.add_argument("--teacher-probes", type=int, default=None, help="the same for the teacher (default --probes)")
    p.add_argument(
        "--and-clamp",
        type=float,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="AND students: clamp the weights to [LO, HI] (compose.AND(clamp=...)); the teacher stays unclamped",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default=None, help="write the learned schedule files here")
    p.add_argument(
        "--init-from",
        default=None,
        help="start from model A's schedule files a-<solver>-nfe<N>.json in this folder (warm starts for OR, AND)",
    )
    p.add_argument(
        "--teacher-cache", default=None, help="keep each set-up's teacher states in this folder and reuse them"
    )
    p.add_argument("--json", default=None)
    p.add_argument(
        "--floor-of",
        default=None,
        help="only the floor report for the schedule files in this folder (teacher and student reruns, random grids)",
    )
    p.add_argument("--random-grids", type=int, default=0, help="floor report: random grids searched per NFE")
    p.add_argument(
        "--recheck",
        default=None,
        help="only: run the shipped schedule files in this folder (today's sampler and evaluation count) against the "
        "teacher on the test noises, next to the distance recorded in each file and to the named grids",
    )
    p.add_argument(
        "--transfer-from",
        default=None,
        help="only: model A's schedule files a-<solver>-nfe<N>.json in this folder, used unchanged for the set-ups",
    )
    p.add_argument("--steps-from", default=None, help="only the step-length report, for the grids of this JSON")
    p.add_argument("--render", nargs="+", default=None, help="only re-print the tables of these JSON files (merged)")
    p.add_argument("--step-noises", type=int, default=16, help="noises of the step-length report")
    p.add_argument("--substeps", type=int, default=10, help="teacher steps per grid step in the step-length report")
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    for name in ("train", "select", "test", "teacher_steps", "iters", "batch", "chunk", "probes", "teacher_probes"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1; got {getattr(a, name)}.")
    order = max(compose.options.SOLVER_TABLE[s].order for s in [a.solver, *a.compare_solvers])
    if min(a.nfe) < order:
        raise SystemExit(
            f"--nfe: the solvers {[a.solver, *a.compare_solvers]} need at least {order} steps; got {a.nfe}"
        )
    if a.and_clamp is not None and "AND" not in a.setups:
        raise SystemExit(f"--and-clamp bounds AND's weights; --setups {a.setups} has no AND.")
    if a.teacher_steps <= max(a.nfe):
        raise SystemExit(
            f"--teacher-steps {a.teacher_steps} must exceed every --nfe ({max(a.nfe)}); it is the reference."
        )
    return a


def per_setup(report, key: str, args) -> list[dict]:
    """The rows of `report(setup)` for every --setups, written to --json (under `key`) after each set-up, so that
    what is done is kept if a later set-up is interrupted."""
    rows = []
    for setup in args.setups:
        rows += report(setup)
        if args.json:
            Path(args.json).write_text(json.dumps({"config": vars(args), key: rows}, indent=1) + "\n")
    return rows


def main(argv=None) -> None:
    from examples.shapes.classifier import load_classifier

    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(f"# {msg}", file=sys.stderr, flush=True)

    if args.render:
        runs = [json.loads(Path(f).read_text()) for f in args.render]
        print(heading(runs[0]["config"]))
        rows = sorted((r for run in runs for r in run["rows"]), key=lambda r: (SETUPS.index(r["setup"]), r["nfe"]))
        print(markdown(rows))
        return
    if args.steps_from:
        data = json.loads(Path(args.steps_from).read_text())
        data["steps"] = step_report(data["rows"], args, log)
        if args.json:
            Path(args.json).write_text(json.dumps({"config": vars(args), "steps": data["steps"]}, indent=1) + "\n")
        print(
            f"Step lengths along the teacher ({args.step_noises} noises, {args.substeps} DPM-Solver++(2M) steps per "
            "grid step), shapes-uncond-a: cv = std / mean of the per-step displacement (max / min)\n"
        )
        print(step_markdown(data["steps"]))
        return
    if args.recheck:
        rows = per_setup(lambda setup: recheck_report(setup, args, log), "recheck", args)
        print(
            f"Shipped schedule files re-run: distance to the teacher ({args.teacher_steps} log-SNR steps, "
            f"DPM-Solver++(2M)) on {args.test} test noises, {args.probes} Hutchinson probe(s) per step for OR / AND; "
            "evaluations = network evaluations per image (the files' nfe)\n"
        )
        print(recheck_markdown(rows))
        return
    if args.transfer_from:
        rows = per_setup(lambda setup: transfer_report(setup, args, log), "transfer", args)
        tp = teacher_probes(args)
        print(
            f"Model A's learned {SOLVER_NAMES[args.solver]} files used unchanged, against every named grid: distance "
            f"to the teacher ({args.teacher_steps} log-SNR steps, Hutchinson probes per step: {tp}) on {args.test} "
            "test noises; probes: those of the students"
            + (f"; AND students' weights clamped to {args.and_clamp}, the teacher's not" if args.and_clamp else "")
            + "\n"
        )
        print(transfer_markdown(rows))
        return
    clf = load_classifier(CARDS / "shapes-classifier")
    if args.floor_of:
        rows = per_setup(lambda setup: floor_report(setup, args, clf, log), "floor", args)
        tp = teacher_probes(args)
        print(
            f"Distance to the teacher ({args.teacher_steps} log-SNR steps) on {args.test} test noises, OR / AND with "
            f"{args.probes} Hutchinson probes per step (teacher {tp}): what a grid can remove (mean; in brackets the "
            "median and the share of noises that change shape class)\n"
        )
        print(floor_markdown(rows))
        return
    rows = per_setup(lambda setup: run_setup(setup, args, clf, log), "rows", args)
    print(heading(vars(args)))
    print(markdown(rows))


if __name__ == "__main__":
    main()
