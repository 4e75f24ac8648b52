"""Density-verified composition on the shapes testbeds: does a composition that checks its own images (best-of-K by
lift, steering) beat the plain methods at equal network cost, and how well does the lift detect a concept?

    python benchmarks/bench_verify.py --pairs 2 --images 2 --candidates 2 --steps 3              # a smoke run
    python benchmarks/bench_verify.py --images 16 --candidates 4 --steps 30 \\
        --json benchmarks/results/verify.json --plot docs/benchmarks/verify_lift.png --resume

Testbeds (`--testbeds`):
  - text: shapes-text, "a <colour> shape" and "a <shape>" composed (product, AND, average), the joint prompt
    "a <colour> <shape>" on the same model, and the ceiling: the joint prompt on shapes-text-joint;
  - experts: shapes-text-colour ("a <colour> shape") and shapes-text-shape ("a <shape>") composed;
  - lora: shapes-text with the purple and outline LoRAs on the shape prompts (merge, LoRA Switch, LoRA Composite,
    product, AND); the goal is a purple outlined shape.
Every method draws `--images` x `--candidates` candidates per pair (AND testbeds: all 16 (colour, shape) pairs, or
the first `--pairs`; lora: the four shape prompts), guidance `--guidance`, SDE, `--steps` steps, with both lifts of
every candidate: "renoise" (`out.lift`, the finished image's denoising losses at four log-SNR levels; 12 rows an
image for two prompts) and "tracked" (the sampler's log q against its unconditional leaf, read through the step
callback; free). The candidates of one image are K consecutive images of one pair (seeds seed + pair index).
From the same candidates, at equal network rows per output image (K candidates cost K samplings and, verified,
their lifts):
  - plain: the method's own rate over all candidates (random choice among K is the plain method);
  - best-of-K by the renoise lift, best-of-K by the tracked lift (min over the terms' lifts);
  - oracle best-of-K: an image is a success when any of its K candidates is (the judge chooses: the upper bound);
and `--steer` rows: the same method with candidates=K steered by the renoise lift of every candidate's x0_hat after
30%, 50% and 70% of the steps (`ComposePipeline(steer=...)`, `pipelines.verify.RenoiseSteering`), the best final
candidate kept; their rows per image include the checks. `--equal-rows` rows: the plain method once per image at the
steps whose rows equal a verified image's, K x (sampling + lift rows) / (rows per step), no lift: the baseline that
spends the verification's budget on sampling instead.
Judges: text / experts: the shapes classifier and the geometric judge ("both" = the pair's colour and shape); lora:
the LoRA concept judge (`examples/shapes/train_lora.judge`: purple AND outline; one judge exists for these concepts).
Rates carry 95% percentile-bootstrap intervals (images resampled within each pair). Detection: within each pair, the
AUC of each term's lift for "this term's concept is in the image" (colour / shape; purple / outline), averaged over
the pairs where both outcomes occur, per judge and lift.
`--json` is rewritten after every method (`--resume` skips the methods already there, same options; with
`--equal-rows` it adds the equal-rows baseline to the rows that lack it); every candidate's lifts and verdicts go to
`<json>.cands.npz`, so that `--pool A.json B.json --json C.json` (no sampling) pools runs of the same options and
other seeds (e.g. `--seed 100`) into one table with tighter intervals: a long run split into resumable parts.
"""

from __future__ import annotations

import argparse
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

from benchmarks.bench_shapes import ALL_PAIRS, UNetCounter, bootstrap_ci  # noqa: E402
from compose.verify import best_of, score  # noqa: E402
from examples.shapes.data import COLOURS, SHAPES  # noqa: E402
from pipelines.verify import DEFAULT_LEVELS as _LEVELS  # noqa: E402

CARDS = ROOT / "model_cards"
LORAS = ("purple", "outline")
SHAPE_PROMPTS = [f"a {s}" for s in SHAPES]
COMPARED = ("pairs", "images", "candidates", "steps", "guidance", "seed", "levels", "clip_sample", "lift_draws")
DEFAULT_LEVELS = list(_LEVELS)  # the pipeline's lift_levels
BEFORE = {"lift_draws": 1}  # options added after runs were saved: the value those runs had


