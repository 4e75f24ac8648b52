"""Quality of every operator on the shipped shapes models, judged by the shipped shapes classifier (issue 4).

    python benchmarks/bench_shapes.py                         # defaults: 4 pairs x 8 images, 50 steps (~10-15 min CPU)
    python benchmarks/bench_shapes.py --all-pairs --images 64 --steps 50 200
    python benchmarks/bench_shapes.py --json out.json         # also write every figure (per pair too) as JSON
    python benchmarks/bench_shapes.py --examples grid.png     # and a labelled grid: 2 images per pair, every AND row

AND part, for each (colour, shape) pair, e.g. (red, circle), with the same seeds for every row:
  - joint prompt "a red circle" on shapes-text (a caption it has never seen: its captions name ONE attribute);
  - average of scores, product (Composable Diffusion), SuperDiff AND (SDE, Ito density; ODE, finite-difference
    Hutchinson divergence) of "a red shape" and "a circle", on shapes-text and across the two experts
    (shapes-text-colour gets "a red shape", shapes-text-shape gets "a circle").
  Columns: both = fraction classified as the colour AND the shape; colour / shape = each alone; s/img.
OR part (unconditional, no guidance): shapes-uncond-a (circles, squares), shapes-uncond-b (triangles, stars),
  a coin flip between them (half the images from each: the upper bound on a mixture), average of scores,
  SuperDiff OR at temperature 1 and 100.
  Columns: half A = share of images classified circle or square; valid = share with classifier confidence > 0.9
  on both heads; s/img (the coin flip's is the mean of A's and B's).
Seconds per image are wall clock on whatever machine runs it (a shared CPU here: compare rows of one run only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.shapes.data import COLOURS, SHAPES  # noqa: E402

CARDS = ROOT / "model_cards"
DEFAULT_PAIRS = [("red", "circle"), ("green", "square"), ("blue", "triangle"), ("yellow", "star")]
ALL_PAIRS = [(c, s) for c in COLOURS for s in SHAPES]
HALF_A = ("circle", "square")
EXAMPLES_PER_PAIR = 2


def and_metrics(shape_probs: torch.Tensor, colour_probs: torch.Tensor, colour: str, shape: str) -> dict:
    """Fractions classified as the colour, the shape, and both."""
    ok_c = colour_probs.argmax(1) == COLOURS.index(colour)
    ok_s = shape_probs.argmax(1) == SHAPES.index(shape)
    return {
        "both": float((ok_c & ok_s).float().mean()),
        "colour": float(ok_c.float().mean()),
        "shape": float(ok_s.float().mean()),
    }


def or_metrics(shape_probs: torch.Tensor, colour_probs: torch.Tensor, threshold: float = 0.9) -> dict:
    """Share of images in half A (circle / square) and share of valid images (confidence > threshold on both heads)."""
    half_a = torch.isin(shape_probs.argmax(1), torch.tensor([SHAPES.index(s) for s in HALF_A]))
    valid = (shape_probs.max(1).values > threshold) & (colour_probs.max(1).values > threshold)
    return {"half_a": float(half_a.float().mean()), "valid": float(valid.float().mean())}


def coin_flip(images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
    """Half the images from each model (even indices from A, odd from B): what an exact 50/50 mixture would give."""
    out = images_a.clone()
    out[1::2] = images_b[1::2]
    return out


def and_rows(text: bool, experts: bool) -> list[dict]:
    """The AND-part rows: label, which pipeline, call keywords, and prompt builder."""
    rows = []
    if text:
        rows.append(dict(label="joint prompt", pipe="text", kw=dict(), joint=True))
    for pipe, on in (("text", text), ("experts", experts)):
        if not on:
            continue
        rows += [
            dict(label="average of scores", pipe=pipe, kw=dict(operator="average")),
            dict(label="product (Composable Diffusion)", pipe=pipe, kw=dict(operator="product")),
            dict(label="SuperDiff AND (SDE)", pipe=pipe, kw=dict(operator="and", method="sde")),
            dict(
                label="SuperDiff AND (ODE, hutchinson_fd)",
                pipe=pipe,
                kw=dict(operator="and", method="ode", divergence="hutchinson_fd"),
            ),
        ]
    return rows


OR_ROWS = [
    dict(label="model A alone", pipe="a", kw=dict()),
    dict(label="model B alone", pipe="b", kw=dict()),
    dict(label="coin flip A / B (upper bound)", pipe=None, kw=None),
    dict(label="average of scores", pipe="ab", kw=dict(operator="average")),
    dict(label="SuperDiff OR (T = 1)", pipe="ab", kw=dict(operator="or", temperature=1.0)),
    dict(label="SuperDiff OR (T = 100)", pipe="ab", kw=dict(operator="or", temperature=100.0)),
]

PIPE_NAMES = {
    "text": "shapes-text",
    "experts": "colour + shape experts",
    "a": "shapes-uncond-a",
    "b": "shapes-uncond-b",
    "ab": "uncond-a + uncond-b",
}


def load(names: list[str], device: str = "cpu"):
    """Shipped models by folder name under model_cards/ (the demo's loader: missing / corrupt folders are named)."""
    from examples.demo import load as load_shipped

    pipe = load_shipped(names)
    return pipe if device == "cpu" else pipe.to(device)  # .to() on CPU only warns about fp32 modules


def train_steps(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / "train_info.json").read_text())["steps"])
    except (OSError, KeyError, ValueError):
        return None


