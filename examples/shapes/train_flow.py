"""Train a small text-conditional SD3 transformer on procedural shapes with the rectified-flow loss (issue 21).

    python examples/shapes/train_flow.py --out model_cards/shapes-text-flow --minutes 75

The flow-matching counterpart of ``shapes-text`` (``train_conditional.py``): the same captions naming ONE attribute
("a red shape" or "a circle", never both), the same tokenizer and a jointly trained CLIP text encoder, but the
network is a diffusers ``SD3Transformer2DModel`` in pixel space (24 x 24 x 3, 2 x 2 patches, no VAE) trained on the
rectified-flow path x_t = (1 - t) x_0 + t eps to predict the velocity eps - x_0 (t drawn logit-normal, as SD3, or
uniform with ``--t-sampling uniform``), and
the scheduler is ``FlowMatchEulerDiscreteScheduler`` (shift 1). SD3 takes two CLIP encoders and T5: here both CLIP
slots hold the same encoder (its states side by side, its pooled projection twice) and there is no T5: its slot is
``max_sequence_length`` (4) zero tokens, recorded in model_index.json so that ComposePipeline uses that length.

The output folder loads with ``ComposePipeline.from_pretrained`` (family SD3); training is reproducible from the seed
and resumable (``--resume``; state under outputs/shapes/<out name>/state.pt).
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
from examples.shapes.train_conditional import (  # noqa: E402
    CAPTION_MODES,
    WORDS,
    build_text_encoder,
    build_tokenizer,
    tokenize,
    training_captions,
    write_tokenizer_files,
)
from examples.shapes.training import (  # noqa: E402
    Progress,
    add_loop_args,
    load_state,
    loop_info,
    save_state,
    start,
    train,
    warm_start,
)
from pipelines.families import sd3_context  # noqa: E402

T5_TOKENS = 4  # zero tokens in SD3's T5 slot (no T5 encoder); ComposePipeline reads it from model_index.json


def build_transformer(size: int, patch: int, layers: int, heads: int, head_dim: int, text_hidden: int):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=size,
        patch_size=patch,
        in_channels=3,
        out_channels=3,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=2 * text_hidden,  # the two CLIP slots side by side
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=2 * text_hidden,
        pos_embed_max_size=size // patch,
    )


def conditioning(text_encoder, ids: torch.Tensor, joint_dim: int) -> dict[str, torch.Tensor]:
    """SD3's conditioning (`pipelines.families.sd3_context`) with this encoder in both CLIP slots and no T5."""
    out = text_encoder(ids, output_hidden_states=True)
    h, pooled = out.hidden_states[-2], out[0]
    t5 = torch.zeros(ids.shape[0], T5_TOKENS, joint_dim, dtype=h.dtype)
    return sd3_context(h, pooled, h, pooled, t5, joint_dim)


