"""Step schedules at low NFE: every named grid and the LD3-learned one, and the thermodynamic diagnostics.

Part 1 (2-D mixtures, exact models; `compose.toy.toy_models`): for a single mixture A, OR(A, B) and AND(A, B), the
ODE solvers Euler and DPM-Solver++(2M) (`--solvers`, also UniPC; OR / AND use those other than Euler), NFE 4, 6,
8, 10: the mean L2 distance to the teacher (DPM-Solver++(2M), `--teacher-steps` log-SNR steps, from the same
noises) on `--test` held-out noises, for every grid of
`compose.GRIDS` and for the grid learned by `compose.ld3.learn_schedule` on `--train` noises (its start grid and best
iterate are picked on `--val` noises, disjoint from the test ones), with the learning time.

Part 2 (schedules): the model-free kinetic action of VP-linear, cosine, SD scaled-linear and conditional OT, the
Monte-Carlo dissipation of mixture A's data on each path (exact model), and the distance to the teacher of mixture
A sampled on that path (DPM-Solver++(2M), log-SNR grid, NFE 4-10): does lower dissipation go with lower error?

    python benchmarks/bench_schedules.py --threads 1 [--json out.json] [--quick]

Prints markdown tables (and writes them with all settings as JSON with --json).
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
from compose import ld3, thermo, toy  # noqa: E402
from compose.schedule import alphas_cumprod_from_config  # noqa: E402
from compose.toy import GaussianMixture  # noqa: E402


def setups(schedule: str = "vp_linear") -> dict:
    toys = toy.toy_models(schedule)
    a, b = toys["A"], toys["B"]
    return {"A": a, "OR(A,B)": compose.OR(a, b), "AND(A,B)": compose.AND(a, b)}


def distance(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).reshape(out.shape[0], -1).norm(dim=1).mean())


def part1(args, log) -> list[dict]:
    rows = []
    exprs = setups()
    for name in args.setups:
        expr = exprs[name]
        sch = compose.Composer(expr, method="ode").schedule
        g = torch.Generator().manual_seed(args.seed)
        n_all = args.train + args.val + args.test
        x = torch.randn(n_all, 2, generator=g, dtype=torch.float64) * float(sch.sigma(sch.t_max))
        x_train, x_val = x[: args.train], x[args.train : args.train + args.val]
        x_test = x[args.train + args.val :] if args.test else x_val  # --test 0: report on the selection noises
        t0 = time.time()
        with torch.no_grad():
            teacher_grid = compose.make_grid(sch, args.teacher_steps, "log_snr")
            y_train = ld3.solve(expr, x_train, teacher_grid, "dpm2m")
            y_val = ld3.solve(expr, x_val, teacher_grid, "dpm2m")
            y_test = ld3.solve(expr, x_test, teacher_grid, "dpm2m") if args.test else y_val
        log(f"{name}: teacher ({args.teacher_steps} steps, {x.shape[0]} noises) {time.time() - t0:.1f} s")
        teacher = {id(x_train): y_train, id(x_val): y_val}
        solvers = args.solvers if name == "A" else [s for s in args.solvers if s != "euler"]
        for solver in solvers:
            for nfe in args.nfe:
                row, sel = {"setup": name, "solver": solver, "nfe": nfe}, {}
                with torch.no_grad():
                    for kind in compose.GRIDS:
                        ts = compose.make_grid(sch, nfe, kind)
                        row[kind] = distance(ld3.solve(expr, x_test, ts, solver), y_test)
                        sel[kind] = distance(ld3.solve(expr, x_val, ts, solver), y_val) if args.test else row[kind]
                best_kind = min(compose.GRIDS, key=lambda k: row[k])  # the bold one: best on the reported noises
                start_kind = min(compose.GRIDS, key=lambda k: sel[k])  # LD3 starts from the best on its own noises
                res = ld3.learn_schedule(
                    expr,
                    nfe,
                    x_train,
                    x_val,
                    solver=solver,
                    teacher=lambda z, teacher=teacher: teacher[id(z)],
                    teacher_steps=args.teacher_steps,
                    init=start_kind,
                    time_shift=args.time_shift,
                    solver_offsets=args.solver_offsets,
                    iters=args.iters,
                    lr=args.lr,
                    progress=False,
                    generator=torch.Generator().manual_seed(args.seed),
                )
                with torch.no_grad():
                    out = ld3.solve(
                        expr, x_test, res.grid, solver, res.network_times, solver_offsets=res.solver_offsets
                    )
                row["learned"] = distance(out, y_test)
                row["best_hand"] = best_kind
                row["cut_vs_best_pct"] = 100.0 * (1 - row["learned"] / row[best_kind])
                row["learn_seconds"] = round(res.seconds, 1)
                row["learned_grid"] = [round(float(t), 5) for t in res.grid]
                if res.network_times is not None:
                    row["learned_network_times"] = [round(float(t), 5) for t in res.network_times]
                if res.solver_offsets is not None:
                    row["learned_solver_offsets"] = [[round(float(v), 5) for v in r] for r in res.solver_offsets]
                rows.append(row)
                log(
                    f"{name} {solver} nfe {nfe}: best hand {best_kind} {row[best_kind]:.4f}, learned "
                    f"{row['learned']:.4f} ({row['cut_vs_best_pct']:.0f}% cut, {res.seconds:.1f} s)"
                )
    return rows


def path_schedules() -> dict:
    sd = alphas_cumprod_from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    return {
        "VP-linear": compose.NoiseSchedule.vp_linear(),
        "cosine": compose.NoiseSchedule.cosine(),
        "SD scaled-linear": compose.NoiseSchedule.from_alphas_cumprod(sd),
        "OT": compose.NoiseSchedule.ot(),
    }


def part2(args, log) -> list[dict]:
    rows = []
    base = toy.toy_models()["A"]
    for name, sch in path_schedules().items():
        a = GaussianMixture(base.means, base.stds, schedule=sch, name="A")
        row = {
            "schedule": name,
            "t_range": [sch.t_min, sch.t_max],
            "log_snr_range": [float(sch.log_snr(sch.t_max)), float(sch.log_snr(sch.t_min))],
        }
        row["kinetic_action"] = thermo.kinetic_action(sch, t_min=1e-3, t_max=1.0)
        hi = min(sch.t_max, 0.999)
        diss, se = thermo.dissipation(
            a,
            lambda n, g, a=a: a.sample(n, g, dtype=torch.float64),
            t_min=sch.t_min,
            t_max=hi,
            num_samples=args.mc,
            generator=torch.Generator().manual_seed(args.seed),
        )
        row["dissipation"], row["dissipation_se"] = diss, se
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.val, 2, generator=g, dtype=torch.float64) * float(sch.sigma(sch.t_max))
        with torch.no_grad():
            y = ld3.solve(a, x, compose.make_grid(sch, args.teacher_steps, "log_snr"), "dpm2m")
            for nfe in args.nfe:
                ts = compose.make_grid(sch, nfe, "log_snr")
                row[f"err_nfe{nfe}"] = distance(ld3.solve(a, x, ts, "dpm2m"), y)
                # step lengths of the teacher trajectory on the uniform-in-t grid (constant speed: cv = 0)
            traj = thermo.teacher_trajectory(a, x[:64], compose.make_grid(sch, 8, "uniform"), substeps=25)
            row["uniform_t_step_cv"] = thermo.step_lengths(traj)["cv"]
        rows.append(row)
        log(f"{name}: action {row['kinetic_action']:.3f}, dissipation {diss:.3f} +- {se:.3f}")
    return rows


def fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def table1(rows) -> str:
    head = ["setup", "solver", "NFE", *compose.GRIDS, "learned (LD3)", "cut vs best hand", "learn s"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["setup"], r["solver"], str(r["nfe"])]
        for k in compose.GRIDS:
            v = fmt(r[k])
            cells.append(f"**{v}**" if k == r["best_hand"] else v)
        cells += [fmt(r["learned"]), f"{r['cut_vs_best_pct']:.0f}%", f"{r['learn_seconds']:.1f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def table2(rows, nfes) -> str:
    head = ["schedule", "kinetic action", "dissipation (A)", *[f"error NFE {n}" for n in nfes], "step cv (uniform t)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["schedule"], f"{r['kinetic_action']:.3f}", f"{r['dissipation']:.3f} ± {r['dissipation_se']:.3f}"]
        cells += [fmt(r[f"err_nfe{n}"]) for n in nfes] + [f"{r['uniform_t_step_cv']:.2f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().to(torch.float64)
    rb = torch.tensor(b).argsort().argsort().to(torch.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nfe", type=int, nargs="+", default=[4, 6, 8, 10])
    p.add_argument("--setups", nargs="+", default=["A", "OR(A,B)", "AND(A,B)"], choices=["A", "OR(A,B)", "AND(A,B)"])
    p.add_argument("--solvers", nargs="+", default=["euler", "dpm2m"], choices=list(compose.SOLVERS))
    p.add_argument("--train", type=int, default=100)
    p.add_argument("--val", type=int, default=200, help="noises that pick LD3's start grid and best iterate")
    p.add_argument("--test", type=int, default=200, help="held-out noises of the table (0: report on --val)")
    p.add_argument("--time-shift", action="store_true", help="LD3 learns the decoupled network times too")
    p.add_argument(
        "--solver-offsets", action="store_true", help="LD3 learns the solver's coefficients too (dpm2m / unipc)"
    )
    p.add_argument("--no-diagnostics", action="store_true", help="skip part 2 (the schedules' dissipation)")
    p.add_argument("--no-grids", action="store_true", help="skip part 1 (the grids and LD3)")
    p.add_argument("--teacher-steps", type=int, default=200)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--mc", type=int, default=20000, help="Monte-Carlo samples of the dissipation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke run)")
    p.add_argument("--json", default=None)
    p.add_argument("--render", default=None, help="only re-print the tables of this JSON (a saved run)")
    a = p.parse_args(argv)
    if a.quick:
        a.nfe, a.train, a.val, a.test, a.teacher_steps, a.iters, a.mc = [4], 16, 16, 16, 40, 3, 512
        a.setups = ["A", "OR(A,B)"]
    return a


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    start = time.time()
    if args.render:  # re-print a saved run (the cut is recomputed from the stored distances)
        saved = json.loads(Path(args.render).read_text())
        rows1, rows2, nfes = saved["grids"], saved["schedules"], saved["settings"]["nfe"]
        for r in rows1:
            r["cut_vs_best_pct"] = 100.0 * (1 - r["learned"] / r[r["best_hand"]])
        args.nfe = nfes
    else:
        if args.no_grids and args.no_diagnostics:
            raise SystemExit("--no-grids and --no-diagnostics together leave nothing to run; drop one.")
        rows1 = [] if args.no_grids else part1(args, log)
        rows2 = [] if args.no_diagnostics else part2(args, log)
    low = [r for r in rows1 if r["nfe"] <= 6]
    cuts = [r["cut_vs_best_pct"] for r in low]
    corr = (
        {}
        if not rows2
        else {n: spearman([r["dissipation"] for r in rows2], [r[f"err_nfe{n}"] for r in rows2]) for n in args.nfe}
    )
    text = "\n\n".join(
        (
            [
                "Distance to the teacher (mean L2, held-out test noises; bold: best hand-made grid on them):",
                table1(rows1),
                f"NFE <= 6: learned grid cuts the distance to the best hand-made grid by {min(cuts):.0f}% to "
                f"{max(cuts):.0f}% (goal: >= 30%)."
                if cuts
                else "",
            ]
            if rows1
            else []
        )
        + (
            [
                "Schedules (mixture A on each path; DPM-Solver++(2M), log-SNR grid):",
                table2(rows2, args.nfe),
                "Spearman rank correlation of dissipation and error: "
                + ", ".join(f"NFE {n}: {c:+.2f}" for n, c in corr.items()),
            ]
            if rows2
            else []
        )
    )
    print(text)
    if args.render:
        return saved
    result = {
        "settings": vars(args),
        "grids": rows1,
        "schedules": rows2,
        "spearman": corr,
        "seconds": round(time.time() - start, 1),
        "torch": torch.__version__,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