def run(args) -> dict:
    from examples.shapes.classifier import load_classifier

    judge = load_classifier(CARDS / "shapes-classifier")
    examples = []  # (label, images) for --examples: the first EXAMPLES_PER_PAIR images of every pair, every AND row
    names = dict(
        text="shapes-text",
        colour="shapes-text-colour",
        shape=args.shape_expert,
        a="shapes-uncond-a",
        b="shapes-uncond-b",
    )
    cards = {k: CARDS / v for k, v in names.items()}
    pipes = {}
    if not args.skip_and:
        pipes["text"] = load([names["text"]], args.device)
        pipes["experts"] = load([names["colour"], names["shape"]], args.device)
    if not args.skip_or:
        pipes["a"] = load([names["a"]], args.device)
        pipes["b"] = load([names["b"]], args.device)
        pipes["ab"] = load([names["a"], names["b"]], args.device)
    pairs = ALL_PAIRS if args.all_pairs else DEFAULT_PAIRS[: args.pairs]
    result = {
        "config": dict(
            pairs=pairs,
            images_per_pair=args.images,
            steps=args.steps,
            guidance_scale=args.guidance,
            device=args.device,
            seed=args.seed,
            or_images=args.or_images,
            train_steps={k: train_steps(v) for k, v in cards.items()},
        ),
        "and": [],
        "or": [],
    }

    def call(pipe, n, seed, **kw):
        t0 = time.perf_counter()
        out = pipe(generator=torch.Generator().manual_seed(seed), batch_size=n, output_type="pt", **kw)
        sec = time.perf_counter() - t0
        images = out.images.float().cpu()
        ps, pc = judge.predict(images * 2 - 1)
        return images, ps, pc, sec, out

    for steps in args.steps:
        if not args.skip_and:
            for row in and_rows(text=True, experts=True):
                per_pair, total_sec, n_img, kmax, shown = [], 0.0, 0, 0.0, []
                for p, (colour, shape) in enumerate(pairs):
                    if row.get("joint"):
                        prompt = f"a {colour} {shape}"
                    else:
                        prompt = [f"a {colour} shape", f"a {shape}"]
                    images, ps, pc, sec, out = call(
                        pipes[row["pipe"]],
                        args.images,
                        args.seed + p,
                        prompt=prompt,
                        guidance_scale=args.guidance,
                        num_inference_steps=steps,
                        **row["kw"],
                    )
                    total_sec += sec
                    n_img += args.images
                    kmax = max(kmax, float(out.kappa.abs().max()))
                    per_pair.append(dict(pair=f"{colour} {shape}", **and_metrics(ps, pc, colour, shape)))
                    shown.append(images[:EXAMPLES_PER_PAIR])
                examples.append((f"{steps} steps, {PIPE_NAMES[row['pipe']]}: {row['label']}", torch.cat(shown)))
                mean = {k: sum(d[k] for d in per_pair) / len(per_pair) for k in ("both", "colour", "shape")}
                rec = dict(
                    steps=steps,
                    models=PIPE_NAMES[row["pipe"]],
                    method=row["label"],
                    **mean,
                    sec_per_image=total_sec / n_img,
                    max_abs_kappa=kmax,
                    per_pair=per_pair,
                )
                result["and"].append(rec)
                print(
                    f"# {steps} steps {rec['models']:<24} {rec['method']:<36} both {rec['both']:.2f} "
                    f"({rec['sec_per_image']:.2f} s/img)",
                    file=sys.stderr,
                    flush=True,
                )
        if not args.skip_or:
            cache = {}
            for row in OR_ROWS:
                if row["pipe"] is None:
                    (ia, sa), (ib, sb) = cache["a"], cache["b"]
                    images, sec = coin_flip(ia, ib), (sa + sb) / 2
                    ps, pc = judge.predict(images * 2 - 1)
                else:
                    images, ps, pc, sec, _ = call(
                        pipes[row["pipe"]],
                        args.or_images,
                        args.seed,
                        guidance_scale=1.0,
                        num_inference_steps=steps,
                        **row["kw"],
                    )
                    sec /= args.or_images
                    cache[row["pipe"]] = (images, sec)
                rec = dict(
                    steps=steps,
                    models=PIPE_NAMES.get(row["pipe"], "A / B"),
                    method=row["label"],
                    **or_metrics(ps, pc),
                    sec_per_image=sec,
                )
                result["or"].append(rec)
                print(
                    f"# {steps} steps {rec['method']:<36} half A {rec['half_a']:.2f} valid {rec['valid']:.2f}",
                    file=sys.stderr,
                    flush=True,
                )
    if args.examples and examples:
        from examples.demo import save_labelled_grid

        save_labelled_grid([(label, images, "and") for label, images in examples], Path(args.examples))
        print(f"# wrote {args.examples}: {EXAMPLES_PER_PAIR} images per pair, pairs in order {pairs}", file=sys.stderr)
    return result


