"""The main demo: compose the shipped shapes models on CPU and write one labelled image grid.

    python examples/demo.py [--out outputs/demo.png] [--images 8] [--steps 50] [--threads 2]

Rows (every image is one output; the figures are the shipped shapes classifier's, and "both G" the geometric
judge's share of red circles):
  1. the ceiling: "a red circle" on shapes-text-joint, a model that was taught captions naming both attributes;
  2. the joint prompt "a red circle" on shapes-text (a caption it has never seen: it was trained on ONE attribute
     per caption);
  3. product("a red shape", "a circle") on the same model (Composable Diffusion, classifier-free guidance around it);
  4. the same product, best of 4 candidates by their lift (`candidates=4`: 4 times the rows, plus the lift's);
  5. AND("a red shape" on shapes-text-colour, "a circle" on shapes-text-shape): two experts;
  6. OR of shapes-uncond-a (circles, squares) and shapes-uncond-b (triangles, stars);
  7. AND("a red shape", "a circle") on shapes-text-flow, a flow-matching SD3 transformer trained on the same captions
     as shapes-text (FlowMatchEuler steps, the checkpoint's own scheduler).

91 s measured on the 2-core CPU with one other single-thread job running; a busier machine takes longer (`--threads 1`
may then be faster). Progress goes to stderr: each row's step, its time and an estimate of the time left, planned from
one timed step of every row and revised as the rows run (`Progress`; `--no-progress` drops it and the timing);
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
from examples.shapes.geometry import load_geometry_judge  # noqa: E402

CARDS = ROOT / "model_cards"
RESTORE = {  # the training command of each shipped model (its card and train_info.json give the exact one)
    "shapes-text": "train_conditional.py --captions attribute",
    "shapes-text-joint": "train_conditional.py --captions joint",
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
    time left. On a terminal one line is rewritten in place; otherwise a line is printed every `every` seconds and when
    a row ends.

    The estimate: `step_seconds` are each row's seconds per step, measured before sampling (one timed step of every
    row at its real batch, `time_one_step`), so rows of different networks (UNets, the flow transformer) and batch
    sizes are planned by what they cost. While rows run, the time spent is compared with the plan of the steps done:
    the time left is the plan of the steps left times the ratio (spent + prior) / (planned + prior), where the prior
    is `prior_steps` average planned steps at ratio 1 (the timed steps' own weight). On a machine whose step times
    jump by 10x from one second to the next (other jobs), one slow step or a short burst moves the estimate a little,
    and a lasting slowdown moves it as the evidence grows (the old estimate, the work left divided by the rate of the
    current row so far, swung from 91 s to 936 s to 246 s on a busy machine)."""

    def __init__(self, step_seconds: list[float], steps: int, stream=None, every: float = 5.0, enabled: bool = True,
                 prior_steps: float = 10.0) -> None:  # fmt: skip
        self.plan = [max(float(s), 1e-6) for s in step_seconds]
        self.steps, self.every, self.enabled = steps, every, enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.prior = prior_steps * sum(self.plan) / len(self.plan)  # planned seconds the prior ratio 1 stands for
        self.spent = 0.0  # seconds of the steps done so far
        self.planned = 0.0  # their planned seconds
        self.index = -1
        self.done = 0  # steps finished in the current row

    @property
    def ratio(self) -> float:
        """Actual over planned step time, the prior included."""
        return (self.spent + self.prior) / (self.planned + self.prior)

    def say(self, text: str, end: bool = True) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if end else ""))
        elif end:
            self.stream.write(text + "\n")
        self.stream.flush()

    def seconds_left(self) -> float:
        """The planned seconds of the steps left, times the smoothed ratio."""
        current = self.plan[self.index] * (self.steps - self.done) if self.index >= 0 else 0.0
        return self.ratio * (current + sum(self.plan[self.index + 1 :]) * self.steps)

    def left(self) -> str:
        return f"about {self.seconds_left():.0f} s left (an estimate)"

    def start_row(self, label: str) -> None:
        self.index += 1
        self.done = 0
        self.label, self.row_start, self.last = label, time.perf_counter(), 0.0
        self.step_start = self.row_start
        self.say(f"[demo] row {self.index + 1}/{len(self.plan)} {label}: starting, {self.left()}")

    def step(self, k: int) -> None:
        """Called after step k (1-based) of the current row."""
        now_abs = time.perf_counter()
        self.spent += now_abs - self.step_start
        self.planned += self.plan[self.index] * (k - self.done)
        self.step_start, self.done = now_abs, k
        now = now_abs - self.row_start
        if self.tty or now - self.last >= self.every:
            self.last = now
            self.say(
                f"[demo] row {self.index + 1}/{len(self.plan)}: step {k}/{self.steps}, {now:.1f} s, {self.left()}",
                end=not self.tty,
            )

    def end_row(self) -> None:
        seconds = time.perf_counter() - self.row_start
        self.done = self.steps
        rest = f", {self.left()}" if self.index + 1 < len(self.plan) else ""
        self.say(f"[demo] row {self.index + 1}/{len(self.plan)} done in {seconds:.1f} s{rest}")


