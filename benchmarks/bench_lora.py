"""LoRA experts on shapes-text: how often two LoRAs' concepts show up together, per method, and what a step costs.

    python benchmarks/bench_lora.py --images 2 --steps 3 --cost-reps 3          # a smoke run (a minute)
    python benchmarks/bench_lora.py --images 16 --steps 30 --threads 1 --json benchmarks/results/lora.json \\
        --grid benchmarks/results/lora_grid.png
    python benchmarks/bench_lora.py --images 16 --steps 30 --json /tmp/lora_gpu.json --rows ZZZ --cost-reps 15 \
        --run-reps 7 --device cuda                                                # the cost tables alone, on a GPU

Base: model_cards/shapes-text (filled shapes in four colours on black). LoRAs (examples/shapes/train_lora.py):
shapes-lora-purple (the shape in purple, a colour the base never saw), shapes-lora-outline (the shape as an
outline) and shapes-lora-grey-bg (a grey background). `--pair` (default purple outline) names the two composed; the
goal: an image with both concepts (a purple OUTLINED shape), which neither LoRA nor the base draws. Every row uses
the four shape prompts ("a circle", ..., `--images` images each, image seeds seed + prompt index, the same for every
row);
each term is (shapes-text, LoRA, that prompt); guidance `--guidance` (default 4), SDE (Euler-Maruyama) unless the row
says ODE. Rows:
  - base alone; each LoRA alone (single term: what each LoRA draws);
  - baselines: merge (both LoRAs active with weight 1: diffusers' set_adapters), LoRA Switch (the active LoRA
    alternates every `--switch-steps`), LoRA Composite (the average of each LoRA's guided prediction; the published
    method makes one network call per LoRA and step, here one call; its "separate calls" row makes them as
    published, same images up to rounding);
  - compositions of the two LoRA terms in ONE call per step: average with the base's unconditional row (average with
    each LoRA's own unconditional row IS Composite), product (Composable Diffusion), SuperDiff AND (SDE and ODE),
    product_smc (`--particles` particles per image), and OR (a mixture: each image should show ONE LoRA's concept).
The judge (`examples/shapes/train_lora.judge`, 100% correct on renders of every concept combination) reads every
image: purple (most strong foreground pixels nearer purple than any palette colour), outline (holes >= 20% of the
filled object, or the centroid pixel is background), grey background (the frame's median within 0.15 of 0.5),
object (an object at all). "both" = the two LoRAs' concepts. Rates have 95% percentile-bootstrap intervals (2000
resamples, images resampled within each prompt). OR: the share of images judged with the first concept only, the
second only, both, neither, and the share each term "won" (largest final tracked log q).
NFE/img: UNet rows per output image (forward hooks: every term, unconditional row, probe row, particle);
calls/step: UNet calls per sampling step; s/img: wall clock per image on this machine (compare rows of one run).

Cost table (`--cost-reps` paired repetitions, order shuffled each repetition, medians): with N LoRAs and n images,
the time of ONE routed call (N conditional + N unconditional chunks of n rows, each with its own LoRA: a composed
step) against one call of the base with ONE LoRA on one LoRA's CFG rows (2n rows: a step with a single LoRA),
N such calls (LoRA Composite as published), and one single-LoRA call on the same 2Nn rows (what the routing itself
costs). The routed and single-LoRA calls are timed with their adapter state already set (a run sets it once), the N
separate calls with the switching between them; the once-per-run set-up of the routed state is its own column.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_shapes import UNetCounter, fmt, rates  # noqa: E402
from examples.shapes.data import SHAPES  # noqa: E402
from examples.shapes.train_lora import judge, judge_accuracy  # noqa: E402

CARDS = ROOT / "model_cards"
LORAS = {"purple": "shapes-lora-purple", "outline": "shapes-lora-outline", "grey-bg": "shapes-lora-grey-bg"}
VERDICT = {"purple": "purple", "outline": "outline", "grey-bg": "grey_bg"}  # the judge's key for each LoRA
PROMPTS = [f"a {s}" for s in SHAPES]
AND_CLAMP01 = "and, kappa clamped to [0, 1]"  # the row's operator: compose.AND(*terms, clamp=(0, 1))


def and_clamped(*terms):
    import compose

    return compose.AND(*terms, clamp=(0, 1))


def rows(args) -> list[dict]:
    """The benchmark's rows: label, the LoRA list, pipeline keywords."""
    a, b = args.pair
    both = [a, b]
    out = [
        dict(label="base (no LoRA)", lora=None, kw={}),
        dict(label=f"{a} LoRA alone", lora=[a], kw={}),
        dict(label=f"{b} LoRA alone", lora=[b], kw={}),
        dict(label="merge (weights 1, 1)", lora=both, kw=dict(lora_mode="merge")),
        dict(label=f"LoRA Switch (every {args.switch_steps} steps)", lora=both,
             kw=dict(lora_mode="switch", lora_switch_steps=args.switch_steps)),  # fmt: skip
        dict(label="LoRA Composite (one call)", lora=both, kw=dict(lora_mode="composite")),
        dict(label="LoRA Composite (separate calls, as published)", lora=both,
             kw=dict(lora_mode="composite", lora_calls="separate")),  # fmt: skip
        dict(label="average (base uncond)", lora=both, kw=dict(operator="average", lora_uncond="base")),
        dict(label="product", lora=both, kw=dict(operator="product")),
        dict(label="AND", lora=both, kw=dict(operator="and")),
        dict(label="AND, ODE", lora=both, kw=dict(operator="and", method="ode")),
        dict(label="AND, kappa clamped to [0, 1]", lora=both, kw=dict(operator=AND_CLAMP01)),
        dict(label="AND, kappa clamped to [0, 1], ODE", lora=both, kw=dict(operator=AND_CLAMP01, method="ode")),
        dict(label=f"product_smc ({args.particles} particles)", lora=both,
             kw=dict(operator="product_smc", num_particles=args.particles)),  # fmt: skip
        dict(label="OR", lora=both, kw=dict(operator="or"), part="or"),
    ]
    for r in out:
        r.setdefault("part", "and")
        r["key"] = r["label"]
    if args.rows:
        out = [r for r in out if any(s.lower() in r["label"].lower() for s in args.rows)]
    return out


