"""Per-step cost of ComposePipeline over the bare batched UNet call (issue 3, "Performance").

Stable Diffusion 1.5-architecture UNet with random weights (timing only), 256x256 images -> 32x32 latents, 2 prompts,
AND, classifier-free guidance (3 UNet rows per step: 2 prompts + the unconditional branch). Ratios are per-step times
over the time of one bare UNet call on the same 3 rows, each step paired with a bare call timed right after it (the
median of the pair ratios; robust to the load drifting on a shared machine). Also timed: the per-prompt
loop of the Composable Diffusion community pipeline (one batch-1 UNet call per prompt and for the unconditional
branch) and the forward-mode JVP ODE variant.

    python benchmarks/bench_pipeline.py                # ~5-10 minutes on 2 CPU cores
    python benchmarks/bench_pipeline.py --device cuda  # on an accelerator
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
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from pipelines import ComposePipeline  # noqa: E402


def sd15_unet() -> UNet2DConditionModel:
    """The Stable Diffusion 1.5 UNet architecture (860M parameters), random weights."""
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
    )


def sd15_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )


def small_text_encoder(folder: str) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """A one-layer CLIP text encoder of SD 1.5's width (768): prompts are encoded once, outside the timed steps."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    with open(os.path.join(folder, "vocab.json"), "w") as fh:
        json.dump({t: i for i, t in enumerate(tokens)}, fh)
    with open(os.path.join(folder, "merges.txt"), "w") as fh:
        fh.write("#version: 0.2\n")
    tok = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=77)
    cfg = CLIPTextConfig(
        vocab_size=len(tokens),
        hidden_size=768,
        intermediate_size=1536,
        num_hidden_layers=1,
        num_attention_heads=12,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(cfg).eval(), tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=2, help="per-prompt-loop timings (each paired with a bare call)")
    ap.add_argument("--steps", type=int, default=3, help="sampler steps per run (the first is not timed)")
    ap.add_argument("--jvp-steps", type=int, default=2, help="steps of the forward-mode JVP run (< 2 skips it)")
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory() as tmp:
        te, tok = small_text_encoder(tmp)
        sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        pipe = ComposePipeline(unet=sd15_unet(), scheduler=sched, vae=sd15_vae(), text_encoder=te, tokenizer=tok)
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    h = args.size // pipe.vae_scale_factor
    prompts = ["a flamingo", "a candy cane"]
    rows = len(prompts) + 1

    # Bare batched UNet call on the same rows (2 prompts + unconditional), the denominator of every ratio.
    x = torch.randn(rows, 4, h, h, device=device, dtype=dtype)
    ehs = torch.randn(rows, 77, 768, device=device, dtype=dtype)
    ts = torch.full((rows,), 500.0, device=device)

    def bare() -> float:
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            unet(x, ts, encoder_hidden_states=ehs, return_dict=False)
        sync()
        return time.perf_counter() - t0

    def per_prompt_loop() -> float:  # Composable Diffusion community pipeline: one batch-1 call per prompt + uncond
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            for j in range(rows):
                unet(x[j : j + 1], ts[j : j + 1], encoder_hidden_states=ehs[j : j + 1], return_dict=False)
        sync()
        return time.perf_counter() - t0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # Load on a shared machine drifts: every timed step is paired with a bare call right after it (inside the
    # step callback, outside the step's own timing), and the ratio is the median of the per-pair ratios.
    def per_step(steps: int, **kw) -> tuple[float, float, list[float]]:
        step_times: list[float] = []
        bare_times: list[float] = []
        start = [0.0]

        def cb(p, i, t, tensors):
            sync()
            if i > 0:  # the first step also pays for text encoding and set-up
                step_times.append(time.perf_counter() - start[0])
                bare_times.append(bare())
            start[0] = time.perf_counter()
            return {}

        pipe(
            prompt=prompts,
            operator="and",
            guidance_scale=7.5,
            num_inference_steps=steps,
            output_type="latent",
            height=args.size,
            width=args.size,
            generator=torch.Generator().manual_seed(0),
            callback_on_step_end=cb,
            **kw,
        )
        ratios = [a / b for a, b in zip(step_times, bare_times, strict=True)]
        return statistics.median(step_times), statistics.median(ratios), bare_times

    bare()  # warm-up
    pairs = [(per_prompt_loop(), bare()) for _ in range(args.repeats)]
    t_loop = statistics.median(a for a, _ in pairs)
    r_loop = statistics.median(a / b for a, b in pairs)
    all_bare = [b for _, b in pairs]
    log(f"per-prompt loop {t_loop:.2f} s, ratio {r_loop:.2f}")
    results = []
    runs = [("compose SDE (Ito density), AND + CFG", f"1 x {rows}", "<= 1.05", dict(method="sde", steps=args.steps))]
    runs.append(
        (
            "compose ODE, hutchinson_fd (1 probe)",
            f"1 x {rows + len(prompts)}",
            "<= 2.5",
            dict(method="ode", divergence="hutchinson_fd", steps=args.steps),
        )
    )
    if args.jvp_steps > 1:
        runs.append(
            (
                "compose ODE, hutchinson (1 JVP)",
                f"1 JVP x {rows}",
                "report",
                dict(method="ode", divergence="hutchinson", steps=args.jvp_steps),
            )
        )
    for name, calls, target, kw in runs:
        secs, ratio, b = per_step(**kw)
        all_bare += b
        log(f"{name}: {secs:.2f} s/step, ratio {ratio:.2f}")
        results.append((name, calls, secs, ratio, target))
    base = statistics.median(all_bare)
    results.insert(0, ("bare batched UNet call", f"1 x {rows}", base, 1.0, ""))
    results.append(("per-prompt loop (Composable Diffusion)", f"{rows} x 1", t_loop, r_loop, "compare"))

    print(
        f"\nComposePipeline per-step cost: SD-1.5 UNet (random weights), {args.size}x{args.size} -> {h}x{h} latents, "
        f"2 prompts, AND, CFG; device={args.device}, dtype={args.dtype}, torch threads={torch.get_num_threads()}"
    )
    print(f"bare-call timings (s): {', '.join(f'{v:.2f}' for v in all_bare)}")
    print(f"{'variant':<42} {'UNet calls x rows':>18} {'s/step':>8} {'ratio':>7} {'target':>8}")
    for name, calls, secs, ratio, target in results:
        print(f"{name:<42} {calls:>18} {secs:>8.2f} {ratio:>7.2f} {target:>8}")


if __name__ == "__main__":
    main()