def methods(args) -> list[dict]:
    """Every (testbed, method) row: label, the models, the call's keywords, whether it is the ceiling."""
    out = []
    if "text" in args.testbeds:
        for op in ("product", "and", "average"):
            out.append(dict(testbed="text", label=op, models=["shapes-text"], kw=dict(operator=op)))
        out.append(dict(testbed="text", label="joint prompt", models=["shapes-text"], kw={}, joint=True))
        out.append(dict(testbed="text", label="ceiling: joint prompt on shapes-text-joint",
                        models=["shapes-text-joint"], kw={}, joint=True))  # fmt: skip
    if "experts" in args.testbeds:
        for op in ("product", "and", "average"):
            out.append(dict(testbed="experts", label=op, models=["shapes-text-colour", "shapes-text-shape"],
                            kw=dict(operator=op)))  # fmt: skip
    if "lora" in args.testbeds:
        base = dict(testbed="lora", models=["shapes-text"])
        out += [
            dict(base, label="merge", kw=dict(lora_mode="merge")),
            dict(base, label="LoRA Switch", kw=dict(lora_mode="switch")),
            dict(base, label="LoRA Composite", kw=dict(lora_mode="composite")),
            dict(base, label="product", kw=dict(operator="product")),
            dict(base, label="and", kw=dict(operator="and")),
        ]
    for m in out:
        m["key"] = f"{m['testbed']} | {m['label']}"
    if args.rows:
        out = [m for m in out if any(r in m["key"] for r in args.rows)]
    return out


# ---------------------------------------------------------------------------------------------------- sampling
def load_pipe(models: list[str], lora: bool):
    from pipelines import ComposePipeline

    paths = [str(CARDS / m) for m in models]
    pipe = ComposePipeline.from_pretrained(paths[0] if len(paths) == 1 else paths)
    pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_experts({n: str(CARDS / f"shapes-lora-{n}") for n in LORAS})
    return pipe


def calls_of(m: dict, args) -> list[tuple]:
    """(seed, prompt, lora list) of every call of a method: one per pair (or shape prompt)."""
    if m["testbed"] == "lora":
        return [(args.seed + p, prompt, list(LORAS)) for p, prompt in enumerate(SHAPE_PROMPTS)]
    out = []
    for p, (c, s) in enumerate(pairs_of(args)):
        prompt = f"a {c} {s}" if m.get("joint") else [f"a {c} shape", f"a {s}"]
        out.append((args.seed + p, prompt, None))
    return out


def pairs_of(args) -> list[tuple[str, str]]:
    return ALL_PAIRS[: args.pairs]


def call_kwargs(m: dict, args, seed: int, prompt, lora: list | None, steps: int) -> dict:
    """The pipeline keywords every call of a method shares: prompt, guidance, steps, seed, the method's own, clipping
    and LoRAs where given."""
    kw = dict(prompt=prompt, guidance_scale=args.guidance, num_inference_steps=steps, output_type="pt",
              generator=torch.Generator().manual_seed(seed), **m["kw"])  # fmt: skip
    if args.clip_sample is not None:
        kw["clip_sample"] = args.clip_sample
    if lora is not None:
        kw["lora"] = lora
    return kw


