"""Products of experts by particles (compose.PoE, issue 7) against the exact product, and on the shipped shapes models.

    python benchmarks/bench_smc.py                    # exact mixtures: error vs particles, baselines, variance cost
    python benchmarks/bench_smc.py --shapes           # also the shapes models at equal network evaluations per image
    python benchmarks/bench_smc.py --json out.json    # also write every figure as JSON
    python benchmarks/bench_smc.py --langevin-steps 0 1   # particle rows without and with one Langevin move per step
    python benchmarks/bench_smc.py --render a.json b.json # print the merged tables of earlier runs

Exact part. Two "pretrained models" with closed-form scores: A = {(-2, 0), (2, 0)} and B = {(2, 0), (0, 3)} (std 0.5,
VP-linear, equal weights), which share one component ("shared" toy); and A' = {(-2,0), (2,0), (0,3)} with weights
(0.5, 0.3, 0.2), B' = {(-2,0), (2,0), (0,-3)} with weights (0.2, 0.5, 0.3), whose product has TWO modes with weights
0.4 / 0.6 ("two-mode" toy). In d > 2 the same means are padded with zeros (every dimension has std 0.5). The target
is the exact product A x B (`compose.toy.product_of_mixtures`). Every row runs R independent groups of K particles
(R K >= 16384 samples, at least 4 groups), 500 log-SNR steps, ESS threshold 0.5, seed 0:
  - mode TV: total-variation distance between a group's (weighted) mode shares and the exact product's (samples are
    assigned to the nearest of the factors' and the product's component means; the exact shares use the same rule on
    200k exact product samples); mean over groups;
  - mean err: |weighted mean - exact mean| of a group, mean over groups;
  - negligible: (weighted) fraction of samples whose exact product log-density is below the 0.1% quantile of exact
    product samples (exact samples: 0.001 by construction);
  - mean RMSE / indep.: root mean square (over groups) of |group mean - exact mean|, divided by that of the mean of K
    independent exact samples, sqrt(tr Cov / K). For the nearly unbiased particle product this is the variance cost
    of resampling (1 = as good as independent samples); for the biased baselines it is mostly their bias;
  - ESS / resamples / ancestors: mean minimum ESS (fraction of K), resampling events per run, distinct starting
    particles among the K final ones.
Baselines use the same sample counts and groups: the plain sum of scores (compose.Product) and SuperDiff AND.
NFE: network evaluations per sample (particle) and model, the final x0_hat included; Langevin moves
(`--langevin-steps`, compose.sample_smc's rejuvenation) add one each.

Shapes part (--shapes): AND("a <colour> shape", "a <shape>") judged by the shipped classifier (see
benchmarks/bench_shapes.py), on shapes-text and on the two experts, at EQUAL network evaluations per image: a step of
P particles costs P evaluations of every term, so product_smc with P particles gets budget / P steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from compose import AND, PoE, Product, sample  # noqa: E402
from compose.toy import GaussianMixture, product_of_mixtures  # noqa: E402

TOYS = {
    "shared": (([[-2.0, 0.0], [2.0, 0.0]], None), ([[2.0, 0.0], [0.0, 3.0]], None)),
    "two-mode": (
        ([[-2.0, 0.0], [2.0, 0.0], [0.0, 3.0]], [0.5, 0.3, 0.2]),
        ([[-2.0, 0.0], [2.0, 0.0], [0.0, -3.0]], [0.2, 0.5, 0.3]),
    ),
}


def make_toy(name: str, d: int) -> tuple[GaussianMixture, GaussianMixture]:
    (ma, wa), (mb, wb) = TOYS[name]
    pad = lambda m: torch.nn.functional.pad(torch.tensor(m, dtype=torch.float64), (0, d - 2))  # noqa: E731
    return GaussianMixture(pad(ma), 0.5, wa, name="A"), GaussianMixture(pad(mb), 0.5, wb, name="B")


class Judge:
    """Exact references of the product of two toy mixtures."""

    def __init__(self, a: GaussianMixture, b: GaussianMixture, seed: int = 123) -> None:
        self.p = product_of_mixtures(a, b)
        self.modes = torch.cat([a.means, b.means, self.p.means[self.p.weights > 1e-3]])
        ref = self.p.sample(200_000, torch.Generator().manual_seed(seed), dtype=torch.float64)
        self.shares = self._shares(ref[None], torch.full((1, ref.shape[0]), 1.0 / ref.shape[0]))[0]
        self.mean = (self.p.weights[:, None] * self.p.means).sum(0)
        var = self.p.weights @ (self.p.stds[:, None] ** 2 + self.p.means**2) - self.mean**2  # (d,)
        self.var = var
        self.low = torch.quantile(self.p.log_prob(ref[:100_000], 0.0), 1e-3)

    def _shares(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        G, K, d = x.shape
        idx = torch.cdist(x.reshape(-1, d), self.modes).argmin(1).reshape(G, K)
        out = torch.zeros(G, self.modes.shape[0], dtype=torch.float64)
        return out.scatter_add_(1, idx, w.to(torch.float64))

    def metrics(self, x: torch.Tensor, w: torch.Tensor) -> dict:
        """x: (G, K, d) samples, w: (G, K) normalised weights."""
        x, w = x.to(torch.float64), w.to(torch.float64)
        G, K, d = x.shape
        tv = 0.5 * (self._shares(x, w) - self.shares).abs().sum(-1)
        m = torch.einsum("gk,gkd->gd", w, x)
        low = (self.p.log_prob(x.reshape(-1, d), 0.0).reshape(G, K) < self.low).double()
        spread = ((m - self.mean) ** 2).sum(-1).mean().sqrt()  # RMS error of a group's mean (variance + bias^2)
        indep = (self.var.sum() / K).sqrt()
        return {
            "mode_tv": float(tv.mean()),
            "mean_err": float((m - self.mean).norm(dim=-1).mean()),
            "negligible": float((w * low).sum(-1).mean()),
            "spread_ratio": float(spread / indep),
        }


def poe_label(langevin: int, after: str) -> str:
    if langevin == 0:
        return "particle product (PoE)"
    return f"PoE + {langevin} Langevin " + ("/ step" if after == "every" else "after resampling")


def run_toy(
    toy: str, d: int, K: int, steps: int, seed: int, total: int, threshold: float, langevin: int = 0,
    after: str = "every", langevin_step: float = 0.5,
) -> dict:  # fmt: skip
    a, b = make_toy(toy, d)
    judge = Judge(a, b)
    G = max(4, total // K)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    r = sample(PoE(a, b), num_samples=G, num_particles=K, steps=steps, generator=gen, final="weights",
               ess_threshold=threshold, dtype=torch.float64, langevin_steps=langevin, langevin_after=after,
               langevin_step=langevin_step)  # fmt: skip
    sec = time.perf_counter() - t0
    rec = dict(toy=toy, d=d, method=poe_label(langevin, after), K=K, groups=G, seconds=sec, langevin=langevin)
    rec.update(judge.metrics(r.samples, r.log_weights.exp()))
    rec.update(
        min_ess=float((r.ess.min(0).values / K).mean()),
        resamples=float(r.num_resamples.double().mean()),
        ancestors=float(r.unique_ancestors().double().mean()),
        nfe=float(r.evaluations.mean()),
        acceptance=float(r.acceptance.nanmean()) if langevin else None,
    )
    return rec


def run_baseline(toy: str, d: int, K: int, steps: int, seed: int, total: int, op: str) -> dict:
    a, b = make_toy(toy, d)
    judge = Judge(a, b)
    G = max(4, total // K)
    expr = Product(a, b) if op == "product" else AND(a, b)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    r = sample(expr, num_samples=G * K, steps=steps, generator=gen, dtype=torch.float64)
    sec = time.perf_counter() - t0
    label = "sum of scores (Product)" if op == "product" else "SuperDiff AND"
    rec = dict(toy=toy, d=d, method=label, K=K, groups=G, seconds=sec, nfe=steps + 1)
    rec.update(judge.metrics(r.samples.reshape(G, K, d), torch.full((G, K), 1.0 / K, dtype=torch.float64)))
    return rec


def exact_part(args) -> list[dict]:
    rows = []

    def log(rec):
        rows.append(rec)
        print(
            f"# {rec['toy']} d={rec['d']} {rec['method']} K={rec['K']}: TV {rec['mode_tv']:.3f} mean err "
            f"{rec['mean_err']:.3f} negligible {rec['negligible']:.4f} ({rec['seconds']:.0f} s)",
            file=sys.stderr,
            flush=True,
        )

    lv = dict(after=args.langevin_after, langevin_step=args.langevin_step)
    for toy, d in [("shared", 2), ("shared", 16), ("two-mode", 2)]:
        if args.toys is not None and f"{toy}-{d}" not in args.toys:
            continue
        for K in args.particles:
            for L in args.langevin_steps:
                log(run_toy(toy, d, K, args.steps, args.seed, args.total, args.ess_threshold, L, **lv))
        for op in ("product", "and") if not args.no_baselines else ():
            log(run_baseline(toy, d, args.baseline_k, args.steps, args.seed, args.total, op))
    for d in args.dims:
        for L in args.langevin_steps:
            log(run_toy("shared", d, args.baseline_k, args.steps, args.seed, args.total, args.ess_threshold, L, **lv))
    return rows


# ---------------------------------------------------------------------- shapes
def shapes_part(args) -> list[dict]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_shapes", ROOT / "benchmarks" / "bench_shapes.py")
    bs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bs)
    from examples.shapes.classifier import load_classifier

    judge = load_classifier(bs.CARDS / "shapes-classifier")
    folders = {"text": ["shapes-text"], "experts": ["shapes-text-colour", "shapes-text-shape"]}
    pipes = {k: bs.load([str(bs.CARDS / f) for f in folders[k]]) for k in args.models}
    budget = args.budget
    rows_spec = [("text", "joint prompt", dict(), 1)] if "text" in args.models and not args.no_baselines else []
    for pipe in args.models:
        if not args.no_baselines:
            rows_spec += [
                (pipe, "product (Composable Diffusion)", dict(operator="product"), 1),
                (pipe, "SuperDiff AND (SDE)", dict(operator="and"), 1),
            ]
        smc = dict(operator="product_smc")
        rows_spec += [(pipe, f"particle product, {P} particles", smc, P) for P in args.shape_p]
    pairs = bs.DEFAULT_PAIRS[: args.pairs]
    out = []
    for pipe, label, kw, P in rows_spec:
        steps = budget if args.fixed_steps else budget // P
        per, sec, resamples, ess = [], 0.0, [], []
        for p, (colour, shape) in enumerate(pairs):
            prompt = f"a {colour} {shape}" if label == "joint prompt" else [f"a {colour} shape", f"a {shape}"]
            extra = dict(num_particles=P) if P > 1 else {}
            t0 = time.perf_counter()
            res = pipes[pipe](prompt=prompt, guidance_scale=args.guidance, num_inference_steps=steps,
                              batch_size=args.images, generator=torch.Generator().manual_seed(args.seed + p),
                              output_type="pt", **kw, **extra)  # fmt: skip
            sec += time.perf_counter() - t0
            ps, pc = judge.predict(res.images.float() * 2 - 1)
            per.append(dict(pair=f"{colour} {shape}", **bs.and_metrics(ps, pc, colour, shape)))
            if P > 1:
                resamples.append(float(res.num_resamples.double().mean()))
                ess.append(float((res.ess.min(0).values / P).mean()))
        rec = dict(
            models=bs.PIPE_NAMES[pipe],
            method=label,
            particles=P,
            steps=steps,
            nfe=steps * P,
            **{k: sum(d[k] for d in per) / len(per) for k in ("both", "colour", "shape")},
            sec_per_image=sec / (len(pairs) * args.images),
            resamples=sum(resamples) / len(resamples) if resamples else None,
            min_ess=sum(ess) / len(ess) if ess else None,
            per_pair=per,
        )
        out.append(rec)
        print(f"# shapes {rec['models']} {label}: both {rec['both']:.2f}", file=sys.stderr, flush=True)
    return out


def merge(results: list[dict]) -> dict:
    """One result from several JSON files: exact rows interleaved by (toy, d), baselines last, then K and Langevin."""
    out = dict(results[0])
    rows = [r for res in results for r in res.get("exact") or []]
    cases: list = []
    for r in rows:
        if (r["toy"], r["d"]) not in cases:
            cases.append((r["toy"], r["d"]))
    key = lambda r: (cases.index((r["toy"], r["d"])), "PoE" not in r["method"], r["K"], r.get("langevin", 0))  # noqa: E731
    out["exact"] = sorted(rows, key=key)
    out["shapes"] = [r for res in results for r in res.get("shapes") or []]
    cfgs = [res["config"] for res in results if any(L > 0 for L in res["config"].get("langevin_steps", [0]))]
    out["langevin"] = sorted({(c.get("langevin_after", "every"), c.get("langevin_step", 0.5)) for c in cfgs})
    return out


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = []
    if result.get("exact"):
        steps = sorted({c for _, c in result.get("langevin") or []})
        lv = "".join(f", Langevin step {c} sigma_t^2 / A" for c in steps)
        lines += [
            f"Exact mixtures: {cfg['steps']} steps, ESS threshold {cfg['ess_threshold']}, >= {cfg['total']} "
            f"samples per row in groups of K, seed {cfg['seed']}{lv}; NFE = network evaluations per sample and model",
            "",
            "| toy | d | method | K | NFE | groups | mode TV | mean err | negligible | mean RMSE / indep. | min ESS "
            "| resamples | ancestors | s |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for r in result.get("exact") or []:
        fmt = lambda k, f, r=r: f.format(r[k]) if r.get(k) is not None else ""  # noqa: E731
        nfe = r.get("nfe", cfg["steps"] + 1)  # rows written before the column existed: steps + 1, no Langevin
        lines.append(
            f"| {r['toy']} | {r['d']} | {r['method']} | {r['K']} | {nfe:.0f} | {r['groups']} | {r['mode_tv']:.3f} | "
            f"{r['mean_err']:.3f} | {r['negligible']:.4f} | {r['spread_ratio']:.1f} | {fmt('min_ess', '{:.2f}')} | "
            f"{fmt('resamples', '{:.1f}')} | {fmt('ancestors', '{:.0f}')} | {r['seconds']:.0f} |"
        )
    if result.get("shapes"):
        lines += [
            "",
            f"Shapes: {cfg['pairs']} pairs x {cfg['images']} images, guidance {cfg['guidance']}, "
            + (
                f"{cfg['budget']} steps for every row"
                if cfg.get("fixed_steps")
                else f"budget {cfg['budget']} network evaluations per image (steps x particles)"
            )
            + f", seed {cfg['seed']}",
            "",
            "| models | method | particles | steps | NFE / img | both | colour | shape | resamples | s/img |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["shapes"]:
            rs = "" if r["resamples"] is None else f"{r['resamples']:.1f}"
            lines.append(
                f"| {r['models']} | {r['method']} | {r['particles']} | {r['steps']} | {r['nfe']} | {r['both']:.2f} | "
                f"{r['colour']:.2f} | {r['shape']:.2f} | {rs} | {r['sec_per_image']:.2f} |"
            )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--particles", type=int, nargs="+", default=[16, 64, 256, 1024, 4096])
    p.add_argument("--baseline-k", type=int, default=1024, help="group size of the baselines and the --dims rows")
    p.add_argument("--dims", type=int, nargs="*", default=[64], help="extra dimensions of the shared toy (K fixed)")
    p.add_argument("--total", type=int, default=16384, help="samples per row (groups = max(4, total / K))")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--ess-threshold", type=float, default=0.5)
    p.add_argument("--langevin-steps", type=int, nargs="+", default=[0],
                   help="Langevin moves (rejuvenation) of the particle rows; one row per value, 0 = none")  # fmt: skip
    p.add_argument("--langevin-after", choices=["every", "resample"], default="every")
    p.add_argument("--langevin-step", type=float, default=0.5, help="the moves' step in units of sigma_t^2 / A")
    p.add_argument("--toys", nargs="*", default=None,
                   help="exact part: shared-2 shared-16 two-mode-2 (default: all; --toys alone: none)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-exact", action="store_true")
    p.add_argument("--shapes", action="store_true", help="also the shapes models (minutes of CPU)")
    p.add_argument("--pairs", type=int, default=2, help="first N (colour, shape) pairs of bench_shapes")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--budget", type=int, default=48, help="network evaluations per image (steps x particles)")
    p.add_argument("--shape-p", type=int, nargs="+", default=[2, 4], help="particle counts of the shapes rows")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--fixed-steps", action="store_true", help="every shapes row gets --budget steps (NFE = steps x P)")
    p.add_argument("--models", nargs="+", default=["text", "experts"], choices=["text", "experts"])
    p.add_argument("--no-baselines", action="store_true", help="particle-product rows only (exact part and shapes)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", nargs="?", const="-", default=None, help="write JSON to this file ('-': stdout)")
    p.add_argument("--render", nargs="+", default=None,
                   help="print the tables of JSON files written by --json (merged), run nothing")  # fmt: skip
    args = p.parse_args(argv)
    if any(k < 2 for k in args.particles) or args.baseline_k < 2:
        p.error("particle counts must be >= 2")
    if not 0 < args.ess_threshold <= 1:
        p.error("--ess-threshold must lie in (0, 1]")
    if any(L < 0 for L in args.langevin_steps) or not 0 < args.langevin_step <= 1:
        p.error("--langevin-steps must be >= 0 and --langevin-step in (0, 1]")
    if args.budget < max(args.shape_p):
        p.error("--budget must be at least the largest --shape-p")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.render:
        print(markdown(merge([json.loads(Path(f).read_text()) for f in args.render])))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = {"config": {k: v for k, v in vars(args).items() if k != "json"}, "exact": [], "shapes": []}
    if not args.skip_exact:
        result["exact"] = exact_part(args)
    if args.shapes:
        result["shapes"] = shapes_part(args)
    result["total_seconds"] = time.perf_counter() - t0
    if args.json == "-":
        print(json.dumps(result, indent=2))
        return
    print(markdown(merge([result])))
    print(f"\n({result['total_seconds']:.0f} s in all; {math.ceil(result['total_seconds'] / 60)} min)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
