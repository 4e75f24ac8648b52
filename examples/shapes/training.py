"""The optimisation loop the shapes trainers share (DDPM UNets, conditional UNets, the flow transformer).

Each trainer builds its models, its optimiser and a `loss_at(generator)` that draws one batch and returns the loss;
`train` runs the steps: linear learning-rate warm-up, gradient clipping, an EMA copy with the usual
(1 + n) / (10 + n) warm-up of its decay, a progress line with the rate and the time left, and a checkpoint every
`--save-every-minutes` and at the end. Batch n is drawn from a generator seeded by (seed, n), so a resumed run draws
the batches an uninterrupted one would have.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Progress:
    """What a checkpoint stores of the loop, and what `info()` reports."""

    step: int = 0
    elapsed: float = 0.0  # training seconds, including those of runs this one resumed
    loss_hist: list[float] = field(default_factory=list)

    def loss_avg(self, last: int = 100) -> float:
        tail = self.loss_hist[-last:]
        return sum(tail) / max(1, len(tail))


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def add_loop_args(p: argparse.ArgumentParser, *, lr: float, seed: int) -> None:
    """The options `train` reads, shared by the trainers (defaults of lr and seed per trainer)."""
    p.add_argument("--batch", type=_positive(int), default=32)
    p.add_argument("--lr", type=_positive(float), default=lr)
    p.add_argument("--warmup", type=int, default=200, help="linear learning-rate warm-up steps")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                   help="after the warm-up: constant, or cosine decay to --lr-final x lr at --steps")  # fmt: skip
    p.add_argument("--lr-final", type=float, default=0.1, help="cosine schedule: final lr as a fraction of --lr")
    p.add_argument("--min-snr", type=float, default=0.0,
                   help="Min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5; 0: plain MSE")  # fmt: skip
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay (with the usual (1+n)/(10+n) warm-up)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (0: none)")
    p.add_argument("--steps", type=_positive(int), default=100_000, help="maximum number of optimiser steps")
    p.add_argument("--minutes", type=_positive(float), default=None,
                   help="wall-clock budget (total, including resumed time); stop and save when spent")  # fmt: skip
    p.add_argument("--seed", type=int, default=seed)
    p.add_argument("--threads", type=_positive(int), default=1, help="torch.set_num_threads")
    p.add_argument("--log-every", type=_positive(int), default=25)
    p.add_argument("--save-every-minutes", type=_positive(float), default=5.0)
    p.add_argument("--state", default=None, help="training-state file (default outputs/shapes/<out name>/state.pt)")
    p.add_argument("--resume", action="store_true", help="continue from --state if it exists")
    p.add_argument("--init", default=None,
                   help="warm start: a folder this trainer wrote (same sizes); its saved (EMA) weights start both the "
                        "trained and the EMA copies (ignored when --resume finds a state)")


def loop_info(args, progress: Progress, final: bool) -> dict:
    """The loop's part of `train_info.json` (the trainer adds its model's)."""
    return {
        "batch": args.batch,
        "lr": args.lr,
        "warmup": args.warmup,
        "lr_schedule": args.lr_schedule,
        **({"lr_final": args.lr_final} if args.lr_schedule != "constant" else {}),
        "min_snr_gamma": args.min_snr,
        "ema_decay": args.ema,
        "grad_clip": args.grad_clip,
        "seed": args.seed,
        "threads": args.threads,
        "steps": progress.step,
        "images_seen": progress.step * args.batch,
        "train_seconds": round(progress.elapsed, 1),
        "final_loss_avg100": round(progress.loss_avg(100), 5),
        "finished": final,
        "torch": torch.__version__,
    }


def start(args, argv) -> tuple[Path, Path, str]:
    """Threads and seed from the options; (output folder, state file, the command line as run) of a trainer."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    state_path = Path(args.state) if args.state else Path("outputs/shapes") / out.name / "state.pt"
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    return out, state_path, command


def save_state(state_path: Path, objects: dict, progress: Progress, **extra) -> None:
    """Write the training state atomically (a crash mid-write leaves the previous state): every object's state_dict
    under its key (models, EMA copies, optimiser), the loop's progress, and `extra` as is."""
    state = {k: o.state_dict() for k, o in objects.items()}
    state.update(step=progress.step, elapsed=progress.elapsed, loss_hist=progress.loss_hist, **extra)
    state_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = state_path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, state_path)


