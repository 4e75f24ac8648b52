"""Train a small text-conditional pixel-space DDPM on procedural shapes, with its own tiny CLIP text encoder.

The SuperDiff "AND" set-up in miniature. One model whose captions name ONE attribute at a time, and two experts:

    python examples/shapes/train_conditional.py --captions attribute --out model_cards/shapes-text --seed 2
    python examples/shapes/train_conditional.py --captions colour --out model_cards/shapes-text-colour --seed 3
    python examples/shapes/train_conditional.py --captions shape --out model_cards/shapes-text-shape --seed 4

* ``attribute``: every training image gets ONE caption, chosen at random: its colour ("a red shape") or its shape
  ("a circle"); never a caption naming both ("a red circle" is never seen in training).
* ``colour``: colour captions only; ``shape``: shape captions only.
* ``joint``: the ceiling model. Half the captions name both attributes ("a red circle"), a quarter the colour only, a
  quarter the shape only, so it answers the joint prompt and each single-attribute prompt.
* ``--drop`` (default 0.1) of the captions are replaced by the empty prompt "" (for classifier-free guidance).

Model: diffusers ``UNet2DConditionModel`` (cross-attention at the two lower resolutions) + a transformers
``CLIPTextModel`` (2 layers, hidden 64) trained jointly from scratch, and a ``CLIPTokenizer`` over our own small
vocabulary (written by :func:`write_tokenizer_files`: every word of :data:`WORDS` is ONE token; other words fall
apart into known pieces or the unknown token ``<|endoftext|>``, as the tokenizer does). The noise schedule is the
unconditional trainer's (DDPM, linear betas 1e-4..0.02 over 1000 steps, epsilon prediction).

The output folder has ``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` (EMA weights, safetensors) and a
``model_index.json`` naming ``ComposePipeline`` (no VAE: pixel space; no safety checker). Each component loads with
its own ``from_pretrained(folder, subfolder=...)``; see :func:`load_components`. Training is reproducible from the
seed (data, caption choice and dropout are drawn from a generator seeded by ``(seed, step)``) and resumable: the
full state is saved under the git-ignored ``outputs/shapes/<out name>/state.pt`` and picked up by ``--resume``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.shapes.data import COLOURS, SHAPES, caption, make_batch  # noqa: E402
from examples.shapes.train_unconditional import build_scheduler  # noqa: E402
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

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# One token each. The first twelve are the ones the captions use; the rest are there so that natural prompts
# ("a picture of a red circle and a blue star") tokenize into known words.
WORDS: tuple[str, ...] = (
    "a", "an", "the", "shape", *COLOURS, *SHAPES,
    "shapes", "of", "and", "or", "with", "one", "image", "picture", "photo", "colour", "color",
)  # fmt: skip
MAX_LENGTH = 16  # text encoder max_position_embeddings == tokenizer model_max_length
CAPTION_MODES = ("attribute", "colour", "shape", "joint")


# ----------------------------------------------------------------------------------------------- tokenizer


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain CLIP-style BPE: repeatedly merge the lowest-ranked adjacent pair."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:], strict=False))]
        best, i = min(pairs)
        if best == math.inf:
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def build_vocab(words=WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-format vocabulary and merge list in which each of ``words`` is a single word-final token.

    Merges are added word by word, always after the existing ones, joining whatever pieces the current merges leave
    from left to right; a later merge never changes how an earlier word tokenizes (it has a lower priority than
    every merge on that word's path), so every word ends as one token ``word</w>``."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    tokens: list[str] = []

    def add(tok):
        if tok not in tokens:
            tokens.append(tok)

    for w in words:
        chars = list(w[:-1]) + [w[-1] + "</w>"]
        for c in chars:
            add(c)
        pieces = _bpe(chars, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            add(pieces[0])
    for w in words:  # sanity: the construction above guarantees this
        assert _bpe(list(w[:-1]) + [w[-1] + "</w>"], ranks) == [w + "</w>"], w
    vocab = {BOS: 0, EOS: 1}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def write_tokenizer_files(folder, words=WORDS) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` (first line ``#version: 0.2``) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0, ensure_ascii=False) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return folder / "vocab.json", folder / "merges.txt"


def build_tokenizer(folder, max_length: int = MAX_LENGTH):
    """A ``CLIPTokenizer`` over our vocabulary. The file paths go POSITIONALLY (transformers 5 ignores the
    ``vocab_file=``/``merges_file=`` keywords), and ``model_max_length`` must be set (default ~1e30 crashes)."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_tokenizer_files(folder)
    return CLIPTokenizer(
        str(vocab_file),
        str(merges_file),
        model_max_length=max_length,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
    )


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids (n, model_max_length), padded and truncated the way Stable Diffusion pipelines do it."""
    n = tokenizer.model_max_length
    return tokenizer(list(prompts), padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids


# ----------------------------------------------------------------------------------------------- models


def build_text_encoder(tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4):
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    cfg = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        projection_dim=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    return CLIPTextModel(cfg)


def build_cond_unet(size: int, channels, layers: int, cross_dim: int, heads: int = 4, norm_groups: int = 8):
    """Plain ResNet blocks at full resolution, cross-attention blocks at the lower ones (and in the middle)."""
    from diffusers import UNet2DConditionModel

    n = len(channels)
    return UNet2DConditionModel(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(channels),
        layers_per_block=layers,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=cross_dim,
        attention_head_dim=heads,  # diffusers' legacy name: this is the number of heads
        norm_num_groups=norm_groups,
    )


def encode(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """Cross-attention context: the last hidden state of the text encoder, (n, MAX_LENGTH, hidden)."""
    return text_encoder(ids)[0]


def model_index() -> dict:
    import diffusers

    from pipelines.loading import CLASS_NAME  # the hub's [module, class] pair: DiffusionPipeline loads the folder too

    return {
        "_class_name": list(CLASS_NAME),
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    }


def save_folder(unet, text_encoder, tokenizer, scheduler, out: Path, info: dict | None = None) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(out / "tokenizer")
    write_tokenizer_files(out / "tokenizer")  # also the classic CLIP files, for loaders that want them
    scheduler.save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps(model_index(), indent=2) + "\n")
    from pipelines.loading import write_pipeline_module

    write_pipeline_module(out)  # compose_pipeline.py, the module model_index.json's _class_name names
    if info is not None:
        (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")


def load_components(folder) -> dict:
    """Load ``unet``, ``text_encoder``, ``tokenizer``, ``scheduler`` from a folder written by this script."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    return {
        "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval(),
        "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval(),
        "tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        "scheduler": DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
    }