def sample_method(pipe, m: dict, args, steer: float = 0.0) -> dict:
    """Every candidate of a method: images (uint8 tiles kept for the plot), renoise and tracked lifts."""
    K = args.candidates
    renoise, tracked, images, rows_v = [], [], [], 0
    t0 = time.perf_counter()
    with UNetCounter(pipe) as counter:
        for i, (seed, prompt, lora) in enumerate(calls_of(m, args)):
            seen = {}

            def cb(p, k, t, tensors, seen=seen):
                seen["log_q"] = tensors["log_q"]
                return {}

            kw = call_kwargs(m, args, seed, prompt, lora, args.steps) | dict(lift_levels=tuple(args.levels),
                                                                                  lift_draws=args.lift_draws)
            if steer:
                out = pipe(batch_size=args.images, candidates=K, steer=steer, lift="renoise", **kw)
            else:
                out = pipe(batch_size=args.images * K, lift="renoise", callback_on_step_end=cb,
                           callback_on_step_end_tensor_inputs=["log_q"], **kw)  # fmt: skip
                renoise.append(out.lift)
                lq = seen["log_q"].double()
                tracked.append(lq[:, : out.lift.shape[1]] - lq[:, -1:] if lq.shape[1] > out.lift.shape[1] else None)
                rows_v += out.verification_rows * out.lift.shape[0]
            images.append(out.images.float().cpu())
            print(f"#   {m['key']}{' steered' if steer else ''}: call {i + 1}, {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
    n = sum(len(x) for x in images)
    # per candidate (steered: per output image, its K particles included)
    rec = dict(images=n, rows_per_image=counter.rows / n, verification_rows_per_image=rows_v / max(n, 1),
               sec_per_image=(time.perf_counter() - t0) / n)  # fmt: skip
    rec["_images"] = torch.cat(images)
    if renoise:
        rec["_renoise"] = torch.cat(renoise).double()
        rec["_tracked"] = None if any(t is None for t in tracked) else torch.cat(tracked)
    return rec


def add_equal_rows(row: dict, pipe, m: dict, args, judges) -> None:
    """row["equal_rows"]: per judge, the plain method's rate at the steps that cost what a verified image does."""
    steps = equal_rows_steps(row, args)
    eq = sample_equal_rows(pipe, m, args, steps)
    ve = verdicts(m, eq["_images"], args, judges)
    strata = np.repeat(np.arange(len(calls_of(m, args))), args.images)
    row["equal_rows"] = {j: rate(x["both"], strata, args.bootstrap) for j, x in ve.items()}
    save_candidates(args, m["key"], {"equal/strata": strata} | {f"equal/{j}/both": x["both"] for j, x in ve.items()})
    row["equal_rows_steps"], row["equal_rows_rows_per_image"] = steps, eq["rows_per_image"]
    print(f"# {m['key']} at {steps} steps: " + ", ".join(f"{j} {_fmt(x)}" for j, x in row["equal_rows"].items()),
          file=sys.stderr, flush=True)  # fmt: skip


def add_steered(row: dict, pipe, m: dict, args, judges) -> None:
    """row["steered"]: per judge, the rate of the method with its K candidates steered by the renoise lift (the same
    seeds as its plain candidates), and the rows per output image that cost (K samplings, the checks, the choice)."""
    st = sample_method(pipe, m, args, steer=args.steer)
    vs = verdicts(m, st["_images"], args, judges)
    strata = np.repeat(np.arange(len(calls_of(m, args))), args.images)
    row["steered"] = {j: rate(x["both"], strata, args.bootstrap) for j, x in vs.items()}
    row["steered_rows_per_image"], row["steer"] = st["rows_per_image"], args.steer
    save_candidates(args, m["key"], {f"steered/{j}/both": x["both"] for j, x in vs.items()})
    print(f"# {m['key']} steered ({args.steer:g}): " + ", ".join(f"{j} {_fmt(x)}" for j, x in row["steered"].items()),
          file=sys.stderr, flush=True)  # fmt: skip


def save(result: dict, args) -> None:
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))


def equal_rows_steps(rec: dict, args) -> int:
    """The steps at which one plain sample costs what a verified image does: K x (sampling + lift rows) over the
    method's rows per step."""
    per_step = (rec["rows_per_image"] - rec["verification_rows_per_image"]) / args.steps
    return int(round(args.candidates * rec["rows_per_image"] / per_step))


def sample_equal_rows(pipe, m: dict, args, steps: int) -> dict:
    """One plain sample per output image at `steps` steps (no lift): the baseline that spends the verified rows on
    sampling."""
    images = []
    t0 = time.perf_counter()
    with UNetCounter(pipe) as counter:
        for i, (seed, prompt, lora) in enumerate(calls_of(m, args)):
            kw = call_kwargs(m, args, seed, prompt, lora, steps)
            images.append(pipe(batch_size=args.images, lift=None, **kw).images.float().cpu())
            print(f"#   {m['key']} at {steps} steps: call {i + 1}, {time.perf_counter() - t0:.0f} s", file=sys.stderr,
                  flush=True)  # fmt: skip
    n = sum(len(x) for x in images)
    return dict(_images=torch.cat(images), rows_per_image=counter.rows / n)