def time_one_step(pipe, kw: dict, common: dict, seed: int) -> float:
    """Seconds of one sampling step of a row at its real batch: the time between the ends of steps 1 and 2 of a
    two-step call (the first step carries the text encoding, the end carries the decoding)."""
    marks: list[float] = []

    def mark(_pipe, _k, _t, _tensors):
        marks.append(time.perf_counter())
        return {}

    pipe(generator=torch.Generator().manual_seed(seed), **{**common, "num_inference_steps": 2}, **kw,
         callback_on_step_end=mark)  # fmt: skip
    return marks[1] - marks[0]


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
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=min(2, torch.get_num_threads()),
        help="torch CPU threads (default 2, or fewer where there are fewer cores; on a busy machine 1 may be faster)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    if not args.no_progress:
        print("[demo] loading the shipped models and the classifier ...", file=sys.stderr, flush=True)
    judge = load_classifier(CARDS / "shapes-classifier")
    geometry = load_geometry_judge()
    common = dict(num_inference_steps=args.steps, batch_size=args.images, output_type="pt")
    rows = []  # (label, images (n, 3, H, W) in [0, 1], kind)
    text = load(["shapes-text"])
    joint = load(["shapes-text-joint"])
    experts = load(["shapes-text-colour", "shapes-text-shape"])
    uncond = load(["shapes-uncond-a", "shapes-uncond-b"])
    flow = load(["shapes-text-flow"])
    pair = dict(prompt=["a red shape", "a circle"], guidance_scale=args.guidance)
    jobs = [  # label, pipeline, call, kind
        ('ceiling: "a red circle" on shapes-text-joint (taught)', joint,
         dict(prompt="a red circle", guidance_scale=args.guidance), "and"),
        ('joint prompt "a red circle" (never seen)', text, dict(prompt="a red circle", guidance_scale=args.guidance),
         "and"),
        ('product("a red shape", "a circle"), one model', text, dict(pair, operator="product"), "and"),
        ("the same product, best of 4 by lift (4x the rows)", text, dict(pair, operator="product", candidates=4),
         "and"),
        ('AND(colour expert: "a red shape", shape expert: "a circle")', experts,
         dict(prompt=["a red shape", "a circle"], operator="and", guidance_scale=args.guidance), "and"),
        ("OR(uncond A: circles+squares, uncond B: triangles+stars)", uncond, dict(operator="or"), "or"),
        ('AND("a red shape", "a circle"), flow transformer', flow,
         dict(prompt=["a red shape", "a circle"], operator="and", guidance_scale=args.guidance), "and"),
    ]  # fmt: skip
    plan = [0.0] * len(jobs)
    if not args.no_progress:  # the estimate's plan: one timed step of every row (about 2 of the 50 steps' cost)
        print(f"[demo] loaded in {time.perf_counter() - t_start:.1f} s; timing one step of each row ...",
              file=sys.stderr, flush=True)  # fmt: skip
        plan = [time_one_step(pipe, kw, common, args.seed) for _label, pipe, kw, _kind in jobs]
    progress = Progress(plan, args.steps, enabled=not args.no_progress)
    if not args.no_progress:
        print(
            f"[demo] sampling {len(jobs)} rows x {args.images} images x {args.steps} steps on {args.threads} "
            f"thread(s): about {progress.seconds_left():.0f} s (an estimate from one timed step per row; it is "
            "revised as the rows run)",
            file=sys.stderr,
            flush=True,
        )
    print(f"{'row':<62} {'red':>5} {'circle':>6} {'both':>5} {'both G':>6} {'half A':>6} {'valid':>5} {'s/img':>6}",
          flush=True)  # fmt: skip
    for label, pipe, kw, kind in jobs:
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
        gs, gc = geometry.predict(images * 2 - 1)
        both_g = ((gc == COLOURS.index("red")) & (gs == SHAPES.index("circle"))).float().mean()
        print(f"{label:<62} {red:5.2f} {circle:6.2f} {both:5.2f} {both_g:6.2f} {half_a:6.2f} {valid:5.2f} {sec:6.2f}",
              flush=True)  # fmt: skip
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
