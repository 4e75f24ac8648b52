"""Quality of every operator on the shipped shapes models, under two judges, with 95% intervals and network cost.

    python benchmarks/bench_shapes.py --pairs 1 --images-per-pair 2 --or-images 2 --steps 3      # a smoke run
    python benchmarks/bench_shapes.py --all-pairs --images-per-pair 16 --or-images 256 --steps 50 \\
        --json benchmarks/results/shapes_full.json --grid benchmarks/results/shapes_full_grid.png --resume

AND part, for each (colour, shape) pair, e.g. (red, circle), with the same seeds for every row (seed + pair index):
  - joint prompt "a red circle" on shapes-text (a caption it has never seen: its captions name ONE attribute);
  - the ceiling: the joint prompt on shapes-text-joint, the same model trained with captions that also name both
    attributes (what a model that WAS taught "a red circle" scores; every composition is read against it);
  - average of scores, product (Composable Diffusion), SuperDiff AND, and the product sampled by particles
    (operator="product_smc", `--particles` per image) of "a red shape" and "a circle", on shapes-text and across
    the two experts (shapes-text-colour gets "a red shape", shapes-text-shape gets "a circle").
OR part (unconditional, no guidance): shapes-uncond-a (circles, squares), shapes-uncond-b (triangles, stars),
  a coin flip between them (even images from A, odd from B: the upper bound on a mixture), average of scores,
  SuperDiff OR at temperature 1 and 100.
Every row is run with the SDE (Euler-Maruyama) and with the probability-flow ODE (`--divergence`, `--probes`,
`--solver`); a combination the pipeline refuses (product_smc with the ODE: its weights need the SDE) is listed as
refused, with the pipeline's reason, instead of a row.

Two judges read every image: the shipped classifier (shapes-classifier, argmax of each head; "valid" = confidence
> 0.9 on both heads) and the geometric judge (examples/shapes/geometry.py: measured fill, solidity, corners and hue
with thresholds fitted on renders; it answers "none" (-1) for an object that is none of the four shapes or
colours, and for blank or noisy images). Columns, per judge:
  AND: both = share of images judged the pair's colour AND shape; colour / shape = each alone; geometry none = share
       the geometric judge gives no shape or no colour.
  OR:  half A = share judged circle or square; valid = classifier: confidence > 0.9 on both heads, geometry: a
       shape and a colour (not "none").
  agreement: share of images where the judges agree: AND: on the colour label, on the shape label (a "none" agrees
       with nothing), and on the verdict "is the pair"; OR: on the shape label, on "half A" and on "valid".
Every rate has a 95% percentile-bootstrap interval (`--bootstrap` resamples, seed 0; resampling images within each
pair for the AND rows, so the pairs stay balanced): "0.56 [0.50, 0.62]".
NFE/img: UNet forward rows per output image, counted by forward hooks on the pipeline's UNets during the row (one
row = one network evaluated on one latent: the conditional and unconditional branches, every term, every probe
point of the finite-difference divergence, every particle and the final denoising all count). s/img is wall clock
per output image on whatever machine runs it (compare rows of one run only).

`--json` is rewritten after every row (with `<json>.tiles.npz`: a few images per row for the grid, and every
image's verdicts inside the JSON), so `--resume` restarts an interrupted run where it stopped; `--rows` runs only
the rows whose label contains one of the given strings. `--grid` draws every row's first images, each labelled by
both judges (text under the tile, coloured bars above it).
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

from examples.shapes.data import COLOURS, SHAPES  # noqa: E402

CARDS = ROOT / "model_cards"
DEFAULT_PAIRS = [("red", "circle"), ("green", "square"), ("blue", "triangle"), ("yellow", "star")]
ALL_PAIRS = [(c, s) for c in COLOURS for s in SHAPES]
HALF_A = ("circle", "square")
VALID_CONFIDENCE = 0.9
OR_TILES = 32  # images of every OR row kept for the grid
PROGRESS_EVERY = 30.0  # seconds between progress lines inside a row
PIPE_NAMES = {
    "text": "shapes-text",
    "joint": "shapes-text-joint (ceiling)",
    "experts": "colour + shape experts",
    "flow": "shapes-text-flow",
    "a": "shapes-uncond-a",
    "b": "shapes-uncond-b",
    "ab": "uncond-a + uncond-b",
    None: "A / B",
}
JUDGES = ("classifier", "geometry")


# ---------------------------------------------------------------------------------------------------- statistics
def bootstrap_ci(
    values: np.ndarray, strata: np.ndarray | None = None, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> np.ndarray:
    """Percentile-bootstrap intervals of the means of the columns of `values` ((n,) or (n, k)): (k, 2) (or (2,)).

    Images are resampled with replacement (within each stratum when `strata` (n,) is given, so every stratum keeps
    its size); all columns share the resamples. Deterministic for a given seed."""
    v = np.asarray(values, dtype=np.float64)
    one = v.ndim == 1
    v = v[:, None] if one else v
    n = v.shape[0]
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if strata is None else [np.flatnonzero(strata == s) for s in np.unique(strata)]
    sums = np.zeros((n_boot, v.shape[1]))
    for members in groups:
        idx = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
        sums += v[idx].sum(1)
    means = sums / n
    alpha = (1 - level) / 2
    out = np.quantile(means, [alpha, 1 - alpha], axis=0).T
    return out[0] if one else out


def rates(columns: dict[str, np.ndarray], strata=None, n_boot: int = 2000) -> dict:
    """{name: {"rate": mean, "ci": [lo, hi]}} of boolean columns (one shared bootstrap)."""
    names = list(columns)
    mat = np.stack([np.asarray(columns[k], dtype=np.float64) for k in names], 1)
    ci = bootstrap_ci(mat, strata, n_boot)
    return {
        k: {"rate": float(mat[:, i].mean()), "ci": [float(ci[i, 0]), float(ci[i, 1])]} for i, k in enumerate(names)
    }


def fmt(r: dict) -> str:
    return f"{r['rate']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]"


# ---------------------------------------------------------------------------------------------------- verdicts
def encode(idx) -> str:
    """Per-image labels as a string: '0'-'9' an index, '-' none (-1)."""
    return "".join("-" if int(i) < 0 else str(int(i)) for i in idx)


def decode(s: str) -> np.ndarray:
    return np.array([-1 if ch == "-" else int(ch) for ch in s], dtype=np.int64)


def judge_images(images: torch.Tensor, classifier, geometry) -> dict:
    """Both judges' verdicts on images in [0, 1] (n, 3, H, W), as strings (see `encode`)."""
    x = images.float().cpu() * 2 - 1
    ps, pc = classifier.predict(x)
    valid = (ps.max(1).values > VALID_CONFIDENCE) & (pc.max(1).values > VALID_CONFIDENCE)
    gs, gc = geometry.predict(x)
    return {
        "classifier_shape": encode(ps.argmax(1)),
        "classifier_colour": encode(pc.argmax(1)),
        "classifier_valid": encode(valid.long()),
        "geometry_shape": encode(gs),
        "geometry_colour": encode(gc),
    }


