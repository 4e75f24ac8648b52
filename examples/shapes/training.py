"""The optimisation loop the shapes trainers share (DDPM UNets, conditional UNets, the flow transformer).

Each trainer builds its models, its optimiser and a `loss_at(generator)` that draws one batch and returns the loss;
`train` runs the steps: linear learning-rate warm-up, gradient clipping, an EMA copy with the usual
(1 + n) / (10 + n) warm-up of its decay, a progress line with the rate and the time left, and a checkpoint every
`--save-every-minutes` and at the end. Batch n is drawn from a generator seeded by (seed, n), so a resumed run draws
the batches an uninterrupted one would have.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

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
            group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
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