def load_pipe(names: list[str], device: str = "cpu"):
    from pipelines import ComposePipeline

    pipe = ComposePipeline.from_pretrained(str(CARDS / "shapes-text"))
    pipe.set_progress_bar_config(disable=True)
    missing = [LORAS[n] for n in names if not (CARDS / LORAS[n] / "pytorch_lora_weights.safetensors").is_file()]
    if missing:
        raise SystemExit(f"missing LoRAs {missing}; train them with examples/shapes/train_lora.py (see their cards).")
    pipe.load_lora_experts({n: str(CARDS / LORAS[n]) for n in names})
    return pipe.to(device)


def sync(device) -> None:
    """Wait for the accelerator, so that a timer measures the work and not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_row(pipe, row: dict, args) -> tuple[dict, torch.Tensor]:
    verdicts = {k: [] for k in ("purple", "outline", "grey_bg", "object")}
    won, kappa_mean, tiles, strata = [], [], [], []
    kappa_max = 0.0
    calls = 0
    t0 = time.perf_counter()
    with UNetCounter(pipe) as counter:
        for p, prompt in enumerate(PROMPTS):
            kw = dict(row["kw"])
            if kw.get("operator") == AND_CLAMP01:
                kw["operator"] = and_clamped
            before = counter.calls
            out = pipe(prompt=prompt, lora=row["lora"], guidance_scale=args.guidance, num_inference_steps=args.steps,
                       batch_size=args.images, generator=torch.Generator().manual_seed(args.seed + p),
                       output_type="pt", **kw)  # fmt: skip
            calls += counter.calls - before
            images = out.images.float().cpu()
            kappa_max = max(kappa_max, float(out.kappa.abs().max()))
            v = judge(images)
            for k in verdicts:
                verdicts[k].append(v[k])
            strata.append(np.full(len(images), p))
            tiles.append(images[: args.tiles])
            if out.log_q.shape[-1] > 1:
                won.append(out.log_q.argmax(-1))
                kappa_mean.append(out.kappa.mean((0, 1)))
    sec = time.perf_counter() - t0
    n = args.images * len(PROMPTS)
    v = {k: np.concatenate(x) for k, x in verdicts.items()}
    strata = np.concatenate(strata)
    a, b = (v[VERDICT[c]] for c in args.pair)
    cols = {"both": a & b, "first": a, "second": b, "object": v["object"]}
    if row["part"] == "or":
        cols.update(first_only=a & ~b, second_only=b & ~a, neither=~a & ~b)
    rec = dict(
        key=row["key"],
        label=row["label"],
        lora=row["lora"],
        kw={k: v for k, v in row["kw"].items()},
        images=n,
        nfe_per_image=counter.rows / n,
        calls_per_step=calls / (len(PROMPTS) * args.steps),
        sec_per_image=sec / n,
        max_abs_kappa=kappa_max,
        rates=rates(cols, strata, args.bootstrap),
        verdicts={k: "".join("1" if b else "0" for b in x) for k, x in v.items()},
    )
    if won:
        w = torch.cat(won)
        rec["won_share"] = [float((w == j).double().mean()) for j in range(int(out.log_q.shape[-1]))]
        rec["kappa_mean"] = [float(x) for x in torch.stack(kappa_mean).mean(0)]
    return rec, torch.cat(tiles)


# ---------------------------------------------------------------------------------------------------- cost
def cost_table(pipe, names: list[str], images: list[int], reps: int, seed: int = 0) -> list[dict]:
    """Paired timings of one routed call against single-LoRA calls (module docstring), medians over `reps`."""
    m = pipe.models[0]
    ctx_c = m.family.encode(m, "a square", pipe.device)["encoder_hidden_states"]
    ctx_u = m.family.encode(m, "", pipe.device)["encoder_hidden_states"]
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    out = []
    for N in range(2, len(names) + 1):
        for n in images:
            r = cost_case(pipe.unet, names[:N], n, ctx_c, ctx_u, g, rnd, reps)
            out.append(r)
            print(f"# cost N={N} n={n}: routed {r['ms']['routed']:.1f} ms, one LoRA {r['ms']['single']:.1f} ms "
                  f"({r['routed_over_single']:.2f}x), {N} separate {r['ms']['separate']:.1f} ms "
                  f"({r['routed_over_separate']:.2f}x of it)", file=sys.stderr, flush=True)  # fmt: skip
    return out


def cost_case(unet, loras: list[str], n: int, ctx_c, ctx_u, g, rnd, reps: int) -> dict:
    """One (N LoRAs, n images) case of `cost_table`.

    Every variant is timed as a sampling run pays it per step. The routed call and the single-LoRA calls run with
    their adapter state already set (the pipeline sets it once per run, `Routing.session`; a diffusers user sets
    one LoRA once), so their times are the network call alone; the state is set before the timer starts and
    restored after it stops. The N separate calls switch the adapter between calls, as LoRA Composite must, so their
    time includes the switching. `setup` is the once-per-run cost of setting and restoring the routed state.
    """
    from pipelines.lora import BASE, adapter_call

    N = len(loras)
    dev = unet.device
    x1 = torch.randn(2 * n, 3, 24, 24, generator=g).to(dev)  # one LoRA's CFG rows: cond + uncond
    e1 = torch.cat([ctx_c.expand(n, -1, -1), ctx_u.expand(n, -1, -1)]).to(dev)
    xN, eN = x1.repeat(N, 1, 1, 1), e1.repeat(N, 1, 1)
    t1, tN = torch.full((2 * n,), 500.0, device=dev), torch.full((2 * N * n,), 500.0, device=dev)
    specs = [a for a in loras for _ in range(2)]  # chunk c of n rows: LoRA specs[c]
    one, allrows = (x1, t1, e1), (xN, tN, eN)

    @torch.no_grad()
    def net(x, t, e) -> None:
        unet(x, t, encoder_hidden_states=e)

    @torch.no_grad()
    def separate() -> None:
        for a in loras:
            with adapter_call(unet, [a], 2 * n):
                net(*one)

    # variant -> (adapter state held while timing: (specs, rows per chunk) or None, the timed function, how a routed
    # call adds the updates: `pipelines.lora.ROUTED_UPDATES`)
    variants = {
        "routed": ((specs, n), lambda: net(*allrows), "stacked"),
        "routed_loop": ((specs, n), lambda: net(*allrows), "loop"),  # the updates added one adapter at a time
        "single": (([loras[0]], 2 * n), lambda: net(*one), "stacked"),
        "separate": (None, separate, "stacked"),
        "single_all_rows": (([loras[0]], 2 * N * n), lambda: net(*allrows), "stacked"),
        "base": (([BASE], 2 * n), lambda: net(*one), "stacked"),
    }

    def timed(key: str) -> float:
        state, fn, update = variants[key]
        with adapter_call(unet, *state, update=update) if state else contextlib.nullcontext():
            sync(dev)
            t = time.perf_counter()
            fn()
            sync(dev)
            return time.perf_counter() - t

    def setup() -> float:
        sync(dev)
        t = time.perf_counter()
        with adapter_call(unet, specs, n):
            pass
        sync(dev)
        return time.perf_counter() - t

    for k in variants:  # warm-up
        timed(k)
    times: dict[str, list[float]] = {k: [] for k in [*variants, "setup"]}
    for _ in range(reps):
        order = [*variants, "setup"]
        rnd.shuffle(order)
        for k in order:
            times[k].append(setup() if k == "setup" else timed(k))

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    return dict(
        loras=N, images=n, rows_routed=2 * N * n, device=str(dev),
        ms={k: 1000 * statistics.median(v) for k, v in times.items()},
        routed_over_single=ratio("routed", "single"), separate_over_single=ratio("separate", "single"),
        routed_over_separate=ratio("routed", "separate"),
        routed_over_single_all_rows=ratio("routed", "single_all_rows"),
        single_over_base=ratio("single", "base"), routed_over_loop=ratio("routed", "routed_loop"),
    )  # fmt: skip


def run_cost(pipe, names: list[str], reps: int, steps: int, seed: int = 0) -> list[dict]:
    """Whole pipeline runs (AND of the first two LoRAs on "a square", one image, CFG 4) under three routings, paired
    and shuffled: the adapter state set at every call with the slice loop (before `Routing.session`), the state held
    for the run with the slice loop, and held with the stacked update (what the pipeline does). The slice loop is
    lora_calls="batched_loop"; the state set at every call is the code before `Routing.session`, simulated by
    replacing that method with an empty context for the run."""
    import pipelines.lora as PL

    session = PL.Routing.session
    modes = {
        "state set at every call, slice loop": (False, "batched_loop"),
        "state held for the run, slice loop": (True, "batched_loop"),
        "state held for the run, stacked update": (True, "batched"),
    }

    def one(mode: str) -> float:
        held, calls = modes[mode]
        PL.Routing.session = session if held else (lambda self: contextlib.nullcontext())
        try:
            sync(pipe.device)
            t = time.perf_counter()
            g = torch.Generator().manual_seed(seed)
            pipe(prompt="a square", lora=list(names[:2]), operator="and", num_inference_steps=steps,
                 guidance_scale=4.0, batch_size=1, output_type="pt", generator=g, lora_calls=calls)  # fmt: skip
            sync(pipe.device)
            return time.perf_counter() - t
        finally:
            PL.Routing.session = session

    for mode in modes:  # warm-up
        one(mode)
    times: dict[str, list[float]] = {m: [] for m in modes}
    rnd = random.Random(seed)
    for _ in range(reps):
        order = list(modes)
        rnd.shuffle(order)
        for mode in order:
            times[mode].append(one(mode))
    first = next(iter(modes))
    ratio = {m: statistics.median(a / b for a, b in zip(v, times[first], strict=True)) for m, v in times.items()}
    return [dict(routing=m, steps=steps, sec_per_image=statistics.median(v), ratio=ratio[m]) for m, v in times.items()]


# ---------------------------------------------------------------------------------------------------- output
def markdown(result: dict) -> str:
    cfg = result["config"]
    a, b = cfg["pair"]
    lines = [
        f"shapes-text + LoRAs {a} and {b}; prompts {', '.join(PROMPTS)} x {cfg['images']} images, "
        f"{cfg['steps']} steps, guidance {cfg['guidance']}, seed {cfg['seed']}; rates with 95% bootstrap intervals "
        f"(judge on renders: {', '.join(f'{k} {v:.0%}' for k, v in cfg['judge_accuracy'].items())})",
        "",
        f"| method | both ({a} AND {b}) | {a} | {b} | object | max abs kappa | NFE/img | calls/step | s/img |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        x = r["rates"]
        k = f"{r['max_abs_kappa']:.3g}" if "max_abs_kappa" in r else "-"
        lines.append(
            f"| {r['label']} | {fmt(x['both'])} | {fmt(x['first'])} | {fmt(x['second'])} | {fmt(x['object'])} "
            f"| {k} | {r['nfe_per_image']:.0f} | {r['calls_per_step']:.2f} | {r['sec_per_image']:.2f} |"
        )
    ors = [r for r in result["rows"] if "first_only" in r["rates"]]
    if ors:
        lines += ["", f"| OR | {a} only | {b} only | both | neither | won by the {a} term | won by the {b} term |",
                  "|---|---|---|---|---|---:|---:|"]  # fmt: skip
        for r in ors:
            x, w = r["rates"], r.get("won_share", [float("nan")] * 2)
            lines.append(f"| {r['label']} | {fmt(x['first_only'])} | {fmt(x['second_only'])} | {fmt(x['both'])} | "
                         f"{fmt(x['neither'])} | {w[0]:.2f} | {w[1]:.2f} |")  # fmt: skip
    if result.get("cost"):
        lines += [
            "",
            "| LoRAs N | images n | routed call (2Nn rows) ms | one LoRA, 2n rows ms | N separate calls ms | routed / "
            "one LoRA | N separate / one LoRA | routed / N separate | routed / one LoRA on 2Nn rows | routed / "
            "slice loop | routed set-up per run ms |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in result["cost"]:
            ms = c["ms"]
            lines.append(
                f"| {c['loras']} | {c['images']} | {ms['routed']:.1f} | {ms['single']:.1f} | {ms['separate']:.1f} | "
                f"{c['routed_over_single']:.2f} | {c['separate_over_single']:.2f} | {c['routed_over_separate']:.2f} | "
                f"{c['routed_over_single_all_rows']:.2f} | "
                + (f"{c['routed_over_loop']:.2f} | " if "routed_over_loop" in c else "- | ")
                + (f"{ms['setup']:.1f} |" if "setup" in ms else "- |")
            )
    if result.get("run_cost"):
        lines += ["", "| whole run (AND of 2 LoRAs, 1 image) | steps | s/img | x the first |", "|---|---:|---:|---:|"]
        for r in result["run_cost"]:
            lines.append(f"| {r['routing']} | {r['steps']} | {r['sec_per_image']:.2f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def save_grid(result: dict, tiles: dict, path: Path, per_row: int, scale: int = 3) -> None:
    from PIL import Image, ImageDraw

    rows_ = [r for r in result["rows"] if r["key"] in tiles]
    w, h, label_w = 24 * scale, 24 * scale, 330
    img = Image.new("RGB", (label_w + per_row * (w + 2), len(rows_) * (h + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, r in enumerate(rows_):
        t = tiles[r["key"]][:per_row]
        draw.text((4, i * (h + 2) + h // 2 - 6), r["label"], fill=(0, 0, 0))
        for j, im in enumerate(t):
            arr = (im.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(arr).resize((w, h), Image.NEAREST)
            img.paste(tile, (label_w + j * (w + 2), i * (h + 2)))
    img.save(path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", nargs=2, default=["purple", "outline"], choices=list(LORAS), help="the two LoRAs")
    p.add_argument("--images", type=int, default=16, help="images per prompt (4 prompts)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--switch-steps", type=int, default=5)
    p.add_argument("--particles", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--rows", nargs="*", default=None, help="run only rows whose label contains one of these")
    p.add_argument("--cost-reps", type=int, default=15, help="paired repetitions of the cost table (0: no table)")
    p.add_argument("--cost-images", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--run-reps", type=int, default=0,
                   help="paired repetitions of whole runs under the three routings (0: not measured)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="e.g. cuda: the pipeline, its LoRAs and the timed calls there")
    p.add_argument("--json", default=None)
    p.add_argument("--grid", default=None)
    p.add_argument("--tiles", type=int, default=3, help="images per prompt kept for the grid")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --json (same config)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = dict(pair=list(args.pair), images=args.images, steps=args.steps, guidance=args.guidance, seed=args.seed,
                  switch_steps=args.switch_steps, particles=args.particles, threads=args.threads,
                  judge_accuracy=judge_accuracy(), torch=torch.__version__)  # fmt: skip
    result = {"config": config, "rows": [], "cost": []}
    if args.resume and args.json and Path(args.json).is_file():
        old = json.loads(Path(args.json).read_text())
        if {k: old["config"].get(k) for k in config} == config:
            result = old
    names = list(args.pair) + [n for n in LORAS if n not in args.pair and (CARDS / LORAS[n]).is_dir()]
    pipe = load_pipe(names, args.device)
    done = {r["key"] for r in result["rows"]}
    tiles: dict = {}
    t_start = time.perf_counter()
    for row in rows(args):
        if row["key"] in done:
            continue
        t = time.perf_counter()
        rec, tiles[row["key"]] = run_row(pipe, row, args)
        result["rows"].append(rec)
        x = rec["rates"]
        print(f"# {rec['label']}: both {fmt(x['both'])}, {args.pair[0]} {fmt(x['first'])}, {args.pair[1]} "
              f"{fmt(x['second'])}; "
              f"NFE/img {rec['nfe_per_image']:.0f}, {rec['sec_per_image']:.2f} s/img; row "
              f"{time.perf_counter() - t:.0f} s, elapsed {(time.perf_counter() - t_start) / 60:.1f} min",
              file=sys.stderr, flush=True)  # fmt: skip
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    order = {r["key"]: i for i, r in enumerate(rows(argparse.Namespace(**{**vars(args), "rows": None})))}
    result["rows"].sort(key=lambda r: order.get(r["key"], len(order)))
    if args.cost_reps:
        result["cost"] = cost_table(pipe, names, args.cost_images, args.cost_reps, args.seed)
    if args.run_reps:
        result["run_cost"] = run_cost(pipe, names, args.run_reps, args.steps, args.seed)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.grid and tiles:
        save_grid(result, tiles, Path(args.grid), per_row=args.tiles * len(PROMPTS))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