# ---------------------------------------------------------------------------------------------------- judging
def verdicts(m: dict, images: torch.Tensor, args, judges) -> dict[str, dict[str, np.ndarray]]:
    """judge -> {"both", "first", "second"} per image (first / second: the first / second term's concept)."""
    if m["testbed"] == "lora":
        from examples.shapes.train_lora import judge

        v = judge(images)
        return {"lora judge": dict(first=v["purple"], second=v["outline"], both=v["purple"] & v["outline"])}
    clf, geo = judges
    per = len(images) // len(pairs_of(args))
    tc = np.repeat([COLOURS.index(c) for c, _ in pairs_of(args)], per)
    ts = np.repeat([SHAPES.index(s) for _, s in pairs_of(args)], per)
    x = images * 2 - 1
    ps, pc = clf.predict(x)
    gs, gc = geo.predict(x)
    out = {}
    for name, s, c in (("classifier", ps.argmax(1), pc.argmax(1)), ("geometry", gs, gc)):
        s, c = s.numpy(), c.numpy()
        out[name] = dict(first=c == tc, second=s == ts, both=(c == tc) & (s == ts))
    return out


def auc(score: np.ndarray, label: np.ndarray) -> float:
    pos, neg = score[label], score[~label]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def within_pair_auc(score: np.ndarray, label: np.ndarray, strata: np.ndarray) -> dict:
    """The AUC of `score` for `label` within each stratum (pair), averaged over the strata where both outcomes occur:
    {"auc": mean (nan when there is none), "pairs": how many strata it averages}."""
    vals = [auc(score[strata == p], label[strata == p]) for p in np.unique(strata)]
    vals = [a for a in vals if a == a]
    return {"auc": float(np.mean(vals)) if vals else float("nan"), "pairs": len(vals)}


def rate(values: np.ndarray, strata: np.ndarray, n_boot: int) -> dict:
    ci = bootstrap_ci(values.astype(np.float64), strata, n_boot)
    return {"rate": float(values.mean()), "ci": [float(ci[0]), float(ci[1])]}


def selections(rec: dict, v: dict, args, strata_img: np.ndarray | None = None) -> dict:
    """Per judge: plain, best-of-K by each lift, oracle best-of-K, with intervals; and the detection AUCs.
    strata_img: the pair (stratum) of every candidate; default: one per call of the method."""
    K = args.candidates
    n = rec["images"]
    groups = n // K
    if strata_img is None:
        strata_img = candidate_strata(rec["_method"], args)
    strata_grp = strata_img[::K]
    out = {}
    lifts = {"renoise": rec.get("_renoise"), "tracked": rec.get("_tracked")}
    for j, ver in v.items():
        both = ver["both"]
        res = {"plain": rate(both, strata_img, args.bootstrap)}
        for name, lift in lifts.items():
            if lift is None:
                continue
            res[f"best-of-{K} by {name} lift"] = rate(both[best_of_k(lift, "min", K)], strata_grp, args.bootstrap)
            if name == "renoise" and lift.shape[1] > 1:  # the other rules of compose.verify.score
                for rule in ("zmin", "mean"):
                    pick = best_of_k(lift, rule, K)
                    res[f"best-of-{K} by {name} lift, {rule}"] = rate(both[pick], strata_grp, args.bootstrap)
        res[f"oracle best-of-{K}"] = rate(both.reshape(groups, K).any(1), strata_grp, args.bootstrap)
        det = {}
        for name, lift in lifts.items():
            if lift is None:
                continue
            concepts = ("first", "second") if lift.shape[1] == 2 else ("both",)
            for t, key in enumerate(concepts):
                det[f"{name} {key}"] = within_pair_auc(lift[:, t].numpy(), ver[key], strata_img)
        res["detection"] = det
        out[j] = res
    return out


