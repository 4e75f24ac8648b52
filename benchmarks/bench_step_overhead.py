"""What ComposePipeline adds to a step outside the network call, in milliseconds (issue 32).

A tiny UNet2DConditionModel (the network call costs milliseconds, so the sampler's own work shows), 2 prompts, AND,
classifier-free guidance (3 rows; the hutchinson_fd ODE 5): seconds per step of a whole call minus the median bare
batched call on the same rows, the median over --reps calls. One thread. Compare two checkouts by running each
(the script imports the code of the checkout it lives in):

    python benchmarks/bench_step_overhead.py     # JSON: {"overhead_ms_per_step": {"sde": ..., "ode_fd": ...}}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout
sys.path.insert(0, HERE)
from bench_pipeline import small_text_encoder  # noqa: E402

from pipelines import ComposePipeline  # noqa: E402


def tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    unet = tiny_unet()
    with tempfile.TemporaryDirectory() as tmp:
        te, tok = small_text_encoder(tmp, 64)
    pipe = ComposePipeline(unet=unet, scheduler=DDPMScheduler(), text_encoder=te, tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    x, e, ts = torch.randn(5, 4, 8, 8), torch.randn(5, 77, 64), torch.full((5,), 500.0)

    def bare(rows: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            unet(x[:rows], ts[:rows], encoder_hidden_states=e[:rows])
        return time.perf_counter() - t0

    out = {}
    variants = (("sde", dict(method="sde"), 3), ("ode_fd", dict(method="ode", divergence="hutchinson_fd"), 5))
    for name, kw, rows in variants:
        per = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(0)
            pipe(prompt=["a flamingo", "a candy cane"], operator="and", guidance_scale=7.5, output_type="latent",
                 num_inference_steps=args.steps, height=8, width=8, generator=g, **kw)  # fmt: skip
            total = time.perf_counter() - t0
            base = statistics.median(bare(rows) for _ in range(args.steps))
            per.append(1000 * (total / args.steps - base))
        out[name] = round(statistics.median(per), 2)
    print(json.dumps({"checkout": os.path.dirname(HERE), "steps": args.steps, "overhead_ms_per_step": out}))


if __name__ == "__main__":
    main()
