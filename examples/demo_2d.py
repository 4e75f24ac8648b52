"""Compose two exact 2-D "pretrained models" with every operator and plot the samples.

    python examples/demo_2d.py [--out outputs/demo_2d.png]

Model A has modes at (-2, 0) and (2, 0); model B at (2, 0) and (0, 3); both are exact Gaussian mixtures, so
every figure printed here can be checked against the truth: OR should put 25% / 50% / 25% of its samples on the
three modes, AND should land on the shared mode (2, 0) with equal log-densities.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from compose import AND, OR, Average, Product, sample
from compose.toy import GaussianMixture

MODES = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/demo_2d.png")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    a = GaussianMixture([[-2.0, 0.0], [2.0, 0.0]], 0.5, name="A")
    b = GaussianMixture([[2.0, 0.0], [0.0, 3.0]], 0.5, name="B")
    exprs = {
        "A": a,
        "B": b,
        "OR(A, B)": OR(a, b),
        "AND(A, B)": AND(a, b),
        "Average(A, B)": Average(a, b),
        "Product(A, B)": Product(a, b),
    }
    results = {}
    head = ["(-2,0)", "(2,0)", "(0,3)"]
    print(
        f"{'expression':<14} "
        + " ".join(f"{h:>7}" for h in head)
        + f" {'mean log qA':>12} {'mean log qB':>12} seconds"
    )
    for name, expr in exprs.items():
        t0 = time.perf_counter()
        res = sample(
            expr, num_samples=args.samples, steps=args.steps, generator=torch.Generator().manual_seed(args.seed)
        )
        sec = time.perf_counter() - t0
        x = res.samples.double()
        shares = torch.bincount(torch.cdist(x, MODES).argmin(1), minlength=3).double() / x.shape[0]
        t_end = res.timesteps[-1]
        lqa, lqb = float(a.log_prob(x, t_end).mean()), float(b.log_prob(x, t_end).mean())
        print(f"{name:<14} {shares[0]:7.3f} {shares[1]:7.3f} {shares[2]:7.3f} {lqa:12.2f} {lqb:12.2f} {sec:8.2f}")
        results[name] = x
    print("exact OR shares: 0.250 0.500 0.250; AND should sit on (2, 0), where log qA = log qB")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3 * len(results), 3.2), sharex=True, sharey=True)
    for ax, (name, x) in zip(axes, results.items(), strict=True):
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.3)
        ax.scatter(MODES[:, 0], MODES[:, 1], marker="x", c="k", s=30)
        ax.set_title(name, fontsize=10)
        ax.set_xlim(-4, 4)
        ax.set_ylim(-3, 5)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
