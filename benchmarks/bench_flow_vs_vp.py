"""A VP-trained (eps) and an OT-trained (flow-matching) unconditional shapes model: dissipation and low-NFE error.

The thermodynamic speed-accuracy relations (Ikeda et al., PRX 2025) predict that the conditional-OT path has the
lower dissipation and, with it, the lower error at low NFE. For each model: the Monte-Carlo dissipation
`compose.thermo.dissipation` on its own path with its own x0_hat over the training data (circles and squares),
the kinetic action of its path, and the mean L2 distance at NFE 4, 6, 8, 10 (DPM-Solver++(2M), every named grid)
to its own teacher (DPM-Solver++(2M), `--teacher-steps` log-SNR steps) from the same standard-normal noises.

    python benchmarks/bench_flow_vs_vp.py --vp model_cards/shapes-uncond-a --ot outputs/shapes-uncond-a-flow

Prints a markdown table (and --json).
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
from compose import ld3, thermo  # noqa: E402
from examples.shapes.data import SHAPES, make_batch  # noqa: E402
from examples.shapes.eval_unconditional import judge  # noqa: E402


def valid_frac(images: torch.Tensor, clf, shapes: list[str]) -> float:
    """Fraction of images the shapes classifier calls confidently (> 0.9 on both heads) one of `shapes`."""
    res = judge(images.clamp(-1, 1), clf)
    in_set = torch.tensor([SHAPES[k] in shapes for k in res["_shape_idx"].tolist()])
    return float((in_set & res["_valid"]).float().mean())


def evaluate(folder: str, args, log, clf) -> dict:
    model = ld3.DiffusersUnconditional(folder)
    sch = model.schedule
    shapes = args.shapes

    def data(n, g):
        x0, _, _ = make_batch(n, g, size=model.sample_shape[-1], shapes=shapes)
        return x0

    t0 = time.time()
    diss, se = thermo.dissipation(
        model,
        data,
        t_min=sch.t_min,
        t_max=min(sch.t_max, 0.999),
        num_samples=args.mc,
        batch_size=64,
        generator=torch.Generator().manual_seed(args.seed),
    )
    log(f"{folder}: dissipation {diss:.4f} +- {se:.4f} ({time.time() - t0:.0f} s)")
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn((args.n, *model.sample_shape), generator=g) * float(sch.sigma(sch.t_max))
    with torch.no_grad():
        y = ld3.solve(model, x, compose.make_grid(sch, args.teacher_steps, "log_snr"), "dpm2m")
        row = {
            "model": folder,
            "schedule": repr(sch),
            "dissipation": diss,
            "dissipation_se": se,
            "kinetic_action": thermo.kinetic_action(sch, t_min=1e-3, t_max=1.0),
            "teacher_valid": valid_frac(y, clf, shapes),
        }
        for nfe in args.nfe:
            errs = {
                k: float(
                    (ld3.solve(model, x, compose.make_grid(sch, nfe, k), "dpm2m") - y)
                    .reshape(args.n, -1)
                    .norm(dim=1)
                    .mean()
                )
                for k in compose.GRIDS
            }
            best = min(errs, key=errs.get)
            out = ld3.solve(model, x, compose.make_grid(sch, nfe, best), "dpm2m")
            row[f"nfe{nfe}"] = {
                "best_grid": best,
                "best": errs[best],
                "all": errs,
                "valid": valid_frac(out, clf, shapes),
            }
            log(f"{folder}: NFE {nfe} best {best} {errs[best]:.3f}")
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vp", default="model_cards/shapes-uncond-a")
    p.add_argument("--ot", default="outputs/shapes-uncond-a-flow")
    p.add_argument("--shapes", nargs="+", default=["circle", "square"])
    p.add_argument("--nfe", type=int, nargs="+", default=[4, 6, 8, 10])
    p.add_argument("--n", type=int, default=32, help="noises")
    p.add_argument("--teacher-steps", type=int, default=100)
    p.add_argument("--mc", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    from examples.shapes.classifier import DEFAULT_DIR, load_classifier

    clf = load_classifier(str(DEFAULT_DIR))
    rows = [evaluate(a.vp, a, log, clf), evaluate(a.ot, a, log, clf)]
    head = ["model", "path", "kinetic action", "dissipation", *[f"NFE {n} (best grid)" for n in a.nfe], "teacher"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["model"],
            r["schedule"],
            f"{r['kinetic_action']:.3f}",
            f"{r['dissipation']:.3f} ± {r['dissipation_se']:.3f}",
        ]
        cells += [
            f"{r[f'nfe{n}']['best']:.3f} ({r[f'nfe{n}']['best_grid']}); valid {100 * r[f'nfe{n}']['valid']:.0f}%"
            for n in a.nfe
        ]
        cells.append(f"valid {100 * r['teacher_valid']:.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    print(
        "Distance to each model's own teacher (mean L2 over pixels in [-1, 1]) with the best named grid, and the "
        "fraction of samples the shapes classifier calls a confident circle or square:\n\n" + "\n".join(lines)
    )
    out = {"settings": vars(a), "rows": rows}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