def load_state(state_path: Path, objects: dict, check: Callable[[dict], None] | None = None) -> Progress:
    """The inverse of `save_state`: `check(state)` first (it raises on a state that does not fit), then every
    object's state_dict from its key; returns the loop's progress."""
    st = torch.load(state_path, map_location="cpu", weights_only=False)
    if check is not None:
        check(st)
    for key, obj in objects.items():
        obj.load_state_dict(st[key])
    progress = Progress(st["step"], st["elapsed"], st["loss_hist"])
    print(f"resumed from {state_path} at step {progress.step} ({progress.elapsed / 60:.1f} min)", flush=True)
    return progress


LR_SCHEDULES = ("constant", "cosine")


def learning_rate(args, step: int) -> float:
    """The learning rate of optimiser step `step` (0-based): linear warm-up over `args.warmup` steps, then constant
    or a cosine decay from `args.lr` to `args.lr_final * args.lr` at `args.steps`."""
    warm = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
    if getattr(args, "lr_schedule", "constant") == "constant" or step < args.warmup:
        return warm
    frac = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (args.lr_final + (1 - args.lr_final) * 0.5 * (1 + math.cos(math.pi * frac)))


def snr_weights(alpha_bar: torch.Tensor, gamma: float) -> torch.Tensor | None:
    """Min-SNR-gamma weights of an epsilon-prediction loss, min(SNR, gamma) / SNR per sample, with
    SNR = alpha_bar / (1 - alpha_bar) (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy",
    2023): the many easy low-noise steps stop dominating the gradient. None when gamma is 0 (plain MSE)."""
    if not gamma:
        return None
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=gamma) / snr


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error; with per-sample `weights`, the weighted mean over samples of each sample's mean."""
    if weights is None:
        return torch.nn.functional.mse_loss(pred, target)
    per = (pred - target).pow(2).flatten(1).mean(1)
    return (per * weights.flatten()).mean()


def warm_start(folder, models: dict) -> None:
    """`--init FOLDER`: load a trained folder's weights into freshly built models of the same sizes.

    models: {name: (model, loader)} with loader(folder) -> the saved model of that name (e.g. a diffusers
    `from_pretrained(folder, subfolder=...)`); a size mismatch is an error naming the folder and the model."""
    for name, (model, loader) in models.items():
        try:
            model.load_state_dict(loader(folder).state_dict())
        except (RuntimeError, OSError, ValueError) as err:
            raise SystemExit(f"--init {folder}: its {name} does not fit the sizes given ({err})") from err
    print(f"warm start from {folder}: {', '.join(models)}", flush=True)


def budget_seconds(minutes: float | None) -> float:
    return minutes * 60 if minutes else math.inf


def train(
    progress: Progress,
    loss_at: Callable[[torch.Generator], torch.Tensor],
    opt: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    ema_pairs: Iterable[tuple[torch.Tensor, torch.Tensor]],
    args,
    checkpoint: Callable[..., None],
) -> Progress:
    """Run optimiser steps until `args.steps` or the `args.minutes` budget, then `checkpoint(final=True)`.

    `ema_pairs`: (EMA parameter, trained parameter) pairs. `args` needs steps, minutes, seed, lr, warmup, grad_clip,
    ema, log_every and save_every_minutes. `progress` is updated in place (the checkpoint reads it).
    """
    ema_pairs = list(ema_pairs)
    budget = budget_seconds(args.minutes)
    t_last_save, t_start = time.time(), time.time() - progress.elapsed
    window_t, window_steps = time.time(), 0
    while progress.step < args.steps and progress.elapsed < budget:
        step = progress.step
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        for group in opt.param_groups:
            group["lr"] = learning_rate(args, step)
        loss = loss_at(g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in ema_pairs:
                pe.lerp_(pm, 1 - decay)
        progress.step += 1
        window_steps += 1
        progress.loss_hist.append(loss.item())
        progress.elapsed = time.time() - t_start
        if progress.step % args.log_every == 0:
            rate = window_steps / (time.time() - window_t)
            window_t, window_steps = time.time(), 0
            left = min((args.steps - progress.step) / rate, budget - progress.elapsed)
            print(
                f"step {progress.step} loss {progress.loss_avg(args.log_every):.4f} rate {rate:.2f} it/s "
                f"elapsed {progress.elapsed / 60:.1f} min ETA {left / 60:.1f} min",
                flush=True,
            )
        if time.time() - t_last_save > args.save_every_minutes * 60:
            checkpoint()
            t_last_save = time.time()
    checkpoint(final=True)
    return progress