def best_of_k(lift: torch.Tensor, rule: str, K: int) -> np.ndarray:
    """The flat index of every image's kept candidate: `compose.verify`'s score rule and best-of-K, as the pipeline
    chooses."""
    return best_of(score(lift, rule, K=K), K).numpy()


def candidate_strata(m: dict, args) -> np.ndarray:
    """The call (pair, or LoRA shape prompt) of every candidate, in sampling order."""
    return np.repeat(np.arange(len(calls_of(m, args))), args.images * args.candidates)


# ---------------------------------------------------------------------------------------------------- candidates
def cands_path(json_path) -> Path:
    """Every candidate's lifts and verdicts beside the JSON (`--json X` -> X.cands.npz), for `--pool`."""
    return Path(f"{json_path}.cands.npz")


def save_candidates(args, key: str, arrays: dict) -> None:
    """Add (replace) one method's per-candidate arrays under "key/..." in the run's .cands.npz."""
    if not args.json:
        return
    path = cands_path(args.json)
    old = dict(np.load(path)) if path.is_file() else {}
    old = {k: x for k, x in old.items() if not any(k == f"{key}/{a}" for a in arrays)}
    old.update({f"{key}/{a}": np.asarray(x) for a, x in arrays.items() if x is not None})
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **old)


def candidate_arrays(rec: dict, v: dict) -> dict:
    """What `--pool` needs of one method: both lifts and every judge's verdicts per candidate."""
    out = {"renoise": rec.get("_renoise"), "tracked": rec.get("_tracked")}
    out = {k: (x.numpy() if isinstance(x, torch.Tensor) else x) for k, x in out.items()}
    out.update({f"{j}/{c}": x[c] for j, x in v.items() for c in ("first", "second", "both")})
    return out


def _opt(config: dict, k: str):
    return config.get(k, BEFORE.get(k))


