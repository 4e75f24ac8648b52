"""The main demo: compose the shipped shapes models on CPU and write one labelled image grid.

    python examples/demo.py [--out outputs/demo.png] [--images 8] [--steps 50]

Rows (every image is one sample; figures are from the shipped shapes classifier):
  1. the joint prompt "a red circle" on shapes-text (a caption it has never seen: it was trained on ONE attribute
     per caption);
  2. AND("a red shape", "a circle") on the same model (SuperDiff AND, classifier-free guidance around it);
  3. AND("a red shape" on shapes-text-colour, "a circle" on shapes-text-shape): two experts;
  4. OR of shapes-uncond-a (circles, squares) and shapes-uncond-b (triangles, stars);
  5. AND("a red shape", "a circle") on shapes-text-flow, a flow-matching SD3 transformer trained on the same captions
     as shapes-text (FlowMatchEuler steps, the checkpoint's own scheduler).

91 s measured on the 2-core CPU with one other single-thread job running; a busier machine takes longer.
Progress goes to stderr: each row's step, its time and an estimate of the time left (`--no-progress` to drop it);
stdout carries the table only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.shapes.classifier import load_classifier  # noqa: E402
from examples.shapes.data import COLOURS, SHAPES  # noqa: E402

CARDS = ROOT / "model_cards"
RESTORE = {  # the training command of each shipped model (its card and train_info.json give the exact one)
    "shapes-text": "train_conditional.py --captions attribute",
    "shapes-text-colour": "train_conditional.py --captions colour",
    "shapes-text-shape": "train_conditional.py --captions shape",
    "shapes-uncond-a": "train_unconditional.py --shapes circle square",
    "shapes-uncond-b": "train_unconditional.py --shapes triangle star",
    "shapes-text-flow": "train_flow.py --captions attribute",
}


def model_dir(name: str) -> str:
    """The folder of a shipped model, or a clear error saying how to get it back."""
    folder = CARDS / name
    network = (folder / "unet").is_dir() or (folder / "transformer").is_dir()
    if not (folder / "model_index.json").is_file() or not network:
        raise SystemExit(
            f"shipped model folder {folder} is missing or incomplete. Restore it with `git checkout -- {folder}` "
            + (
                f"or re-train it: `python examples/shapes/{RESTORE[name]} --out model_cards/{name}`"
                if name in RESTORE
                else "or re-train it (its card gives the command)."
            )
        )
    return str(folder)


def load(names: list[str]):
    from pipelines import ComposePipeline

    paths = [model_dir(n) for n in names]
    try:
        pipe = ComposePipeline.from_pretrained(paths[0] if len(paths) == 1 else paths)
    except Exception as err:  # truncated safetensors, broken JSON, git-lfs pointer files, mismatched shapes ...
        raise SystemExit(
            f"could not load the shipped model folder(s) {', '.join(paths)} ({type(err).__name__}: {err}). "
            f"Restore with `git checkout -- {' '.join(paths)}` or re-train (each card gives the command)."
        ) from err
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Progress:
    """Progress on stderr, so slow never looks like hung: per row, the step, the row's time and an estimate of the
    time left. The estimate weighs each row by its network rows per image and step (`cost`: prompts plus the
    unconditional branch, per checkpoint) and divides the work left by the rate measured so far. On a terminal one
    line is rewritten in place; otherwise a line is printed every `every` seconds and when a row ends."""

    def __init__(self, costs: list[int], steps: int, stream=None, every: float = 5.0, enabled: bool = True) -> None:
        self.costs, self.steps, self.every, self.enabled = costs, steps, every, enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.work = float(sum(costs) * steps)
        self.done = 0.0
        self.sampling = 0.0  # seconds spent in finished rows
        self.index = -1

    def say(self, text: str, end: bool = True) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if end else ""))
        elif end:
            self.stream.write(text + "\n")
        self.stream.flush()

    def left(self, row_seconds: float) -> str:
        spent = self.sampling + row_seconds
        if self.done <= 0 or spent <= 0:
            return "time left: estimating"
        return f"about {(self.work - self.done) * spent / self.done:.0f} s left"

    def start_row(self, label: str) -> None:
        self.index += 1
        self.label, self.row_start, self.last = label, time.perf_counter(), 0.0
        self.say(f"[demo] row {self.index + 1}/{len(self.costs)} {label}: starting, {self.left(0.0)}")

    def step(self, k: int) -> None:
        """Called after step k (1-based) of the current row."""
        self.done = sum(self.costs[: self.index]) * self.steps + self.costs[self.index] * k
        now = time.perf_counter() - self.row_start
        if self.tty or now - self.last >= self.every:
            self.last = now
            self.say(
                f"[demo] row {self.index + 1}/{len(self.costs)}: step {k}/{self.steps}, {now:.1f} s, {self.left(now)}",
                end=not self.tty,
            )

    def end_row(self) -> None:
        seconds = time.perf_counter() - self.row_start
        self.sampling += seconds
        self.done = sum(self.costs[: self.index + 1]) * self.steps
        rest = f", {self.left(0.0)}" if self.index + 1 < len(self.costs) else ""
        self.say(f"[demo] row {self.index + 1}/{len(self.costs)} done in {seconds:.1f} s{rest}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return value


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/demo.png")
    p.add_argument("--images", type=_positive_int, default=8, help="images per row")
    p.add_argument("--steps", type=_positive_int, default=50)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t_start = time.perf_counter()
    if not args.no_progress:
        print("[demo] loading the shipped models and the classifier ...", file=sys.stderr, flush=True)
    judge = load_classifier(CARDS / "shapes-classifier")
    common = dict(num_inference_steps=args.steps, batch_size=args.images, output_type="pt")
    rows = []  # (label, images (n, 3, H, W) in [0, 1], kind)
    text = load(["shapes-text"])
    experts = load(["shapes-text-colour", "shapes-text-shape"])
    uncond = load(["shapes-uncond-a", "shapes-uncond-b"])
    flow = load(["shapes-text-flow"])
    jobs = [  # label, pipeline, call, kind, network rows per image and step (for the time-left estimate)
        (
            'joint prompt "a red circle" (never seen)',
            text,
            dict(prompt="a red circle", guidance_scale=args.guidance),
            "and",
            2,
        ),
        (
            'AND("a red shape", "a circle"), one model',
            text,
            dict(prompt=["a red shape", "a circle"], operator="and", guidance_scale=args.guidance),
            "and",
            3,
        ),
        (
            'AND(colour expert: "a red shape", shape expert: "a circle")',
            experts,
            dict(prompt=["a red shape", "a circle"], operator="and", guidance_scale=args.guidance),
            "and",
            4,
        ),
        ("OR(uncond A: circles+squares, uncond B: triangles+stars)", uncond, dict(operator="or"), "or", 2),
        (
            'AND("a red shape", "a circle"), flow transformer',
            flow,
            dict(prompt=["a red shape", "a circle"], operator="and", guidance_scale=args.guidance),
            "and",
            3,
        ),
    ]
    progress = Progress([job[4] for job in jobs], args.steps, enabled=not args.no_progress)
    if not args.no_progress:
        print(
            f"[demo] loaded in {time.perf_counter() - t_start:.1f} s; sampling {len(jobs)} rows x {args.images} images"
            f" x {args.steps} steps (91 s in all at the defaults, measured on 2 CPU cores with one other job running)",
            file=sys.stderr,
            flush=True,
        )
    print(f"{'row':<62} {'red':>5} {'circle':>6} {'both':>5} {'half A':>6} {'valid':>5} {'s/img':>6}", flush=True)
    for label, pipe, kw, kind, _cost in jobs:
        progress.start_row(label)

        def on_step(_pipe, k, _t, _tensors):
            progress.step(k + 1)
            return {}

        t0 = time.perf_counter()
        out = pipe(generator=torch.Generator().manual_seed(args.seed), **common, **kw, callback_on_step_end=on_step)
        sec = (time.perf_counter() - t0) / args.images
        progress.end_row()
        images = out.images.float()
        ps, pc = judge.predict(images * 2 - 1)
        shape, colour = ps.argmax(1), pc.argmax(1)
        red = (colour == COLOURS.index("red")).float().mean()
        circle = (shape == SHAPES.index("circle")).float().mean()
        both = ((colour == COLOURS.index("red")) & (shape == SHAPES.index("circle"))).float().mean()
        half_a = (shape < 2).float().mean()
        valid = ((ps.max(1).values > 0.9) & (pc.max(1).values > 0.9)).float().mean()
        print(f"{label:<62} {red:5.2f} {circle:6.2f} {both:5.2f} {half_a:6.2f} {valid:5.2f} {sec:6.2f}", flush=True)
        rows.append((label, images, kind))
    out_path = Path(args.out)
    save_labelled_grid(rows, out_path)
    print(f"wrote {out_path} ({time.perf_counter() - t_start:.0f} s in all)")


def save_labelled_grid(rows, path: Path, scale: int = 3, pad: int = 2) -> None:
    from PIL import Image, ImageDraw

    n = rows[0][1].shape[0]
    side = rows[0][1].shape[-1] * scale
    label_h = 14
    width = n * (side + pad) + pad
    height = len(rows) * (side + label_h + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = pad
    for label, images, _ in rows:
        draw.text((pad, y), label, fill=(0, 0, 0))
        y += label_h
        arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i in range(n):
            tile = Image.fromarray(arr[i]).resize((side, side), Image.NEAREST)
            canvas.paste(tile, (pad + i * (side + pad), y))
        y += side + pad
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


if __name__ == "__main__":
    main()
