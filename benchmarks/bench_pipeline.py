"""Per-step cost of ComposePipeline over the bare batched network call (issues 3 and 21, "Performance").

--family sd15 (default): a Stable Diffusion 1.5-architecture UNet with random weights (timing only), 256x256 images
-> 32x32 latents. --family sd3: an SD3-architecture transformer at its real width (SD3 Medium: 1536 wide, 24 heads,
2x2 patches, 16 latent channels, joint width 4096, pooled 2048) with --layers of its 24 blocks, random weights, the
T5 slot as zeros (256 tokens; prompts are encoded once, outside the timed steps). Both: 2 prompts, AND,
classifier-free guidance (3 network rows per step: 2 prompts + the unconditional branch). Ratios are per-step times
over the time of one bare network call on the same rows (3; for the hutchinson_fd ODE also against the bare call on
its 5 rows, the probe rows included), each step paired with a bare call timed right after it (the median of the pair
ratios; robust to the load drifting on a shared machine). Also timed: the per-prompt loop of the Composable
Diffusion community pipeline (one batch-1 call per prompt and for the unconditional branch) and the forward-mode
JVP ODE variant (UNet only).

    python benchmarks/bench_pipeline.py                      # ~5-10 minutes on 2 CPU cores
    python benchmarks/bench_pipeline.py --family sd3         # the transformer rows
    python benchmarks/bench_pipeline.py --device cuda        # on an accelerator
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


def sd3_transformer(layers: int):
    """The SD3 Medium transformer at its real width with `layers` of its 24 joint blocks, random weights."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=layers, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=192,
    )  # fmt: skip


def sd3_vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, layers_per_block=2,
                         sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609)  # fmt: skip


def sd15_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )


def small_text_encoder(folder: str, width: int = 768, projection: bool = False) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """A one-layer CLIP text encoder of SD 1.5's width (768; SD3's CLIP-G 1280, with its projection): prompts are
    encoded once, outside the timed steps."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    with open(os.path.join(folder, "vocab.json"), "w") as fh:
        json.dump({t: i for i, t in enumerate(tokens)}, fh)
    with open(os.path.join(folder, "merges.txt"), "w") as fh:
        fh.write("#version: 0.2\n")
    tok = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=77)
    cfg = CLIPTextConfig(
        vocab_size=len(tokens),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=1,
        num_attention_heads=width // 64,
        max_position_embeddings=77,
        projection_dim=width,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    if projection:
        from transformers import CLIPTextModelWithProjection

        return CLIPTextModelWithProjection(cfg).eval(), tok
    return CLIPTextModel(cfg).eval(), tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=2, help="per-prompt-loop timings (each paired with a bare call)")
    ap.add_argument("--steps", type=int, default=3, help="sampler steps per run (the first is not timed)")
    ap.add_argument("--jvp-steps", type=int, default=2, help="steps of the forward-mode JVP run (< 2 skips it)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--family", default="sd15", choices=["sd15", "sd3"])
    ap.add_argument("--layers", type=int, default=2, help="--family sd3: joint blocks of the transformer (of 24)")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    sd3 = args.family == "sd3"
    with tempfile.TemporaryDirectory() as tmp:
        if sd3:
            from diffusers import FlowMatchEulerDiscreteScheduler

            te, tok = small_text_encoder(tmp, 768, projection=True)
            te2, _ = small_text_encoder(tmp, 1280, projection=True)
            sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
            pipe = ComposePipeline(transformer=sd3_transformer(args.layers), scheduler=sched, vae=sd3_vae(),
                                   text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok)  # fmt: skip
        else:
            te, tok = small_text_encoder(tmp)
            sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
            pipe = ComposePipeline(unet=sd15_unet(), scheduler=sched, vae=sd15_vae(), text_encoder=te, tokenizer=tok)
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    net = pipe.models[0].network
    h = args.size // pipe.vae_scale_factor
    prompts = ["a flamingo", "a candy cane"]
    rows = len(prompts) + 1
    probe_rows = rows + len(prompts)

    # Bare batched call on the same rows (2 prompts + unconditional; + 1 probe row per prompt for the fd ODE).
    channels = 16 if sd3 else 4
    x = torch.randn(probe_rows, channels, h, h, device=device, dtype=dtype)
    ehs = torch.randn(probe_rows, 77 + 256 if sd3 else 77, 4096 if sd3 else 768, device=device, dtype=dtype)
    pooled = torch.randn(probe_rows, 2048, device=device, dtype=dtype)
    ts = torch.full((probe_rows,), 500.0, device=device)

    def call(r: slice) -> None:
        if sd3:
            net(hidden_states=x[r], timestep=ts[r], encoder_hidden_states=ehs[r], pooled_projections=pooled[r],
                return_dict=False)  # fmt: skip
        else:
            net(x[r], ts[r], encoder_hidden_states=ehs[r], return_dict=False)

    def bare(n: int = rows) -> float:
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            call(slice(0, n))
        sync()
        return time.perf_counter() - t0

    def per_prompt_loop() -> float:  # Composable Diffusion community pipeline: one batch-1 call per prompt + uncond
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            for j in range(rows):
                call(slice(j, j + 1))
        sync()
        return time.perf_counter() - t0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # Load on a shared machine drifts: every timed step is paired with a bare call right after it (inside the
    # step callback, outside the step's own timing), and the ratio is the median of the per-pair ratios.
    def per_step(steps: int, bare_rows: int = rows, **kw) -> tuple[float, float, list[float]]:
        step_times: list[float] = []
        bare_times: list[float] = []
        start = [0.0]

        def cb(p, i, t, tensors):
            sync()
            if i > 0:  # the first step also pays for text encoding and set-up (and, for flow, the step from t = 1)
                step_times.append(time.perf_counter() - start[0])
                bare_times.append(bare(bare_rows))
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
            f"1 x {probe_rows}",
            "<= 2.5",
            dict(method="ode", divergence="hutchinson_fd", steps=args.steps),
        )
    )
    runs.append(
        (
            f"  the same against the bare call on {probe_rows} rows",
            f"1 x {probe_rows}",
            "<= 1.3",
            dict(method="ode", divergence="hutchinson_fd", steps=args.steps, bare_rows=probe_rows),
        )
    )
    if args.jvp_steps > 1 and not sd3:
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
    results.insert(0, (f"bare batched {'transformer' if sd3 else 'UNet'} call", f"1 x {rows}", base, 1.0, ""))
    results.append(("per-prompt loop (Composable Diffusion)", f"{rows} x 1", t_loop, r_loop, "compare"))

    what = f"SD3-architecture transformer ({args.layers} of 24 blocks)" if sd3 else "SD-1.5 UNet"
    print(
        f"\nComposePipeline per-step cost: {what} (random weights), {args.size}x{args.size} -> {h}x{h} latents, "
        f"2 prompts, AND, CFG; device={args.device}, dtype={args.dtype}, torch threads={torch.get_num_threads()}"
    )
    print(f"bare-call timings (s): {', '.join(f'{v:.2f}' for v in all_bare)}")
    print(f"{'variant':<46} {'calls x rows':>14} {'s/step':>8} {'ratio':>7} {'target':>8}")
    for name, calls, secs, ratio, target in results:
        print(f"{name:<46} {calls:>14} {secs:>8.2f} {ratio:>7.2f} {target:>8}")


if __name__ == "__main__":
    main()