# ----------------------------------------------------------------------------------------------- captions


def training_captions(shape_idx, colour_idx, mode: str, drop: float, g: torch.Generator) -> list[str]:
    """One caption per image: its colour or its shape (``attribute``: chosen at random per image), never both;
    ``joint``: both attributes for half the images, else one of them; a fraction ``drop`` replaced by ""."""
    n = len(shape_idx)
    if mode in ("attribute", "joint"):
        use_colour = torch.rand(n, generator=g) < 0.5
    elif mode in ("colour", "shape"):
        use_colour = torch.full((n,), mode == "colour")
    else:
        raise ValueError(f"unknown caption mode {mode!r}; expected one of {CAPTION_MODES}")
    dropped = torch.rand(n, generator=g) < drop
    both = torch.rand(n, generator=g) < 0.5 if mode == "joint" else torch.zeros(n, dtype=torch.bool)
    out = []
    labels = zip(shape_idx.tolist(), colour_idx.tolist(), use_colour.tolist(), dropped.tolist(), both.tolist(),
                 strict=True)  # fmt: skip
    for s, c, uc, d, b in labels:
        if d:
            out.append("")
        elif b:
            out.append(caption(shape=s, colour=c))
        else:
            out.append(caption(colour=c) if uc else caption(shape=s))
    return out


