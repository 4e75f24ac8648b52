"""Deterministic samplers on a shipped shapes model, one prompt, no composition: what the ODE rows of
`bench_shapes.py` measure before any operator is involved.

    python benchmarks/bench_shapes_ode.py --model shapes-text --prompt "a red shape" --images 16 --steps 50

Draws the same initial noise for every row (seed, then the pipeline's own draw) and prints, per sampler: the share of
images the shipped classifier finds valid (max-probability > 0.9 on both heads), the share of the prompt's colour /
shape (whichever it names), and the mean absolute difference of vertically adjacent pixels (in [-1, 1] units:
residual speckle noise raises it). Rows: the SDE (ancestral), the probability-flow ODE with Euler, DDIM (eta 0, as
diffusers' DDIMScheduler), DPM-Solver++(2M), and DDIM without the checkpoint's x0 clipping (`clip_sample=False`).
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

ROWS = [
    ("SDE", dict(method="sde")),
    ("ODE euler", dict(method="ode", solver="euler")),
    ("ODE ddim", dict(method="ode", solver="ddim")),
    ("ODE dpm2m", dict(method="ode", solver="dpm2m")),
    ("ODE ddim, clip_sample=False", dict(method="ode", solver="ddim", clip_sample=False)),
]


def main(argv=None) -> list[dict]:
    from examples.shapes.classifier import load_classifier
    from examples.shapes.data import COLOURS, SHAPES
    from examples.shapes.eval_conditional import parse_prompt
    from pipelines import ComposePipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes-text", help="folder under model_cards/")
    p.add_argument("--prompt", default="a red shape")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    for name in ("images", "steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    folder = ROOT / "model_cards" / args.model
    if not (folder / "model_index.json").is_file():
        p.error(f"--model {args.model}: no model folder {folder}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    shape, colour = parse_prompt(args.prompt)
    pipe = ComposePipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    clf = load_classifier(ROOT / "model_cards" / "shapes-classifier")
    rows = []
    print("| sampler | valid | named attribute | adjacent-pixel difference | s/img |")
    print("|---|---:|---:|---:|---:|")
    for label, kw in ROWS:
        t0 = time.perf_counter()
        out = pipe(prompt=args.prompt, guidance_scale=args.guidance, num_inference_steps=args.steps,
                   batch_size=args.images, generator=torch.Generator().manual_seed(args.seed), output_type="pt",
                   **kw)  # fmt: skip
        sec = (time.perf_counter() - t0) / args.images
        x = out.images.float() * 2 - 1
        ps, pc = clf.predict(x)
        valid = ((ps.max(1).values > 0.9) & (pc.max(1).values > 0.9)).float().mean().item()
        if colour is not None:
            named = (pc.argmax(1) == COLOURS.index(colour)).float().mean().item()
        elif shape is not None:
            named = (ps.argmax(1) == SHAPES.index(shape)).float().mean().item()
        else:
            named = float("nan")
        tv = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean().item()
        rows.append(dict(sampler=label, kw=kw, valid=valid, named=named, adjacent_diff=tv, sec_per_image=sec))
        print(f"| {label} | {valid:.2f} | {named:.2f} | {tv:.3f} | {sec:.2f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(config=vars(args), rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