def pool(paths: list[str], args) -> dict:
    """The rows of several runs of the same options but different seeds, their candidates pooled (every run's pairs
    stay strata of their own): rates, intervals and AUCs over all of them. Each run needs its .cands.npz."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    first = runs[0]["config"]
    for p, r in zip(paths, runs, strict=True):
        diff = [k for k in COMPARED if k != "seed" and _opt(r["config"], k) != _opt(first, k)]
        if diff:
            raise SystemExit(f"--pool: {p} was run with other {diff} than {paths[0]}; pool runs of the same options")
        if not cands_path(p).is_file():
            raise SystemExit(f"--pool: {cands_path(p)} is missing; rerun {p} with this version (it saves them)")
    seeds = [r["config"]["seed"] for r in runs]
    # the calls of a run use seeds seed .. seed + calls - 1: runs must not share one
    span = max(len(SHAPE_PROMPTS) if t == "lora" else first["pairs"] for t in first["testbeds"])
    if any(abs(a - b) < span for i, a in enumerate(seeds) for b in seeds[i + 1 :]):
        raise SystemExit(f"--pool: seeds {seeds} overlap (each run uses seed .. seed + {span - 1}); the images repeat")
    arrays = [dict(np.load(cands_path(p))) for p in paths]
    va = argparse.Namespace(**{k: _opt(first, k) for k in COMPARED}, bootstrap=args.bootstrap)
    config = dict(first) | {"seed": "+".join(map(str, seeds)), "images": first["images"] * len(runs),
                            "pooled": list(paths)}  # fmt: skip
    result = {"config": config, "rows": []}
    keys = [r["key"] for r in runs[0]["rows"] if all(any(x["key"] == r["key"] for x in run["rows"]) for run in runs)]
    for key in keys:
        if not all(f"{key}/renoise" in a for a in arrays):
            print(f"# --pool: {key} has no saved candidates in every run; left out", file=sys.stderr)
            continue
        rows = [next(x for x in run["rows"] if x["key"] == key) for run in runs]
        judges = sorted({k.split("/")[1] for k in arrays[0] if k.startswith(f"{key}/") and k.endswith("/both")
                         and "/equal/" not in k})  # fmt: skip
        strata, offset = [], 0
        for a in arrays:
            st = a[f"{key}/strata"]
            strata.append(st + offset)
            offset += int(st.max()) + 1
        strata = np.concatenate(strata)
        cat = {name: np.concatenate([a[f"{key}/{name}"] for a in arrays]) for name in ("renoise", "tracked")
               if all(f"{key}/{name}" in a for a in arrays)}  # fmt: skip
        rec = {"images": len(strata), "_renoise": torch.from_numpy(cat["renoise"]),
               "_tracked": torch.from_numpy(cat["tracked"]) if "tracked" in cat else None}  # fmt: skip
        v = {j: {c: np.concatenate([a[f"{key}/{j}/{c}"] for a in arrays]) for c in ("first", "second", "both")}
             for j in judges}  # fmt: skip
        row = {k: rows[0][k] for k in ("key", "testbed", "label")}
        for k in ("rows_per_image", "verification_rows_per_image"):
            row[k] = float(np.mean([r[k] for r in rows]))
        row["images"] = rec["images"]
        row["selection"] = selections(rec, v, va, strata)
        if all(f"{key}/equal/strata" in a for a in arrays) and all("equal_rows" in r for r in rows):
            est, offset = [], 0
            for a in arrays:
                est.append(a[f"{key}/equal/strata"] + offset)
                offset += int(a[f"{key}/equal/strata"].max()) + 1
            est = np.concatenate(est)
            row["equal_rows"] = {j: rate(np.concatenate([a[f"{key}/equal/{j}/both"] for a in arrays]), est,
                                         args.bootstrap) for j in judges}  # fmt: skip
            row["equal_rows_steps"] = rows[0]["equal_rows_steps"]
        result["rows"].append(row)
    return result


# ---------------------------------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    cfg = result["config"]
    K = cfg["candidates"]
    lines = [
        f"{cfg['images']} images per pair or prompt x {K} candidates, {cfg['steps']} steps, guidance "
        f"{cfg['guidance']}, SDE, {'no x0 clipping' if cfg.get('clip_sample') is False else 'x0 clipped'}, seed "
        f"{cfg['seed']}{_lift_options(cfg)}; rates with 95% bootstrap intervals. Rows per image: network "
        f"rows per output image (K candidates and their lifts included); the plain method's rate is its rate over all "
        f"candidates (random choice among K).",
        "",
        "| testbed | method | judge | rows / image: plain, verified | plain | plain at equal rows | "
        "best-of-K renoise | best-of-K renoise, zmin | best-of-K renoise, mean | best-of-K tracked | steered | "
        "oracle best-of-K | gap closed (renoise) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        for j, res in r["selection"].items():
            plain, orc = res["plain"], res[f"oracle best-of-{K}"]
            bo = res.get(f"best-of-{K} by renoise lift")
            bt = res.get(f"best-of-{K} by tracked lift")
            st = r.get("steered", {}).get(j)
            st_cost = f" ({r.get('steered_rows_per_image', 0):.0f} rows, steer {r.get('steer', cfg['steer'])})"
            st_cell = _fmt(st) + (st_cost if st else "")
            closed = (bo["rate"] - plain["rate"]) / (orc["rate"] - plain["rate"]) if bo and orc["rate"] > plain[
                "rate"] else float("nan")  # fmt: skip
            bz = res.get(f"best-of-{K} by renoise lift, zmin")
            bm = res.get(f"best-of-{K} by renoise lift, mean")
            eq = r.get("equal_rows", {}).get(j)
            eq_cell = _fmt(eq) + (f" ({r['equal_rows_steps']} steps)" if eq else "")
            cells = [_fmt(plain), eq_cell, *map(_fmt, (bo, bz, bm, bt)), st_cell, _fmt(orc), f"{closed:.2f}"]
            plain_rows = r["rows_per_image"] - r["verification_rows_per_image"]
            cost = f"{plain_rows:.0f}, {K * r['rows_per_image']:.0f}"
            lines.append(f"| {r['testbed']} | {r['label']} | {j} | {cost} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Detection: within-pair AUC of each term's lift for its concept (mean over the pairs with both outcomes; a "
        "single term (the joint prompt): its lift for 'both'):",
        "",
        "| testbed | method | judge | renoise: first | renoise: second | tracked: first | tracked: second |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        for j, res in r["selection"].items():
            d = res["detection"]
            cells = []
            for k in ("renoise first", "renoise second", "tracked first", "tracked second"):
                alt = d.get(k.split()[0] + " both", {}) if k.endswith("first") else {}  # one term: its "both"
                cells.append(d.get(k, alt).get("auc", float("nan")))
            lines.append(f"| {r['testbed']} | {r['label']} | {j} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    kept = [r for r in result["rows"] if "plot" in r]
    if kept:
        lines += ["", "Score rules, from the lifts and verdicts the product rows keep: best-of-K by the renoise lift "
                  "under each rule (`compose.verify.score`):", "",
                  "| testbed | method | judge | min | zmin | mean |", "|---|---|---|---:|---:|---:|"]  # fmt: skip
        for r in kept:
            lift = torch.tensor(r["plot"]["lift"], dtype=torch.float64)
            both = np.array(r["plot"]["first"]) & np.array(r["plot"]["second"])
            cells = [f"{both[best_of_k(lift, rule, K)].mean():.2f}" for rule in ("min", "zmin", "mean")]
            lines.append(f"| {r['testbed']} | {r['label']} | {r['plot']['judge']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _lift_options(cfg: dict) -> str:
    """The renoise lift's options where a run chose other than the defaults ('' otherwise)."""
    out = ""
    if [float(x) for x in cfg.get("levels", DEFAULT_LEVELS)] != DEFAULT_LEVELS:
        out += ", renoise levels " + " ".join(f"{x:g}" for x in cfg["levels"])
    if cfg.get("lift_draws", 1) != 1:
        out += f", {cfg['lift_draws']} noise draws per level"
    return out


