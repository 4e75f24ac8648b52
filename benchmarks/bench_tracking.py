"""Accuracy of density tracking and of OR / AND against step count, on 2-D Gaussian mixtures with exact answers.

    python benchmarks/bench_tracking.py            # markdown table (docs/benchmarks/tracking.md carries it)
    python benchmarks/bench_tracking.py --json     # the same figures as JSON

Models: A = {(-2, 0), (2, 0)}, B = {(2, 0), (0, 3)} (std 0.5, VP-linear), sharing the component at (2, 0).
Columns:
  - corr / |err|: correlation and mean absolute error (nats) of each model's tracked log q at the end of the grid
    (t = 0: the data; the last evaluation is at t = 1e-3) against the exact value, on the OR run (both models
    pooled);
  - |err diff|: mean absolute error of log q_A - log q_B, the quantity OR and AND actually use;
  - OR TV: total-variation distance between OR's mode shares and the exact mixture (0.25, 0.5, 0.25);
  - AND shared: fraction of AND samples on the shared component; AND |dlogq|: median exact |log q_A - log q_B|.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from compose import AND, OR, sample
from compose.toy import GaussianMixture

MODES = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
OR_TARGET = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)


def run(steps: int, method: str, n: int, seed: int, divergence: str = "hutchinson_fd") -> dict:
    a = GaussianMixture([[-2.0, 0.0], [2.0, 0.0]], 0.5, name="A")
    b = GaussianMixture([[2.0, 0.0], [0.0, 3.0]], 0.5, name="B")
    kw = dict(steps=steps, method=method, divergence=divergence, dtype=torch.float64)
    t0 = time.perf_counter()
    r = sample(OR(a, b), num_samples=n, generator=torch.Generator().manual_seed(seed), **kw)
    sec_or = time.perf_counter() - t0
    t_end = r.timesteps[-1]
    exact = torch.stack([a.log_prob(r.samples, t_end), b.log_prob(r.samples, t_end)], -1)
    corr = float(torch.corrcoef(torch.stack([r.log_q.flatten(), exact.flatten()]))[0, 1])
    err = float((r.log_q - exact).abs().mean())
    err_diff = float(((r.log_q[:, 0] - r.log_q[:, 1]) - (exact[:, 0] - exact[:, 1])).abs().mean())
    shares = torch.bincount(torch.cdist(r.samples, MODES).argmin(1), minlength=3).double() / n
    tv = 0.5 * float((shares - OR_TARGET).abs().sum())
    r_and = sample(AND(a, b), num_samples=n, generator=torch.Generator().manual_seed(seed), **kw)
    x = r_and.samples
    shared = float(((x - MODES[1]).norm(dim=1) < 1.5).double().mean())
    ex_and = torch.stack([a.log_prob(x, t_end), b.log_prob(x, t_end)], -1)
    and_gap = float((ex_and[:, 0] - ex_and[:, 1]).abs().median())
    return dict(
        method=method if method == "sde" else f"ode ({divergence})",
        steps=steps,
        corr=corr,
        err=err,
        err_diff=err_diff,
        or_tv=tv,
        or_shares=shares.tolist(),
        and_shared=shared,
        and_gap=and_gap,
        seconds_or=sec_or,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200, 400, 800])
    p.add_argument("--methods", nargs="+", default=["sde", "ode"])
    p.add_argument("--divergences", nargs="+", default=["hutchinson_fd", "hutchinson"],
                   help="ODE rows: one set per divergence estimator (1 probe each)")  # fmt: skip
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for method in args.methods:
        for div in args.divergences if method == "ode" else [None]:
            for steps in args.steps:
                rows.append(run(steps, method, args.samples, args.seed, div or "hutchinson_fd"))
                if not args.json:
                    print(f"  done {rows[-1]['method']} {steps} steps ({rows[-1]['seconds_or']:.1f} s)", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"\n{args.samples} samples per run, seed {args.seed}, ODE with 1 Hutchinson probe per step (by JVP or by "
          "finite difference)\n")
    print(
        "| method | steps | corr log q | mean abs err (nats) | abs err of difference | OR TV | AND on shared | "
        "AND median exact gap | s / OR run |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['method']} | {r['steps']} | {r['corr']:.5f} | {r['err']:.3f} | {r['err_diff']:.3f} | "
            f"{r['or_tv']:.3f} | {r['and_shared']:.3f} | {r['and_gap']:.3f} | {r['seconds_or']:.1f} |"
        )


if __name__ == "__main__":
    main()