# ----------------------------------------------------------------------------------------------- training


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--captions", choices=CAPTION_MODES, default="attribute")
    p.add_argument("--drop", type=float, default=0.1, help="caption dropout to the empty prompt")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), help=f"subset of {SHAPES}")
    p.add_argument("--colours", nargs="+", default=list(COLOURS), help=f"subset of {COLOURS}")
    p.add_argument("--out", required=True, help="output folder, e.g. model_cards/shapes-text")
    p.add_argument("--size", type=int, default=24)
    p.add_argument("--channels", type=int, nargs="+", default=[32, 64, 64], help="UNet block_out_channels")
    p.add_argument("--layers", type=int, default=1, help="UNet layers_per_block")
    p.add_argument("--heads", type=int, default=4, help="UNet cross-attention heads")
    p.add_argument("--text-hidden", type=int, default=64, help="text encoder width == cross_attention_dim")
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--text-heads", type=int, default=4)
    add_loop_args(p, lr=1e-3, seed=0)
    return p.parse_args(argv)


def init_loaders(unet, text_encoder) -> dict:
    """`training.warm_start`'s models of this trainer: the UNet and the text encoder of a folder it wrote."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    return {
        "unet": (unet, lambda f: UNet2DConditionModel.from_pretrained(f, subfolder="unet")),
        "text_encoder": (text_encoder, lambda f: CLIPTextModel.from_pretrained(f, subfolder="text_encoder")),
    }


def main(argv=None):
    args = parse_args(argv)
    out, state_path, command = start(args, argv)

    tokenizer = build_tokenizer(state_path.parent / "tokenizer_files")
    text_encoder = build_text_encoder(tokenizer, args.text_hidden, args.text_layers, args.text_heads)
    unet = build_cond_unet(args.size, args.channels, args.layers, args.text_hidden, args.heads)
    if args.init and not (args.resume and state_path.exists()):
        warm_start(args.init, init_loaders(unet, text_encoder))
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).requires_grad_(False)
    scheduler = build_scheduler()
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    n_unet = sum(p.numel() for p in unet.parameters())
    n_text = sum(p.numel() for p in text_encoder.parameters())
    objects = dict(unet=unet, text_encoder=text_encoder, ema_unet=ema_unet, ema_text=ema_text, opt=opt)
    pr = load_state(state_path, objects) if args.resume and state_path.exists() else Progress()

    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)
    print(
        f"UNet {n_unet / 1e6:.2f}M + text encoder {n_text / 1e6:.3f}M params, captions {args.captions}, "
        f"drop {args.drop}, size {args.size}, batch {args.batch}, lr {args.lr}, threads {args.threads}, "
        f"budget {args.minutes} min, max {args.steps} steps",
        flush=True,
    )

    def info(final: bool):
        return {
            "command": command,
            "captions": args.captions,
            "caption_dropout": args.drop,
            "shapes": args.shapes,
            "colours": args.colours,
            "size": args.size,
            "block_out_channels": args.channels,
            "layers_per_block": args.layers,
            "cross_attention_heads": args.heads,
            "text_hidden": args.text_hidden,
            "text_layers": args.text_layers,
            "text_heads": args.text_heads,
            "max_length": tokenizer.model_max_length,
            "vocabulary_words": list(WORDS),
            "unet_parameters": n_unet,
            "text_encoder_parameters": n_text,
            "init": args.init,
            **loop_info(args, pr, final),
        }

    def checkpoint(final=False):
        save_state(state_path, objects, pr, args=vars(args))
        save_folder(ema_unet, ema_text, tokenizer, scheduler, out, info(final))

    unet.train()
    text_encoder.train()
    pairs = [
        *zip(ema_unet.parameters(), unet.parameters(), strict=True),
        *zip(ema_text.parameters(), text_encoder.parameters(), strict=True),
    ]

    def loss_at(g: torch.Generator) -> torch.Tensor:
        x0, s_idx, c_idx = make_batch(args.batch, g, size=args.size, shapes=args.shapes, colours=args.colours)
        prompts = training_captions(s_idx, c_idx, args.captions, args.drop, g)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=g)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        ctx = encode(text_encoder, tokenize(tokenizer, prompts))
        eps = unet(xt, t, encoder_hidden_states=ctx).sample
        return weighted_mse(eps, noise, snr_weights(a, args.min_snr))

    train(pr, loss_at, opt, params, pairs, args, checkpoint)
    print(f"done: {pr.step} steps in {pr.elapsed / 60:.1f} min; saved {out} (state {state_path})", flush=True)


if __name__ == "__main__":
    main()