def markdown(result: dict) -> str:
    cfg = result["config"]
    pairs = ", ".join(f"{c} {s}" for c, s in cfg["pairs"])
    lines = []
    if result["and"]:
        lines += [
            f"AND: {len(cfg['pairs'])} pairs ({pairs}) x {cfg['images_per_pair']} images, guidance "
            f"{cfg['guidance_scale']}, seed {cfg['seed']}",
            "",
            "| steps | models | method | both | colour | shape | s/img |",
            "|---:|---|---|---:|---:|---:|---:|",
        ]
        for r in result["and"]:
            lines.append(
                f"| {r['steps']} | {r['models']} | {r['method']} | {r['both']:.2f} | {r['colour']:.2f} | "
                f"{r['shape']:.2f} | {r['sec_per_image']:.2f} |"
            )
        lines += [
            "",
            "Per pair (both):",
            "",
            "| steps | models | method | " + " | ".join(d["pair"] for d in result["and"][0]["per_pair"]) + " |",
            "|---:|---|---|" + "---:|" * len(result["and"][0]["per_pair"]),
        ]
        for r in result["and"]:
            lines.append(
                f"| {r['steps']} | {r['models']} | {r['method']} | "
                + " | ".join(f"{d['both']:.2f}" for d in r["per_pair"])
                + " |"
            )
        lines.append("")
    if result["or"]:
        lines += [
            f"OR: {cfg['or_images']} images per row, no guidance, seed {cfg['seed']}",
            "",
            "| steps | method | half A | valid | s/img |",
            "|---:|---|---:|---:|---:|",
        ]
        for r in result["or"]:
            lines.append(
                f"| {r['steps']} | {r['method']} | {r['half_a']:.2f} | {r['valid']:.2f} | {r['sec_per_image']:.2f} |"
            )
        lines.append("")
    ts = cfg["train_steps"]
    lines.append("Training steps of the models: " + ", ".join(f"{k} {v}" for k, v in ts.items()))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=4, help="first N of the default pairs (one per colour and shape)")
    p.add_argument("--all-pairs", action="store_true", help="all 16 (colour, shape) pairs")
    p.add_argument("--images", type=int, default=8, help="images per pair for every AND row")
    p.add_argument("--or-images", type=int, default=32, help="images per OR row")
    p.add_argument("--steps", type=int, nargs="+", default=[50], help="e.g. --steps 50 200")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape-expert", default="shapes-text-shape", help="folder under model_cards/")
    p.add_argument("--skip-and", action="store_true")
    p.add_argument("--skip-or", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="e.g. cuda, cpu")
    p.add_argument("--examples", default=None, help="write a PNG grid of every AND row's images (2 per pair)")
    p.add_argument(
        "--json", nargs="?", const="-", default=None, help="write JSON to this file ('-' or no value: stdout)"
    )
    args = p.parse_args(argv)
    if not 1 <= args.pairs <= len(DEFAULT_PAIRS):
        p.error(f"--pairs must be 1..{len(DEFAULT_PAIRS)}; use --all-pairs for all 16")
    if args.images < 1 or args.or_images < 2:
        p.error("--images must be >= 1 and --or-images >= 2")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = run(args)
    result["total_seconds"] = time.perf_counter() - t0
    if args.json == "-":
        print(json.dumps(result, indent=2))
        return
    print(markdown(result))
    print(f"\n({result['total_seconds']:.0f} s in all)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