def concat_verdicts(parts: list[dict]) -> dict:
    return {k: "".join(p[k] for p in parts) for k in parts[0]}


def coin_flip_verdicts(va: dict, vb: dict) -> dict:
    """Even images from A, odd from B (what an exact 50/50 mixture of the two rows would give)."""
    return {k: "".join(a if i % 2 == 0 else b for i, (a, b) in enumerate(zip(va[k], vb[k], strict=True))) for k in va}


def coin_flip(images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
    """The same interleaving on images."""
    out = images_a.clone()
    out[1::2] = images_b[1::2]
    return out


def and_metrics(verdicts: dict, pairs: list, per_pair: int, n_boot: int = 2000) -> dict:
    """Rates of an AND row under both judges, their agreement, and the per-pair rates, with intervals."""
    tc = np.repeat([COLOURS.index(c) for c, _ in pairs], per_pair)
    ts = np.repeat([SHAPES.index(s) for _, s in pairs], per_pair)
    strata = np.repeat(np.arange(len(pairs)), per_pair)
    cols, ok = {}, {}
    for j in JUDGES:
        s, c = decode(verdicts[f"{j}_shape"]), decode(verdicts[f"{j}_colour"])
        ok[j] = dict(colour=c == tc, shape=s == ts, both=(c == tc) & (s == ts), s=s, c=c)
        cols.update({f"{j}.{k}": ok[j][k] for k in ("both", "colour", "shape")})
    g = ok["geometry"]
    cols["geometry.none"] = (g["s"] < 0) | (g["c"] < 0)
    cols["agree.colour"] = ok["classifier"]["c"] == g["c"]
    cols["agree.shape"] = ok["classifier"]["s"] == g["s"]
    cols["agree.both"] = ok["classifier"]["both"] == g["both"]
    flat = rates(cols, strata, n_boot)
    out = {j: {} for j in (*JUDGES, "agree")}
    for k, v in flat.items():
        j, name = k.split(".")
        out[j][name] = v
    out["per_pair"] = []
    for p, (colour, shape) in enumerate(pairs):
        sel = strata == p
        cols_p = {f"{j}.{k}": ok[j][k][sel] for j in JUDGES for k in ("both", "colour", "shape")}
        cols_p["agree.colour"] = cols["agree.colour"][sel]
        cols_p["agree.shape"] = cols["agree.shape"][sel]
        pp = rates(cols_p, None, n_boot)
        rec = {"pair": f"{colour} {shape}"}
        for k, v in pp.items():
            j, name = k.split(".")
            rec.setdefault(j, {})[name] = v
        out["per_pair"].append(rec)
    return out


def or_metrics(verdicts: dict, n_boot: int = 2000) -> dict:
    """Half A and validity of an OR row under both judges, with their agreement."""
    half = [SHAPES.index(s) for s in HALF_A]
    cols, v = {}, {}
    for j in JUDGES:
        s, c = decode(verdicts[f"{j}_shape"]), decode(verdicts[f"{j}_colour"])
        valid = decode(verdicts["classifier_valid"]) == 1 if j == "classifier" else (s >= 0) & (c >= 0)
        v[j] = dict(half_a=np.isin(s, half), valid=valid, s=s)
        cols[f"{j}.half_a"], cols[f"{j}.valid"] = v[j]["half_a"], valid
    cols["agree.shape"] = v["classifier"]["s"] == v["geometry"]["s"]
    cols["agree.half_a"] = v["classifier"]["half_a"] == v["geometry"]["half_a"]
    cols["agree.valid"] = v["classifier"]["valid"] == v["geometry"]["valid"]
    out = {j: {} for j in (*JUDGES, "agree")}
    for k, r in rates(cols, None, n_boot).items():
        j, name = k.split(".")
        out[j][name] = r
    return out


# ---------------------------------------------------------------------------------------------------- rows
def smc_refusal(particles: int, method: str) -> str | None:
    """The pipeline's own reason for refusing product_smc with `method` (None when it accepts it)."""
    from compose.smc import check_smc_options

    try:
        check_smc_options(particles, 0.5, (0.0, 1.0), method)
    except ValueError as err:
        return str(err)
    return None


def method_kw(method: str, divergence: str, solver: str, probes: int) -> tuple[dict, str]:
    if method == "sde":
        return dict(method="sde"), "SDE"
    return dict(method="ode", divergence=divergence, solver=solver, probes=probes), f"ODE, {divergence}, {solver}"


AND_CLAMP01 = "and, clamp (0, 1)"  # a JSON-safe name for the operator `and_clamped` builds


def and_clamped(a, b):
    """AND with its weights clamped to [0, 1] (`compose.AND(clamp=...)`), as the pipeline's operator callable."""
    import compose

    return compose.AND(a, b, clamp=(0.0, 1.0))


def and_rows(
    text=True, experts=True, flow=True, particles=4, divergence="hutchinson_fd", solver="euler", probes=1, joint=True
) -> list[dict]:
    """The AND rows: for each pipeline and operator, an SDE and an ODE row (or the refusal of one)."""
    ops = [
        ("average of scores", dict(operator="average")),
        ("product (Composable Diffusion)", dict(operator="product")),
        ("SuperDiff AND", dict(operator="and")),
        ("SuperDiff AND, kappa clamped to [0, 1]", dict(operator=AND_CLAMP01)),
        ("product_smc", dict(operator="product_smc", num_particles=particles)),
    ]
    rows = []
    for pipe, on in (("joint", joint), ("text", text), ("experts", experts), ("flow", flow)):
        if not on:
            continue
        pipe_ops = [] if pipe == "joint" else ops
        for name, kw in ([("joint prompt", dict())] if pipe in ("joint", "text", "flow") else []) + pipe_ops:
            for method in ("sde", "ode"):
                mkw, tag = method_kw(method, divergence, solver, probes)
                if kw.get("operator") == "product_smc":
                    tag += f", {particles} particles"
                joint = name == "joint prompt"
                row = dict(part="and", pipe=pipe, label=f"{name} ({tag})", sampler=tag, kw={**kw, **mkw}, joint=joint,
                           method=method, terms=1 if joint else 2)  # fmt: skip
                if kw.get("operator") == "product_smc":
                    row["refused"] = smc_refusal(particles, method)
                rows.append(row)
    return rows


def or_rows(divergence="hutchinson_fd", solver="euler", probes=1) -> list[dict]:
    ops = [
        ("model A alone", "a", dict()),
        ("model B alone", "b", dict()),
        ("coin flip A / B (upper bound)", None, None),
        ("average of scores", "ab", dict(operator="average")),
        ("SuperDiff OR (T = 1)", "ab", dict(operator="or", temperature=1.0)),
        ("SuperDiff OR (T = 100)", "ab", dict(operator="or", temperature=100.0)),
    ]
    rows = []
    for name, pipe, kw in ops:
        for method in ("sde", "ode"):
            mkw, tag = method_kw(method, divergence, solver, probes)
            full = None if kw is None else {**kw, **mkw}
            rows.append(dict(part="or", pipe=pipe, label=f"{name} ({tag})", sampler=tag, kw=full, method=method,
                             terms=2 if pipe == "ab" else 1))  # fmt: skip
    return rows


def row_key(steps: int, row: dict) -> str:
    return f"{steps} steps | {PIPE_NAMES[row['pipe']]} | {row['label']}"


def build_rows(args) -> list[tuple[int, dict]]:
    """(steps, row) for every row the arguments select, refused ones included (they carry `refused`)."""
    common = dict(divergence=args.divergence, solver=args.solver, probes=args.probes)
    rows = [] if args.skip_and else and_rows(particles=args.particles, **common)
    rows += [] if args.skip_or else or_rows(**common)
    out = [(steps, row) for steps in args.steps for row in rows]
    if args.rows:  # case-sensitive: "ODE" must not pick "model A alone (SDE)"
        out = [(s, r) for s, r in out if any(w in row_key(s, r) for w in args.rows)]
    return out


def row_weight(row: dict, steps: int, args) -> float:
    """A priori UNet rows of a row (its images x steps x rows per image and step): only for the time estimate."""
    per = row["terms"] * (1 + args.probes if row["method"] == "ode" else 1)
    per += {"text": 1, "joint": 1, "experts": 2, "flow": 1}.get(row["pipe"], 0)  # unconditional rows under guidance
    if row["kw"] and row["kw"].get("operator") == "product_smc":
        per *= args.particles
    if row["pipe"] is None:
        return 0.0
    n = args.or_images if row["part"] == "or" else args.images_per_pair * len(pairs_of(args))
    return float(n * (steps + 1) * per)


def pairs_of(args) -> list:
    return ALL_PAIRS if args.all_pairs else DEFAULT_PAIRS[: args.pairs]


# ---------------------------------------------------------------------------------------------------- network cost
class UNetCounter(contextlib.AbstractContextManager):
    """Counts forward calls and rows (batch entries) of every distinct network (UNet or transformer) of a pipeline
    while the block runs."""

    def __init__(self, pipe):
        models = getattr(pipe, "models", None) or [pipe]
        self.unets = list({id(m.network): m.network for m in models}.values())
        self.calls = 0
        self.rows = 0
        self._hooks = []

    def _hook(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self.calls += 1
        self.rows += int(x.shape[0])

    def __enter__(self):
        self._hooks = [u.register_forward_pre_hook(self._hook, with_kwargs=True) for u in self.unets]
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return False


# ---------------------------------------------------------------------------------------------------- running
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


MODEL_NAMES = dict(
    text=["shapes-text"],
    joint=["shapes-text-joint"],
    experts=["shapes-text-colour", "shapes-text-shape"],
    flow=["shapes-text-flow"],
    a=["shapes-uncond-a"],
    b=["shapes-uncond-b"],
    ab=["shapes-uncond-a", "shapes-uncond-b"],
)
COMPARED = ("pairs", "images_per_pair", "or_images", "guidance_scale", "seed")  # a resumed run must match these


def config_of(args) -> dict:
    names = {**MODEL_NAMES, "experts": ["shapes-text-colour", args.shape_expert]}
    folders = sorted({n for v in names.values() for n in v})
    return dict(
        pairs=[list(p) for p in pairs_of(args)],
        images_per_pair=args.images_per_pair,
        or_images=args.or_images,
        steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        particles=args.particles,
        divergence=args.divergence,
        solver=args.solver,
        probes=args.probes,
        bootstrap=args.bootstrap,
        device=args.device,
        models={k: v for k, v in names.items()},
        train_steps={f: train_steps(CARDS / f) for f in folders},
        geometry_judge=str(Path("benchmarks/results/geometry_judge_calibration.json")),
        nfe="UNet forward rows per output image, counted by forward hooks",
    )


def tiles_path(json_path: str | None) -> Path | None:
    return None if not json_path or json_path == "-" else Path(str(json_path) + ".tiles.npz")


def save_state(result: dict, tiles: dict, args) -> None:
    if not args.json or args.json == "-":
        return
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    keys = sorted(tiles)
    tp = tiles_path(args.json)
    with open(str(tp) + ".tmp", "wb") as fh:
        np.savez_compressed(fh, keys=np.array(keys), **{f"t{i}": tiles[k] for i, k in enumerate(keys)})
    os.replace(str(tp) + ".tmp", tp)


def load_state(args) -> tuple[dict | None, dict]:
    """(the JSON of an earlier run, its tiles) for --resume; (None, {}) when there is none."""
    if not (args.resume and args.json and args.json != "-" and Path(args.json).is_file()):
        return None, {}
    result = json.loads(Path(args.json).read_text())
    tiles = {}
    tp = tiles_path(args.json)
    if tp.is_file():
        with np.load(tp) as z:
            tiles = {str(k): z[f"t{i}"] for i, k in enumerate(z["keys"])}
    return result, tiles


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[0, 1] (n, 3, H, W) -> uint8 (n, H, W, 3)."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def run_row(row: dict, steps: int, pipes: dict, judges: tuple, args) -> tuple[dict, np.ndarray]:
    """Sample one row, judge it; returns (record without the metrics, tiles for the grid)."""
    pipe = pipes[row["pipe"]]
    pairs = pairs_of(args)
    parts, tiles, kmax, smc = [], [], 0.0, []
    gaps, kappas, bad = [], [], {"nonfinite": 0, "saturated": 0}
    kw = dict(row["kw"])
    if kw.get("operator") == AND_CLAMP01:
        kw["operator"] = and_clamped
    common = dict(num_inference_steps=steps, output_type="pt", **kw)
    if row["part"] == "and":
        calls = []
        for p, (colour, shape) in enumerate(pairs):
            prompt = f"a {colour} {shape}" if row.get("joint") else [f"a {colour} shape", f"a {shape}"]
            calls.append((args.seed + p, args.images_per_pair, dict(prompt=prompt, guidance_scale=args.guidance)))
    else:
        calls = []
        for k, start in enumerate(range(0, args.or_images, args.or_batch)):
            calls.append((args.seed + k, min(args.or_batch, args.or_images - start), dict(guidance_scale=1.0)))
    t0 = last = time.perf_counter()
    with UNetCounter(pipe) as counter:
        for i, (seed, n, kw) in enumerate(calls):
            now = time.perf_counter()
            if i and now - last > PROGRESS_EVERY:  # a row can take many minutes: say where it is
                left = (now - t0) / i * (len(calls) - i)
                print(f"#   {row['label']} ({PIPE_NAMES[row['pipe']]}): call {i}/{len(calls)}, {now - t0:.0f} s, "
                      f"about {left / 60:.1f} min left in this row", file=sys.stderr, flush=True)  # fmt: skip
                last = now
            out = pipe(generator=torch.Generator().manual_seed(seed), batch_size=n, **kw, **common)
            images = out.images.float().cpu()
            bad["nonfinite"] += int((~torch.isfinite(images).flatten(1).all(1)).sum())
            # saturated: over 90% of an image's values at 0 or 1 (what extreme weights would produce)
            bad["saturated"] += int((((images <= 0) | (images >= 1)).flatten(1).float().mean(1) > 0.9).sum())
            if out.log_q.shape[-1] == 2:
                gaps.append((out.log_q[:, 0] - out.log_q[:, 1]).abs())
            if out.kappa.shape[-1] == 2 and row["part"] == "and":
                kappas.append(out.kappa[..., 0])
            parts.append(judge_images(images, *judges))
            tiles.append(images[: args.grid_per_pair] if row["part"] == "and" else images)
            kmax = max(kmax, float(out.kappa.abs().max()))
            if getattr(out, "evaluations", None) is not None:
                smc.append((n, float(out.evaluations.double().mean()), float(out.num_resamples.double().mean())))
    sec = time.perf_counter() - t0
    n_img = sum(n for _, n, _ in calls)
    rec = dict(
        images=n_img,
        nfe_per_image=counter.rows / n_img,
        unet_calls_per_image=counter.calls / n_img,
        sec_per_image=sec / n_img,
        max_abs_kappa=kmax,
        verdicts=concat_verdicts(parts),
        **bad,
    )
    if gaps:  # the terms' final tracked log q gap: 0 is what AND promises
        rec["log_q_gap_median"] = float(torch.cat(gaps).median())
    if kappas:  # the first term's weight at every step over the images: (5%, 50%, 95%) and the extremes
        k = torch.cat(kappas, 1)
        q = torch.quantile(k, torch.tensor([0.05, 0.5, 0.95], dtype=k.dtype), dim=1)
        rec["kappa_steps"] = {"min": k.amin(1).tolist(), "p05": q[0].tolist(), "median": q[1].tolist(),
                              "p95": q[2].tolist(), "max": k.amax(1).tolist()}  # fmt: skip
    if smc:
        w = sum(n for n, _, _ in smc)
        rec["smc"] = dict(
            particles=row["kw"]["num_particles"],
            evaluations_per_particle=sum(n * e for n, e, _ in smc) / w,
            resamples_per_image=sum(n * r for n, _, r in smc) / w,
        )
    keep = torch.cat(tiles)[: OR_TILES if row["part"] == "or" else None]
    return rec, to_uint8(keep)


def add_metrics(rec: dict, part: str, args) -> dict:
    if part == "and":
        rec.update(and_metrics(rec["verdicts"], pairs_of(args), args.images_per_pair, args.bootstrap))
    else:
        rec.update(or_metrics(rec["verdicts"], args.bootstrap))
    return rec


def run(args) -> dict:
    from examples.shapes.classifier import load_classifier
    from examples.shapes.geometry import load_geometry_judge

    judges = (load_classifier(CARDS / "shapes-classifier"), load_geometry_judge())
    config = config_of(args)
    result, tiles = load_state(args)
    if result is not None:
        old = result.get("config", {})
        diff = [k for k in COMPARED if old.get(k) != config[k]]
        if diff:
            raise SystemExit(
                f"--resume: {args.json} was run with other {', '.join(diff)} "
                f"({', '.join(f'{k}={old.get(k)!r}' for k in diff)}); give the same options or another --json."
            )
        print(f"# resuming {args.json}: {len(result['and']) + len(result['or'])} rows done", file=sys.stderr)
        result["config"]["steps"] = sorted(set(old.get("steps", [])) | set(args.steps))
    else:
        result = {"config": config, "and": [], "or": [], "refused": []}
    done = {r["key"] for r in result["and"] + result["or"]}
    selected = build_rows(args)
    for steps, row in selected:
        key = row_key(steps, row)
        if row.get("refused") and key not in {r["key"] for r in result["refused"]}:
            result["refused"].append(dict(key=key, steps=steps, models=PIPE_NAMES[row["pipe"]], method=row["label"],
                                          reason=row["refused"]))  # fmt: skip
    todo = [(s, r) for s, r in selected if not r.get("refused") and row_key(s, r) not in done]
    skipped = len(selected) - len(todo) - sum(1 for _, r in selected if r.get("refused"))
    print(f"# {len(todo)} rows to run, {skipped} already in {args.json}" if skipped else f"# {len(todo)} rows to run",
          file=sys.stderr, flush=True)  # fmt: skip
    names = {**MODEL_NAMES, "experts": ["shapes-text-colour", args.shape_expert]}
    pipes: dict = {}
    weights = [row_weight(r, s, args) for s, r in todo]
    spent, spent_w, t_start = 0.0, 0.0, time.perf_counter()
    for i, (steps, row) in enumerate(todo):
        key = row_key(steps, row)
        if row["pipe"] is not None and row["pipe"] not in pipes:  # loading is not part of the row's time
            pipes[row["pipe"]] = load(names[row["pipe"]], args.device)
        t_row = time.perf_counter()
        base = dict(key=key, steps=steps, models=PIPE_NAMES[row["pipe"]], method=row["label"], sampler=row["sampler"])
        if row["pipe"] is None:  # the coin flip, from the A and B rows of the same steps and method
            src = {r["models"]: r for r in result["or"] if r["steps"] == steps and r.get("sampler") == row["sampler"]
                   and r["models"] in (PIPE_NAMES["a"], PIPE_NAMES["b"])}  # fmt: skip
            ra, rb = src.get(PIPE_NAMES["a"]), src.get(PIPE_NAMES["b"])
            if ra is None or rb is None:
                print(f"# {key}: needs the A and B rows of the same method (select them with --rows)", file=sys.stderr)
                continue
            rec = dict(base, images=ra["images"], nfe_per_image=(ra["nfe_per_image"] + rb["nfe_per_image"]) / 2,
                       unet_calls_per_image=(ra["unet_calls_per_image"] + rb["unet_calls_per_image"]) / 2,
                       sec_per_image=(ra["sec_per_image"] + rb["sec_per_image"]) / 2,
                       verdicts=coin_flip_verdicts(ra["verdicts"], rb["verdicts"]))  # fmt: skip
            ta, tb = tiles.get(ra["key"]), tiles.get(rb["key"])
            if ta is not None and tb is not None and len(ta) == len(tb):
                tiles[key] = coin_flip(torch.from_numpy(ta), torch.from_numpy(tb)).numpy()
        else:
            rec, tiles[key] = run_row(row, steps, pipes, judges, args)
            rec = dict(base, **rec)
        add_metrics(rec, row["part"], args)
        result[row["part"]].append(rec)
        save_state(result, tiles, args)
        spent += time.perf_counter() - t_row
        spent_w += weights[i]
        left = sum(weights[i + 1 :]) * spent / spent_w if spent_w else float("nan")
        head = "both" if row["part"] == "and" else "half_a"
        print(
            f"# [{i + 1}/{len(todo)}] {key}: {head} classifier {fmt(rec['classifier'][head])}, geometry "
            f"{fmt(rec['geometry'][head])}; NFE/img {rec['nfe_per_image']:.0f}, {rec['sec_per_image']:.2f} s/img; "
            f"row {time.perf_counter() - t_row:.0f} s, elapsed {(time.perf_counter() - t_start) / 60:.1f} min, "
            f"about {left / 60:.1f} min left",
            file=sys.stderr,
            flush=True,
        )
    order = {
        row_key(s, r): k for k, (s, r) in enumerate(build_rows(argparse.Namespace(**{**vars(args), "rows": None})))
    }
    for part in ("and", "or"):
        result[part].sort(key=lambda r: order.get(r["key"], len(order)))
    if args.grid:
        save_grid(result, tiles, judges, Path(args.grid), args)
    return result


# ---------------------------------------------------------------------------------------------------- grid
GOOD, HALF, BAD, NONE = (40, 170, 60), (235, 150, 20), (210, 40, 40), (150, 150, 150)


def verdict_text(shape: int, colour: int) -> str:
    return f"{COLOURS[colour] if colour >= 0 else '-'} {SHAPES[shape] if shape >= 0 else '-'}"


def save_grid(result: dict, tiles: dict, judges: tuple, path: Path, args, scale: int = 3, pad: int = 3) -> None:
    """Every row's kept images (AND: the first `--grid-per-pair` of each pair, pairs in table order; OR: the first
    images), each with both judges' verdicts: text under the tile ("C" classifier, "G" geometry: colour shape, "-"
    none) and two bars above it (left classifier, right geometry; AND: green = the pair, orange = one of colour and
    shape, red = neither, grey = no verdict; OR: green = valid, red = not)."""
    from PIL import Image, ImageDraw

    rows = [(r, tiles[r["key"]]) for r in result["and"] + result["or"] if r["key"] in tiles]
    if not rows:
        return
    side = rows[0][1].shape[1] * scale
    bar, text_h, label_h = 5, 24, 14
    cell_w, cell_h = side + pad, bar + 1 + side + text_h
    ncol = max(len(t) for _, t in rows)
    legend = [
        "Under each image: C = shipped classifier, G = geometric judge (colour shape; '-' = none).",
        "Bars above it (left C, right G): AND rows: green = the pair, orange = its colour or shape only,",
        "red = neither, grey = no verdict; OR rows: green = valid, red = not.",
        f"AND rows: {args.grid_per_pair} images per pair, pairs in the order of the per-pair tables.",
    ]
    width = max(pad + ncol * cell_w, 520)
    height = pad + len(legend) * label_h + len(rows) * (label_h + cell_h + pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = pad
    for line in legend:
        draw.text((pad, y), line, fill=(0, 0, 0))
        y += label_h
    pairs = [tuple(p) for p in result["config"]["pairs"]]
    and_keys = {r["key"] for r in result["and"]}
    for rec, arr in rows:
        draw.text((pad, y), rec["key"], fill=(0, 0, 0))
        y += label_h
        v = judge_images(torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255, *judges)  # re-judged: the same
        per = len(arr) // len(pairs) if rec["key"] in and_keys else None
        for i in range(len(arr)):
            x = pad + i * cell_w
            marks = []
            for j in JUDGES:
                s, c = int(decode(v[f"{j}_shape"][i])[0]), int(decode(v[f"{j}_colour"][i])[0])
                if per:
                    tc, ts = pairs[i // per]
                    ok = (c == COLOURS.index(tc)) + (s == SHAPES.index(ts))
                    col = NONE if s < 0 and c < 0 else (GOOD, HALF, BAD)[2 - ok]
                else:
                    valid = v["classifier_valid"][i] == "1" if j == "classifier" else s >= 0 and c >= 0
                    col = GOOD if valid else BAD
                marks.append((col, f"{j[0].upper()} {verdict_text(s, c)}"))
            half = side // 2
            draw.rectangle([x, y, x + half - 2, y + bar - 1], fill=marks[0][0])
            draw.rectangle([x + half + 1, y, x + side - 1, y + bar - 1], fill=marks[1][0])
            canvas.paste(Image.fromarray(arr[i]).resize((side, side), Image.NEAREST), (x, y + bar + 1))
            for k, (_, text) in enumerate(marks):
                draw.text((x, y + bar + 1 + side + 1 + 11 * k), text, fill=(0, 0, 0))
        y += cell_h + pad
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    print(f"# wrote {path}: {len(rows)} rows", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- tables
def markdown(result: dict) -> str:
    cfg = result["config"]
    pairs = ", ".join(f"{c} {s}" for c, s in cfg["pairs"])
    lines = []
    if result["and"]:
        lines += [
            f"AND: {len(cfg['pairs'])} pairs ({pairs}) x {cfg['images_per_pair']} images, guidance "
            f"{cfg['guidance_scale']}, seed {cfg['seed']}; rates with 95% bootstrap intervals; C = classifier, "
            "G = geometric judge",
            "",
            "| steps | models | method | NFE/img | s/img | both C | both G | colour C | colour G | shape C | shape G "
            "| G none | agree colour | agree shape | agree both | log q gap | max abs kappa |",
            "|---:|---|---|---:|---:|" + "---:|" * 12,
        ]
        for r in result["and"]:
            c, g, a = r["classifier"], r["geometry"], r["agree"]
            cells = [c["both"], g["both"], c["colour"], g["colour"], c["shape"], g["shape"], g["none"]]
            cells += [a["colour"], a["shape"], a["both"]]
            gap = f"{r['log_q_gap_median']:.2f}" if "log_q_gap_median" in r else "-"
            # product_smc's weights are its fixed exponents with the guidance folded in (w per term, 1 - sum for the
            # unconditional row): not a learned weight, so "-" as for the joint prompt
            kap = f"{r['max_abs_kappa']:.2f}" if "log_q_gap_median" in r and "smc" not in r else "-"
            lines.append(
                f"| {r['steps']} | {r['models']} | {r['method']} | {r['nfe_per_image']:.0f} | "
                f"{r['sec_per_image']:.2f} | " + " | ".join(fmt(x) for x in cells) + f" | {gap} | {kap} |"
            )
        for j, name in (("classifier", "classifier"), ("geometry", "geometric judge")):
            lines += [
                "",
                f"Per pair, the share that is both ({name}):",
                "",
                "| steps | models | method | " + " | ".join(d["pair"] for d in result["and"][0]["per_pair"]) + " |",
                "|---:|---|---|" + "---:|" * len(result["and"][0]["per_pair"]),
            ]
            for r in result["and"]:
                lines.append(
                    f"| {r['steps']} | {r['models']} | {r['method']} | "
                    + " | ".join(fmt(d[j]["both"]) for d in r["per_pair"])
                    + " |"
                )
        lines.append("")
    if result["or"]:
        lines += [
            f"OR: {cfg['or_images']} images per row, no guidance, seed {cfg['seed']}; C = classifier, G = geometric "
            "judge",
            "",
            "| steps | method | NFE/img | s/img | half A C | half A G | valid C | valid G | agree shape "
            "| agree half A | agree valid |",
            "|---:|---|---:|---:|" + "---:|" * 7,
        ]
        for r in result["or"]:
            c, g, a = r["classifier"], r["geometry"], r["agree"]
            cells = [c["half_a"], g["half_a"], c["valid"], g["valid"], a["shape"], a["half_a"], a["valid"]]
            lines.append(
                f"| {r['steps']} | {r['method']} | {r['nfe_per_image']:.0f} | {r['sec_per_image']:.2f} | "
                + " | ".join(fmt(x) for x in cells)
                + " |"
            )
        lines.append("")
    for r in result.get("refused", []):
        lines.append(
            f"Refused by the pipeline, not run: {r['steps']} steps, {r['models']}, {r['method']}: {r['reason']}"
        )
    for r in result["and"]:
        ks = r.get("kappa_steps")
        if not ks or min(ks["min"]) == max(ks["max"]):
            continue  # fixed weights (average, product): nothing to report
        n = len(ks["median"])
        at = sorted({0, n // 4, n // 2, 3 * n // 4, n - 1})
        spread = ", ".join(f"step {i}: {ks['p05'][i]:.2f} / {ks['median'][i]:.2f} / {ks['p95'][i]:.2f}" for i in at)
        lines.append(
            f"{r['key']}: kappa of the first term (5% / median / 95% over images) {spread}; extremes "
            f"{min(ks['min']):.2f} to {max(ks['max']):.2f}; non-finite images {r.get('nonfinite', 0)}, saturated "
            f"{r.get('saturated', 0)}"
        )
    lines += judge_sanity(result)
    smc = [r for r in result["and"] if "smc" in r]
    for r in smc:
        s = r["smc"]
        lines.append(
            f"{r['key']}: {s['particles']} particles, {s['evaluations_per_particle']:.0f} evaluations per particle "
            f"(pipeline count), {s['resamples_per_image']:.1f} resamplings per image"
        )
    ts = cfg["train_steps"]
    lines.append("Training steps of the models: " + ", ".join(f"{k} {v}" for k, v in ts.items()))
    return "\n".join(lines)


def judge_sanity(result: dict) -> list[str]:
    """The judges' agreement per prompt pair: how often the classifier's and the geometric judge's labels agree on
    shape and on colour, over every AND row of each model set (and per pair over all of them). Where they agree
    less than 0.9, one judge is wrong on these images: look at them before reading the rates."""
    rows = [r for r in result["and"] if r.get("per_pair") and "agree" in r["per_pair"][0]]
    if not rows:
        return []
    pairs = [d["pair"] for d in rows[0]["per_pair"]]
    sets = list(dict.fromkeys(r["models"] for r in rows))
    lines = [
        "",
        "Judge sanity: share of images on which the two judges give the same shape / the same colour label, per "
        "prompt pair, pooled over every AND row of the model set (a geometric 'none' agrees with nothing):",
        "",
        "| models | rows | " + " | ".join(pairs) + " | all |",
        "|---|---:|" + "---:|" * (len(pairs) + 1),
    ]

    def pooled(sel: list[dict], k: int | None, what: str) -> float:
        per = [d for r in sel for d in (r["per_pair"] if k is None else [r["per_pair"][k]])]
        return sum(d["agree"][what]["rate"] for d in per) / len(per)

    for name in [*sets, None]:
        sel = rows if name is None else [r for r in rows if r["models"] == name]
        cells = [f"{pooled(sel, k, 'shape'):.2f} / {pooled(sel, k, 'colour'):.2f}" for k in range(len(pairs))]
        cells.append(f"{pooled(sel, None, 'shape'):.2f} / {pooled(sel, None, 'colour'):.2f}")
        lines.append(f"| {name or 'all'} | {len(sel)} | " + " | ".join(cells) + " |")
    low = [(r["key"], d["pair"]) for r in rows for d in r["per_pair"]
           if min(d["agree"]["shape"]["rate"], d["agree"]["colour"]["rate"]) < 0.9]  # fmt: skip
    lines.append(f"Rows x pairs below 0.9 agreement on shape or colour: {len(low)} of {len(rows) * len(pairs)}.")
    return lines


# ---------------------------------------------------------------------------------------------------- CLI
def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return v


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=4, help="first N of the default pairs (one per colour and shape)")
    p.add_argument("--all-pairs", action="store_true", help="all 16 (colour, shape) pairs")
    p.add_argument("--images-per-pair", "--images", dest="images_per_pair", type=_positive, default=16,
                   help="images per pair for every AND row")  # fmt: skip
    p.add_argument("--or-images", type=int, default=256, help="images per OR row")
    p.add_argument("--or-batch", type=_positive, default=64, help="OR images per pipeline call (seed + call index)")
    p.add_argument("--steps", type=_positive, nargs="+", default=[50], help="e.g. --steps 50 200")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--particles", type=int, default=4, help="particles per image for product_smc")
    p.add_argument("--divergence", default="hutchinson_fd", help="ODE rows: divergence estimator")
    p.add_argument("--solver", default="euler", help="ODE rows: solver (euler, dpm2m, unipc)")
    p.add_argument("--probes", type=_positive, default=1, help="ODE rows: Hutchinson probes per step")
    p.add_argument("--bootstrap", type=_positive, default=2000, help="bootstrap resamples per interval")
    p.add_argument("--shape-expert", default="shapes-text-shape", help="folder under model_cards/")
    p.add_argument("--skip-and", action="store_true")
    p.add_argument("--skip-or", action="store_true")
    p.add_argument("--rows", nargs="+", default=None,
                   help="run only rows whose label ('50 steps | models | method (SDE|ODE ...)') contains one of these "
                        "strings (case-sensitive), e.g. --rows ODE 'SuperDiff OR'")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="skip rows already in the --json file (same options)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="e.g. cuda, cpu")
    p.add_argument("--grid", "--examples", dest="grid", default=None,
                   help="write a PNG of every row's first images, labelled by both judges")  # fmt: skip
    p.add_argument("--grid-per-pair", type=_positive, default=2, help="images per pair of every AND row in --grid")
    p.add_argument(
        "--json", nargs="?", const="-", default=None, help="write JSON to this file ('-' or no value: stdout)"
    )
    args = p.parse_args(argv)
    if not 1 <= args.pairs <= len(DEFAULT_PAIRS):
        p.error(f"--pairs must be 1..{len(DEFAULT_PAIRS)}; use --all-pairs for all 16")
    if args.or_images < 2:
        p.error("--or-images must be >= 2")
    if args.particles < 2:
        p.error("--particles must be >= 2")
    if args.resume and (not args.json or args.json == "-"):
        p.error("--resume needs --json FILE")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = run(args)
    result["total_seconds"] = result.get("total_seconds", 0.0) + time.perf_counter() - t0
    if args.json == "-":
        print(json.dumps(result, indent=1))
        return result
    print(markdown(result))
    print(f"\n({time.perf_counter() - t0:.0f} s in this session)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
