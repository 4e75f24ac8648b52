"""`compose learn-schedule`: learn an N-step schedule (LD3, `compose.ld3`) and write it as a JSON schedule file.

Models: the 2-D toy mixtures (`toy:A`, `toy:B`) or diffusers unconditional folders (`pipelines.unconditional`).
Without installing: `python -m pipelines.cli learn-schedule --help`. Parsing the arguments imports neither torch nor
compose (the `compose` command line answers `--help` at once); the solver, divergence and start grid are checked by
`compose.options` when the command runs, with the messages every other entry point gives.
"""

from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = "Learn an N-step schedule (LD3) and write it as a JSON schedule file."


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments, as a parser of its own (`main`)."""
    p = argparse.ArgumentParser(prog="compose learn-schedule", description=DESCRIPTION)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments (no heavy import: choices are checked when it runs)."""
    p.add_argument(
        "--model",
        nargs="+",
        required=True,
        help="toy:A / toy:B (2-D mixtures) or diffusers unconditional folders (e.g. model_cards/...)",
    )
    p.add_argument("--operator", default="none", choices=("none", "or", "and", "average"))
    p.add_argument("--nfe", type=int, default=None, help="steps of the grid (required unless --transfer)")
    p.add_argument("--solver", default=None, help="an ODE solver of compose.options.SOLVERS (default dpm2m)")
    p.add_argument("--teacher-steps", type=int, default=200)
    p.add_argument("--train", type=int, default=100, help="training noises")
    p.add_argument("--val", type=int, default=50, help="validation noises")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument(
        "--init",
        default="best",
        help="start grid: a named grid of compose.GRIDS, best (the closest named grid) or a schedule file (a warm "
        "start, e.g. one model's file for OR / AND of it)",
    )
    p.add_argument(
        "--divergence",
        default=None,
        help="divergence estimate for OR / AND density tracking, one of compose.options.DIVERGENCES (default: exact "
        "for d <= 16, else hutchinson)",
    )
    p.add_argument("--probes", type=int, default=1, help="OR / AND: Hutchinson probes per step of the student")
    p.add_argument("--teacher-probes", type=int, default=None, help="the same for the teacher (default --probes)")
    p.add_argument("--time-shift", action="store_true", help="learn the decoupled network times too")
    p.add_argument(
        "--solver-offsets",
        action="store_true",
        help="learn the solver's coefficients too (dpm2m / unipc: offsets to the multistep and corrector weights)",
    )
    p.add_argument(
        "--detach-weights",
        action="store_true",
        help="OR / AND: treat the per-step weights as constants in the backward pass (cheaper, usually worse)",
    )
    p.add_argument("--toy-schedule", default="vp_linear", choices=("vp_linear", "cosine", "ot"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--transfer",
        default=None,
        metavar="FILE",
        help="no learning: re-key this schedule file (e.g. one model's) for --model / --operator and write it to "
        "--out (grid, network times, solver and NFE unchanged; compose.ld3.transfer_schedule)",
    )
    p.add_argument("--out", required=True, help="the JSON schedule file to write")


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` (default: the process's arguments) and run the command."""
    p = build_parser()
    run(p.parse_args(argv), p.error, sys.argv[1:] if argv is None else argv)


def run(a: argparse.Namespace, error, argv: list[str]) -> None:
    """Run the command with parsed arguments `a`; error(message) reports a bad argument (argparse's `error`)."""
    import torch

    from compose.composer import Composer
    from compose.ld3 import learn_schedule, load_schedule, save_schedule, transfer_schedule
    from compose.operators import AND, OR, Average
    from compose.options import GRIDS, check_divergence, check_solver
    from compose.toy import toy_models

    if a.nfe is None and a.transfer is None:
        error("--nfe is required (the number of steps of the grid to learn).")
    solver = a.solver or "dpm2m"
    try:
        check_solver(solver, "ode")
        if a.divergence is not None:
            check_divergence(a.divergence)
    except ValueError as err:
        error(str(err))
    init: str | dict = a.init
    if a.init not in (*GRIDS, "best"):
        if not a.init.endswith(".json") and not os.path.exists(a.init):
            error(f"--init {a.init}: not a named grid {GRIDS}, 'best' or a schedule file.")
        init = dict(load_schedule(a.init, {"solver": solver, "nfe": a.nfe}), path=a.init)  # names what is wrong
    torch.set_num_threads(a.threads)
    models = []
    for spec in a.model:
        if spec.startswith("toy:"):
            toys = toy_models(a.toy_schedule)
            if spec[4:] not in toys:
                raise ValueError(f"--model {spec}: the toy models are {['toy:' + k for k in toys]}.")
            models.append(toys[spec[4:]])
        else:
            from .unconditional import DiffusersUnconditional

            models.append(DiffusersUnconditional(spec))
    ops = {"or": OR, "and": AND}
    if a.operator == "none":
        if len(models) != 1:
            raise ValueError("--operator none takes one --model; give --operator or/and/average for several.")
        expr = models[0]
    elif a.operator == "average":
        expr = Average(*models)
    else:
        expr = ops[a.operator](*models)
    command = "compose learn-schedule " + " ".join(argv)
    if a.transfer is not None:
        given = {k: v for k, v in (("nfe", a.nfe), ("solver", a.solver)) if v is not None}
        source = dict(load_schedule(a.transfer, given), path=a.transfer)  # another NFE / solver: the message says so
        info = transfer_schedule(source, expr, command=command)
        save_schedule(a.out, info)
        print(f"wrote {a.out}: the grid of {a.transfer} for {info['operator']} ({info['solver']}, NFE {info['nfe']})")
        return
    sch = Composer(expr, method="ode").schedule
    g = torch.Generator().manual_seed(a.seed)
    shape = models[0].sample_shape
    dtype = torch.float64 if len(shape) == 1 else torch.float32
    noise = torch.randn((a.train + a.val, *shape), generator=g, dtype=torch.float64).to(dtype)
    x_all = noise * float(sch.sigma(sch.t_max))
    res = learn_schedule(
        expr,
        a.nfe,
        x_all[: a.train],
        x_all[a.train :],
        solver=solver,
        teacher_steps=a.teacher_steps,
        init=init,
        time_shift=a.time_shift,
        solver_offsets=a.solver_offsets,
        divergence_kind=a.divergence,
        weight_grad=not a.detach_weights,
        iters=a.iters,
        lr=a.lr,
        batch_size=a.batch,
        generator=g,
        probes=a.probes,
        teacher_probes=a.teacher_probes,
    )
    res.info["command"] = command
    save_schedule(a.out, res.info)
    print(
        f"wrote {a.out}: validation distance {res.val_loss:.5f} (init {a.init}: {res.val_loss_init:.5f}), "
        f"{res.seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
