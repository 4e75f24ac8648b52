"""Train a small unconditional pixel-space DDPM (diffusers ``UNet2DModel``) on a subset of procedural shapes.

The SuperDiff CIFAR "OR" set-up in miniature: two models trained on disjoint halves of the data, e.g.

    python examples/shapes/train_unconditional.py --shapes circle square --out model_cards/shapes-uncond-a
    python examples/shapes/train_unconditional.py --shapes triangle star --out model_cards/shapes-uncond-b

`--objective flow` trains the same network by flow matching on the conditional OT path instead (the saved folder then
holds a FlowMatchEulerDiscreteScheduler config, read by `compose` as alpha = 1 - t, sigma = t, velocity prediction).

The output folder loads with ``diffusers.DDPMPipeline.from_pretrained(folder)`` (``unet/`` with the EMA weights
as safetensors, ``scheduler/``, ``model_index.json``); ``train_info.json`` records the settings, the command
line, the step count and the measured wall-clock time. Training data are drawn fresh at every step from
:mod:`examples.shapes.data`, seeded by ``(seed, step)``, so a run is reproducible and resumable: the full
training state (weights, EMA, optimiser, step, elapsed time) is saved to ``--state`` (default under the
git-ignored ``outputs/``) and picked up again by ``--resume``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.shapes.data import COLOURS, SHAPES, make_batch  # noqa: E402
from examples.shapes.training import (  # noqa: E402
    Progress,
    add_loop_args,
    load_state,
    loop_info,
    save_state,
    snr_weights,
    start,
    train,
    warm_start,
    weighted_mse,
)


def build_unet(size: int, channels, layers: int, norm_groups: int = 8):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(channels),
        layers_per_block=layers,
        down_block_types=("DownBlock2D",) * len(channels),
        up_block_types=("UpBlock2D",) * len(channels),
        norm_num_groups=norm_groups,
    )


def build_scheduler(num_train_timesteps: int = 1000, objective: str = "eps"):
    """The scheduler saved with the model: DDPM linear betas (eps objective) or FlowMatchEuler (flow objective).

    `compose.NoiseSchedule.from_scheduler` reads the first as a discrete VP table and the second as the conditional
    OT path alpha = 1 - t, sigma = t (the network's timestep input is then 1000 t, as FlowMatchEuler feeds it).
    """
    if objective == "flow":
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=1.0)
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=True,
    )


def save_pipeline(ema_unet, scheduler, out: Path, info: dict) -> None:
    from diffusers import DDPMPipeline

    out.mkdir(parents=True, exist_ok=True)
    DDPMPipeline(unet=ema_unet, scheduler=scheduler).save_pretrained(out, safe_serialization=True)
    (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--objective",
        choices=("eps", "flow"),
        default="eps",
        help="eps: DDPM noise prediction on the linear-beta VP table; flow: flow matching on the conditional OT path "
        "x_t = (1 - t) x0 + t eps with the velocity target eps - x0 (t ~ U(0, 1), network time 1000 t)",
    )
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), help=f"subset of {SHAPES}")
    p.add_argument("--colours", nargs="+", default=list(COLOURS), help=f"subset of {COLOURS}")
    p.add_argument("--out", required=True, help="output diffusers folder, e.g. model_cards/shapes-uncond-a")
    p.add_argument("--size", type=int, default=24, help="image side in pixels")
    p.add_argument("--channels", type=int, nargs="+", default=[32, 64, 64], help="UNet block_out_channels")
    p.add_argument("--layers", type=int, default=1, help="UNet layers_per_block")
    add_loop_args(p, lr=1e-3, seed=0)
    args = p.parse_args(argv)
    if args.min_snr and args.objective != "eps":
        p.error("--min-snr weights the epsilon objective; with --objective flow drop it.")
    return args


def main(argv=None):
    args = parse_args(argv)
    out, state_path, command = start(args, argv)

    unet = build_unet(args.size, args.channels, args.layers)
    if args.init and not (args.resume and state_path.exists()):
        from diffusers import UNet2DModel

        warm_start(args.init, {"unet": (unet, lambda f: UNet2DModel.from_pretrained(f, subfolder="unet"))})
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = build_scheduler(objective=args.objective)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    n_params = sum(p.numel() for p in unet.parameters())
    objects = dict(unet=unet, ema=ema, opt=opt)

    def same_objective(st: dict) -> None:
        saved = st.get("args", {}).get("objective", "eps")
        if saved != args.objective:
            raise ValueError(f"--objective {args.objective} does not match the state {state_path} ({saved}); fix one.")

    pr = load_state(state_path, objects, same_objective) if args.resume and state_path.exists() else Progress()

    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32) if args.objective == "eps" else None
    n_train = scheduler.config.num_train_timesteps
    print(
        f"UNet {n_params / 1e6:.2f}M params, size {args.size}, shapes {args.shapes}, colours {args.colours}, "
        f"batch {args.batch}, lr {args.lr}, threads {args.threads}, budget {args.minutes} min, max {args.steps} steps",
        flush=True,
    )

    def info(final: bool):
        return {
            "command": command,
            "objective": args.objective,
            "shapes": args.shapes,
            "colours": args.colours,
            "size": args.size,
            "block_out_channels": args.channels,
            "layers_per_block": args.layers,
            "parameters": n_params,
            "init": args.init,
            **loop_info(args, pr, final),
        }

    def checkpoint(final=False):
        save_state(state_path, objects, pr, args=vars(args))
        save_pipeline(ema, scheduler, out, info(final))

    unet.train()

    def loss_at(g: torch.Generator) -> torch.Tensor:
        x0, _, _ = make_batch(args.batch, g, size=args.size, shapes=args.shapes, colours=args.colours)
        noise = torch.randn(x0.shape, generator=g)
        if args.objective == "flow":
            # Conditional OT / flow matching (Lipman et al. 2023): alpha = 1 - t, sigma = t, target u = eps - x0.
            t_c = torch.rand(args.batch, generator=g)
            tt = t_c.view(-1, 1, 1, 1)
            xt = (1 - tt) * x0 + tt * noise
            t, target = t_c * n_train, noise - x0
        else:
            t = torch.randint(0, n_train, (args.batch,), generator=g)
            a = alphas_cumprod[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            return weighted_mse(unet(xt, t).sample, noise, snr_weights(a, args.min_snr))
        return torch.nn.functional.mse_loss(unet(xt, t).sample, target)

    train(pr, loss_at, opt, list(unet.parameters()), zip(ema.parameters(), unet.parameters(), strict=True), args,
          checkpoint)  # fmt: skip
    print(f"done: {pr.step} steps in {pr.elapsed / 60:.1f} min; saved {out} (state {state_path})", flush=True)


if __name__ == "__main__":
    main()