def _fmt(r) -> str:
    return "-" if not r else f"{r['rate']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]"


def plot(result: dict, lifts: dict, path: Path) -> None:
    """Lift of each term against the judges' verdict on its concept (renoise lift, first pair of every testbed's
    product row): the picture of what the lift detects."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in lifts if lifts[k] is not None]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), dpi=100, squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        lift, ver, names = lifts[key]
        for t, (concept, colour) in enumerate(zip(names, ("C0", "C3"), strict=True)):
            yes = ver[("first", "second")[t]]
            rng = np.random.default_rng(t)
            jitter = 0.1 * rng.random(yes.sum())
            ax.scatter(lift[:, t][yes], t + 0.15 + jitter, s=6, color=colour, label=f"{concept}: yes")
            ax.scatter(lift[:, t][~yes], t - 0.25 + 0.1 * rng.random((~yes).sum()), s=6, color="grey",
                       label="no (either concept)" if t == 0 else None)  # fmt: skip
        ax.set_yticks([0, 1], names)
        ax.set_xlabel("renoise lift (nats)")
        ax.set_title(key, fontsize=9)
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--testbeds", nargs="+", default=["text", "experts", "lora"], choices=["text", "experts", "lora"])
    p.add_argument("--pairs", type=int, default=16, help="first N of the 16 (colour, shape) pairs")
    p.add_argument("--images", type=int, default=16, help="output images per pair (lora: per shape prompt)")
    p.add_argument("--candidates", type=int, default=4, help="K")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--levels", type=float, nargs="+", default=DEFAULT_LEVELS, help="renoise log-SNR levels")
    p.add_argument("--lift-draws", type=int, default=1, help="noise draws per renoise level (lift_draws)")
    p.add_argument("--no-clip", dest="clip_sample", action="store_const", const=False, default=None,
                   help="no x0 clipping (clip_sample=False); default: the checkpoint's scheduler config (clipping on "
                   "for the shapes models)")
    p.add_argument("--steer", type=float, default=0.0, help="also run steered rows with this strength (0: none)")
    p.add_argument("--equal-rows", action="store_true",
                   help="also run each method once per image at the steps that cost what a verified image does")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--rows", nargs="+", default=None, help="only methods whose 'testbed | label' contains these")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG of lift against the judges' verdicts")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--pool", nargs="+", default=None, metavar="JSON",
                   help="no sampling: pool the candidates of these runs (the same options, other seeds; each with "
                   "its JSON.cands.npz) into one table, written to --json")  # fmt: skip
    args = p.parse_args(argv)
    if args.pool is not None and len(args.pool) < 2:
        p.error("--pool needs two runs or more")
    if not 1 <= args.pairs <= 16 or min(args.images, args.candidates, args.steps, args.lift_draws) < 1:
        p.error("--pairs 1..16; --images, --candidates, --steps, --lift-draws >= 1")
    if args.resume and not args.json:
        p.error("--resume needs --json")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.pool:
        result = pool(args.pool, args)
        save(result, args)
        print(markdown(result))
        return result
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from examples.shapes.classifier import load_classifier
    from examples.shapes.geometry import load_geometry_judge

    judges = (load_classifier(CARDS / "shapes-classifier"), load_geometry_judge())
    config = {k: getattr(args, k) for k in COMPARED} | {"testbeds": args.testbeds, "steer": args.steer}
    result = {"config": config, "rows": []}
    if args.resume and Path(args.json).is_file():
        old = json.loads(Path(args.json).read_text())
        diff = [k for k in COMPARED if old["config"].get(k, BEFORE.get(k)) != config[k]]
        if diff:
            raise SystemExit(f"--resume: {args.json} was run with other {diff}; give the same options or another file")
        result["rows"] = old["rows"]
    pipes: dict = {}
    for m in methods(args):
        key = (tuple(m["models"]), m["testbed"] == "lora")
        old_row = next((r for r in result["rows"] if r["key"] == m["key"]), None)
        if old_row is not None:  # a resumed row: only the steered rows and equal-rows baseline it lacks
            missing = []
            if args.steer and not m.get("joint") and "steered" not in old_row:
                missing.append(add_steered)
            if args.equal_rows and "equal_rows" not in old_row:
                missing.append(add_equal_rows)
            if not missing:
                continue
        if key not in pipes:
            pipes.clear()
            pipes[key] = load_pipe(m["models"], m["testbed"] == "lora")
        if old_row is not None:
            for add in missing:
                add(old_row, pipes[key], m, args, judges)
                save(result, args)
            continue
        rec = sample_method(pipes[key], m, args)
        rec["_method"] = m
        v = verdicts(m, rec["_images"], args, judges)
        save_candidates(args, m["key"], candidate_arrays(rec, v) | {"strata": candidate_strata(m, args)})
        row = dict(key=m["key"], testbed=m["testbed"], label=m["label"],
                   **{k: x for k, x in rec.items() if not k.startswith("_")})  # fmt: skip
        row["selection"] = selections(rec, v, args)
        if args.steer and not m.get("joint"):
            add_steered(row, pipes[key], m, args, judges)
        if args.equal_rows:
            add_equal_rows(row, pipes[key], m, args, judges)
        if m["label"] == "product" and rec.get("_renoise") is not None:
            j = next(iter(v))  # kept in the JSON, so that a resumed run still plots every testbed
            row["plot"] = dict(judge=j, lift=rec["_renoise"].numpy().round(4).tolist(),
                               first=v[j]["first"].tolist(), second=v[j]["second"].tolist())  # fmt: skip
        result["rows"].append(row)
        print(f"# {m['key']}: " + ", ".join(f"{j} plain {_fmt(s['plain'])}" for j, s in row["selection"].items()),
              file=sys.stderr, flush=True)  # fmt: skip
        save(result, args)
    print(markdown(result))
    plot_data = {
        r["testbed"]: (np.array(r["plot"]["lift"]), {t: np.array(r["plot"][t]) for t in ("first", "second")},
                       ["purple", "outline"] if r["testbed"] == "lora" else ["colour", "shape"])
        for r in result["rows"] if "plot" in r
    }  # fmt: skip
    if args.plot and plot_data:
        plot(result, plot_data, Path(args.plot))
    return result


if __name__ == "__main__":
    main()