def save_folder(transformer, text_encoder, tokenizer, scheduler, out: Path, info: dict | None = None) -> None:
    import diffusers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(out / "transformer", safe_serialization=True)
    for name in ("text_encoder", "text_encoder_2"):  # one encoder, both CLIP slots
        text_encoder.save_pretrained(out / name, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer.save_pretrained(out / name)
        write_tokenizer_files(out / name)
    scheduler.save_pretrained(out / "scheduler")
    from pipelines.loading import write_pipeline_module

    index = {
        "_class_name": write_pipeline_module(out),  # and compose_pipeline.py: DiffusionPipeline loads the folder too
        "_diffusers_version": diffusers.__version__,
        "max_sequence_length": T5_TOKENS,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if info is not None:
        (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")


def sample_t(args, g: torch.Generator) -> torch.Tensor:
    """(batch,) training times: logit-normal (the default draws exactly those of the shipped model's run) or
    uniform."""
    if args.t_sampling == "uniform":
        return torch.rand(args.batch, generator=g).clamp(1e-4, 1 - 1e-4)
    z = torch.randn(args.batch, generator=g)
    return torch.sigmoid(z if (args.t_mean, args.t_std) == (0.0, 1.0) else args.t_mean + args.t_std * z)


def t_description(args) -> str:
    if args.t_sampling == "uniform":
        return "uniform"
    if (args.t_mean, args.t_std) == (0.0, 1.0):
        return "logit-normal"
    return f"logit-normal (location {args.t_mean:g}, scale {args.t_std:g})"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--captions", choices=CAPTION_MODES, default="attribute")
    p.add_argument("--drop", type=float, default=0.1, help="caption dropout to the empty prompt")
    p.add_argument("--out", required=True, help="output folder, e.g. model_cards/shapes-text-flow")
    p.add_argument("--size", type=int, default=24)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--text-hidden", type=int, default=64)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--t-sampling", choices=("logit_normal", "uniform"), default="logit_normal",
                   help="the training times t: logit-normal (sigmoid of N(--t-mean, --t-std^2), as SD3) or "
                   "uniform on (0, 1), which trains the low-noise end (t near 0: edges, corners) as often as "
                   "the middle")  # fmt: skip
    p.add_argument("--t-mean", type=float, default=0.0, help="logit-normal location (negative: more low-noise t)")
    p.add_argument("--t-std", type=float, default=1.0, help="logit-normal scale")
    add_loop_args(p, lr=5e-4, seed=5)
    args = p.parse_args(argv)
    if not args.t_std > 0 or not abs(args.t_mean) < 10:
        p.error("--t-std must be > 0 and --t-mean within -10 to 10")
    if args.min_snr:
        p.error("--min-snr weights an epsilon-prediction loss; this trainer predicts the flow velocity. Drop it.")
    return args


def main(argv=None):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModelWithProjection

    args = parse_args(argv)
    out, state_path, command = start(args, argv)
    tokenizer = build_tokenizer(state_path.parent / "tokenizer_files")
    base = build_text_encoder(tokenizer, args.text_hidden, args.text_layers)
    text_encoder = CLIPTextModelWithProjection(base.config)  # the same architecture, with its projection
    transformer = build_transformer(args.size, args.patch, args.layers, args.heads, args.head_dim, args.text_hidden)
    if args.init and not (args.resume and state_path.exists()):
        from diffusers import SD3Transformer2DModel

        warm_start(args.init, {
            "transformer": (transformer, lambda f: SD3Transformer2DModel.from_pretrained(f, subfolder="transformer")),
            "text_encoder": (text_encoder,
                             lambda f: CLIPTextModelWithProjection.from_pretrained(f, subfolder="text_encoder")),
        })  # fmt: skip
    ema_tr = copy.deepcopy(transformer).requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).requires_grad_(False)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    params = [*transformer.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    n_tr = sum(p.numel() for p in transformer.parameters())
    n_text = sum(p.numel() for p in text_encoder.parameters())
    objects = dict(transformer=transformer, text_encoder=text_encoder, ema_transformer=ema_tr, ema_text=ema_text,
                   opt=opt)  # fmt: skip
    pr = load_state(state_path, objects) if args.resume and state_path.exists() else Progress()
    joint = 2 * args.text_hidden
    print(f"SD3 transformer {n_tr / 1e6:.2f}M + text encoder {n_text / 1e6:.3f}M params, captions {args.captions}, "
          f"batch {args.batch}, lr {args.lr}, budget {args.minutes} min", flush=True)  # fmt: skip

    def info(final: bool) -> dict:
        return {"command": command, "captions": args.captions, "caption_dropout": args.drop, "size": args.size,
                "patch_size": args.patch, "layers": args.layers, "heads": args.heads, "head_dim": args.head_dim,
                "text_hidden": args.text_hidden, "text_layers": args.text_layers, "t5_tokens": T5_TOKENS,
                "vocabulary_words": list(WORDS), "transformer_parameters": n_tr, "text_encoder_parameters": n_text,
                "init": args.init, "loss": f"rectified flow (velocity), t {t_description(args)}",
                **loop_info(args, pr, final)}  # fmt: skip

    def checkpoint(final=False):
        save_state(state_path, objects, pr)
        save_folder(ema_tr, ema_text, tokenizer, scheduler, out, info(final))

    transformer.train()
    text_encoder.train()
    pairs = [*zip(ema_tr.parameters(), transformer.parameters(), strict=True),
             *zip(ema_text.parameters(), text_encoder.parameters(), strict=True)]  # fmt: skip

    def loss_at(g: torch.Generator) -> torch.Tensor:
        x0, s_idx, c_idx = make_batch(args.batch, g, size=args.size, shapes=list(SHAPES), colours=list(COLOURS))
        prompts = training_captions(s_idx, c_idx, args.captions, args.drop, g)
        noise = torch.randn(x0.shape, generator=g)
        t = sample_t(args, g)
        xt = (1 - t).view(-1, 1, 1, 1) * x0 + t.view(-1, 1, 1, 1) * noise
        cond = conditioning(text_encoder, tokenize(tokenizer, prompts), joint)
        pred = transformer(hidden_states=xt, timestep=t * 1000, return_dict=False, **cond)[0]
        return torch.nn.functional.mse_loss(pred, noise - x0)

    train(pr, loss_at, opt, params, pairs, args, checkpoint)
    print(f"done: {pr.step} steps in {pr.elapsed / 60:.1f} min; saved {out} (state {state_path})", flush=True)


if __name__ == "__main__":
    main()
