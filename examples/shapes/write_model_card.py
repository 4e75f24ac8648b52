"""Write the model card README.md of a shapes model folder from the figures the scripts measured.

    python examples/shapes/write_model_card.py model_cards/shapes-classifier
    python examples/shapes/write_model_card.py model_cards/shapes-uncond-a --notes "Visual inspection: ..."

Reads ``metrics.json`` (classifier) or ``train_info.json`` + ``eval.json`` (unconditional DDPM, text-conditional
model when ``train_info.json`` has ``captions``, text-conditional flow transformer from ``train_flow.py`` when it has
``transformer_parameters``); nothing in the card is typed in by hand except ``--notes``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.shapes.data import BACKGROUND_RGB, COLOUR_RGB, DEFAULT_SIZE_RANGE, SHAPES  # noqa: E402

DATA_BLURB = (
    "Procedural, generated on the fly by `examples/shapes/data.py` (no stored or downloaded data): one shape from "
    f"{list(SHAPES)} in one colour from {dict(COLOUR_RGB)} (RGB in [0, 1]) on a plain black background "
    f"(RGB {BACKGROUND_RGB}), size parameter uniform in {list(DEFAULT_SIZE_RANGE)} x image side, uniform position "
    "(shape fully inside the image) and rotation, anti-aliased by 4x4 supersampling; pixel values scaled to [-1, 1]."
)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min ({seconds:.0f} s)"


def classifier_card(folder: Path, notes: str) -> str:
    m = json.loads((folder / "metrics.json").read_text())
    hp = m["hyperparameters"]
    rows = "\n".join(
        f"| {r['size']}x{r['size']} | {r['n']} | {r['seed']} | {100 * r['shape_acc']:.2f}% | "
        f"{100 * r['colour_acc']:.2f}% | {100 * r['both_confident_frac']:.1f}% |"
        for r in m["held_out"]
    )
    hp_rows = "\n".join(f"| {k} | {v} |" for k, v in hp.items())
    return f"""---
license: apache-2.0
library_name: pytorch
tags:
- image-classification
- synthetic-data
- procedural-shapes
- evaluation
datasets:
- procedural (examples/shapes/data.py)
metrics:
- accuracy
---

# shapes-classifier

A small two-headed CNN ({m["parameters"]:,} parameters) that predicts the **shape** (circle, square, triangle, star)
and the **colour** (red, green, blue, yellow) of an image from the procedural shapes world of this repository. It is
the judge used to score samples from the shapes diffusion models (e.g. `examples/shapes/eval_unconditional.py`).

- Files: `model.safetensors` (weights), `config.json` (architecture + label lists), `metrics.json` (everything below).
- Restore if missing or corrupt: `{m["command"]}` (the loader prints this command too).

```python
from examples.shapes.classifier import load_classifier
model = load_classifier("model_cards/shapes-classifier")
shape_probs, colour_probs = model.predict(images)  # images in [-1, 1], shape (n, 3, H, W)
```

## Training data

{DATA_BLURB}

Training set: {hp["n_train"]} images per size at sizes {hp["sizes"]} (seeded), augmented with random flips and
90-degree rotations (label-preserving) and Gaussian pixel noise with a per-image std uniform in [0, {hp["noise"]}].

## Training procedure

- Script: `examples/shapes/train_classifier.py`; exact command: `{m["command"]}`
- CPU only, torch {m["torch"]}, {hp["threads"]} thread(s); AdamW with a one-cycle learning-rate schedule, cross-entropy
  on both heads summed, {m["steps"]} steps.
- Measured wall-clock time: rendering the training set {_minutes(m["render_seconds"])}, training
  {_minutes(m["train_seconds"])} (on a shared 2-core machine).

| hyper-parameter | value |
|---|---|
{hp_rows}

## Evaluation (measured)

Clean held-out images rendered from seeds not used in training:

| image size | n | seed | shape accuracy | colour accuracy | both heads max-prob > 0.9 |
|---|---|---|---|---|---|
{rows}

`tests/test_shapes.py` re-checks >= 99% on both heads on a fresh seeded batch of 400 images per size.

## Intended use and limits

A measuring instrument for this toy world only. It has never seen anything but one clean shape on black, so on
out-of-distribution inputs (two shapes, other colours, other backgrounds, heavy noise) its probabilities mean little;
the "valid" criterion (max-probability > 0.9 on both heads) is a heuristic, not a calibrated test.
{notes}"""


def _hist_table(ev: dict) -> str:
    lines = ["| shape | count (argmax) | count (valid) |", "|---|---|---|"]
    for k in SHAPES:
        lines.append(f"| {k} | {ev['shape_hist'][k]} | {ev['valid_shape_hist'][k]} |")
    lines += ["", "| colour | count (argmax) |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in ev["colour_hist"].items()]
    return "\n".join(lines)


def _unfinished(ti: dict) -> str:
    if ti.get("finished"):
        return ""
    return "\n**Training did not finish** (`finished: false` in `train_info.json`): intermediate weights.\n"


def _prompt_eval_cmd(name: str, ev: dict) -> str:
    return (
        f"python examples/shapes/eval_conditional.py model_cards/{name} --n {ev['n_per_prompt']} "
        f"--steps {ev['steps']} --cfg {ev['cfg']} --sampler {ev['sampler']} --save"
    )


def _prompt_evaluation(ev: dict, eval_cmd: str, sampling: str, extra: str = "") -> str:
    """The Evaluation section of a text-conditional card (`eval_conditional.py`: per-prompt accuracy)."""
    return f"""## Evaluation (measured)

`{eval_cmd}`:
{ev["n_per_prompt"]} samples per prompt, {sampling}, classifier-free guidance scale {ev["cfg"]} ("" as the
unconditional branch), seed {ev["seed"]} (+ the prompt's index), judged by `model_cards/shapes-classifier`.
Accuracy = classifier argmax equals the attribute the prompt names; "valid" = classifier max-probability >
{ev["threshold"]} on both heads. Mean over prompts: accuracy **{100 * ev["mean_accuracy"]:.1f}%**, valid
{100 * ev["mean_valid_frac"]:.1f}%, valid and correct {100 * ev["mean_valid_and_correct_frac"]:.1f}%; sampling
{ev["seconds_per_image"]} s per image on CPU ({ev["sample_seconds"]} s in all, on a shared machine).{extra}

| prompt | accuracy | valid | valid and correct | the attribute not named (argmax counts) |
|---|---|---|---|---|
{_prompt_rows(ev)}
{_geometric_evaluation(ev)}
`samples.png` shows the first 8 samples of each prompt, one row per prompt in the order of the table.
"""


def _restore(name: str, eval_cmd: str, train_cmd: str | None = None) -> str:
    how = f"\n`{train_cmd}`,\n" if train_cmd else " the exact command above, "
    return f"""## Restore

If the folder is missing or corrupt, re-create it (same seed, roughly the same result; the wall-clock budget makes
the step count depend on the machine) with{how}then evaluate and rewrite this card with
`{eval_cmd}` and
`python examples/shapes/write_model_card.py model_cards/{name}`.
"""


def _uncond_geometric(ev: dict) -> str:
    geo = ev.get("geometric")
    if not geo:
        return ""
    hist = ", ".join(f"{k} {v}" for k, v in geo["shape_hist"].items())
    return (
        f"- the geometric judge (`examples/shapes/geometry.py`, issue 29's target valid >= 90%): valid (a shape and a "
        f"colour it can name) **{100 * geo['valid_frac']:.1f}%**, no shape named {100 * geo['shape_none_frac']:.1f}%, "
        f"valid and one of the trained shapes {100 * geo.get('valid_and_in_trained_shapes_frac', 0):.1f}%; "
        f"shapes: {hist}\n"
    )


def uncond_card(folder: Path, notes: str, state: Path | None = None) -> str:
    ti = json.loads((folder / "train_info.json").read_text())
    ev = json.loads((folder / "eval.json").read_text())
    name = folder.name
    other = {"shapes-uncond-a": "shapes-uncond-b", "shapes-uncond-b": "shapes-uncond-a"}.get(name)
    pair = f" Its partner `{other}` is trained on the other shapes." if other else ""
    hp = {
        k: ti[k]
        for k in (
            "size", "block_out_channels", "layers_per_block", "parameters", "batch", "lr", "warmup", "lr_schedule",
            "lr_final", "min_snr_gamma", "init", "ema_decay", "grad_clip", "seed", "threads", "steps", "images_seen",
        )
        if k in ti
    }  # fmt: skip
    hp_rows = "\n".join(f"| {k} | {v} |" for k, v in hp.items())
    constant = "linear warm-up then constant learning rate; loss: MSE on the noise"
    recipe = training_recipe(ti) if "lr_schedule" in ti else constant
    origin, copied, restore = _fine_tune(ti, name, "unet")
    if restore is None:
        restore = (
            f"python examples/shapes/train_unconditional.py --shapes {' '.join(ti['shapes'])} "
            f"--out model_cards/{name} --minutes {round(ti['train_seconds'] / 60)} --seed {ti['seed']}"
        )
    eval_cmd = (
        f"python examples/shapes/eval_unconditional.py model_cards/{name} --n {ev['n']} --steps {ev['steps']} "
        f"--sampler {ev['sampler']} --save"
    )
    sampler_text = "ancestral DDPM" if ev["sampler"] == "ddpm" else "DDIM (eta 0)"
    return f"""---
license: apache-2.0
library_name: diffusers
pipeline_tag: unconditional-image-generation
tags:
- diffusers
- ddpm
- unconditional-image-generation
- synthetic-data
- procedural-shapes
- superdiff
---

# {name}

A small pixel-space DDPM (diffusers `UNet2DModel`, {ti["parameters"]:,} parameters, epsilon prediction,
`DDPMScheduler` with linear betas over 1000 steps) {origin} on {ti["size"]}x{ti["size"]} procedural
images of **{" and ".join(ti["shapes"])}** only (all four colours). It is one half of a miniature SuperDiff "OR"
set-up: two models trained on disjoint halves of the shapes.{pair}

```python
from diffusers import DDPMPipeline
pipe = DDPMPipeline.from_pretrained("model_cards/{name}")  # unet/ (EMA weights, safetensors) + scheduler/
```

## Training data

{DATA_BLURB}

Subset: shapes {ti["shapes"]}, colours {ti["colours"]}; a fresh batch is rendered at every step, seeded by
(seed, step), so the model saw {ti["images_seen"]:,} distinct images.

## Training procedure

- Script: `examples/shapes/train_unconditional.py`; exact command{copied}:
  `{ti["command"]}`
- CPU only, torch {ti["torch"]}, {ti["threads"]} thread; AdamW, {recipe};
  gradient clipping, EMA of the weights (the saved weights are the EMA ones).
- Measured training time: {_minutes(ti["train_seconds"])} of wall-clock for {ti["steps"]} steps, on a 2-core machine
  shared with other jobs (so the step rate varied); final loss (mean of last 100 steps): {ti["final_loss_avg100"]}.
- Resumable: `--resume` continues from the state file under `outputs/shapes/{name}/` (not shipped).
{loss_plot(folder, state)}
| hyper-parameter | value |
|---|---|
{hp_rows}

## Evaluation (measured)

`{eval_cmd}`:
{ev["n"]} samples, {sampler_text} with {ev["steps"]} steps, seed {ev["seed"]}, judged by
`model_cards/shapes-classifier`. "Valid" = classifier max-probability > {ev["threshold"]} on both heads.

- valid: **{100 * ev["valid_frac"]:.1f}%** (shape head confident {100 * ev["shape_confident_frac"]:.1f}%, colour head
  confident {100 * ev["colour_confident_frac"]:.1f}%)
- classified as one of the trained shapes {ev.get("trained_shapes")}: {100 * ev.get("in_trained_shapes_frac", 0):.1f}%;
  valid and one of the trained shapes: {100 * ev.get("valid_and_in_trained_shapes_frac", 0):.1f}%
{_uncond_geometric(ev)}- sampling time: {ev["sample_seconds"]} s on CPU

{_hist_table(ev)}

`samples.png` shows the {ev["n"]} evaluated samples (8 per row, upscaled 4x).

## Intended use and limits

A test fixture and teaching model for composing diffusion models at sampling time (e.g. SuperDiff OR between this
model and its partner) where the ground truth of every sample can be checked with the shapes classifier. It is
tiny and briefly trained: expect imperfect edges, occasional malformed or ambiguous shapes, and nothing at all
outside this toy world. Not for any real-image use.

{_restore(name, eval_cmd, restore)}{notes}"""


_CAPTION_TEXT = {
    "attribute": (
        "each training image gets ONE caption naming ONE attribute, chosen at random per image: its colour "
        '("a red shape") or its shape ("a circle"). It has never seen a caption naming both ("a red circle")'
    ),
    "colour": 'colour captions only ("a red shape", "a green shape", ...): an expert on colour',
    "shape": 'shape captions only ("a circle", "a square", ...): an expert on shape',
    "joint": (
        'half the training images get a caption naming both attributes ("a red circle"), the others ONE of them '
        '(its colour "a red shape" or its shape "a circle", chosen at random)'
    ),
}
_ROLE = {
    "attribute": 'the single-model AND set-up (compose "a red shape" AND "a circle" on this one model)',
    "colour": "the two-expert AND set-up, together with `shapes-text-shape`",
    "shape": "the two-expert AND set-up, together with `shapes-text-colour`",
    "joint": (
        'the benchmarks as the ceiling: its joint prompt ("a red circle") is what a model that WAS taught both '
        "attributes together scores, the bound every composition of `shapes-text` is read against"
    ),
}


def lr_schedule(ti: dict) -> str:
    """The learning-rate schedule of a run, from its train_info.json."""
    if ti.get("lr_schedule", "constant") == "cosine":
        return f"linear warm-up over {ti['warmup']} steps, then cosine decay to {ti['lr_final']} x lr at the last step"
    return "linear warm-up then constant learning rate"


def warm_start(ti: dict) -> str:
    """"; warm start from ..." for a run that started from a folder's weights, else ""."""
    return f"; warm start from `{ti['init']}` (its EMA weights)" if ti.get("init") else ""


def training_recipe(ti: dict) -> str:
    """The learning-rate schedule, loss weighting and warm start of a run, from its train_info.json."""
    lr = lr_schedule(ti)
    gamma = ti.get("min_snr_gamma") or 0
    loss = (
        f"MSE on the noise weighted by Min-SNR-{gamma:g} (min(SNR, {gamma:g}) / SNR per sample; Hang et al. 2023)"
        if gamma
        else "MSE on the noise"
    )
    return f"{lr}; loss: {loss}{warm_start(ti)}"


def loss_plot(folder: Path, state: Path | None) -> str:
    """Write `loss.png` (the training loss, raw and a 250-step running mean) from a training-state file; the card's
    reference to it ("" when there is neither a state file nor an earlier plot)."""
    png = folder / "loss.png"
    if state is not None and state.exists():
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
        import torch

        hist = np.asarray(torch.load(state, map_location="cpu", weights_only=False)["loss_hist"], dtype=float)
        k = min(250, len(hist))
        mean = np.convolve(hist, np.ones(k) / k, mode="valid")
        fig, ax = plt.subplots(figsize=(5, 2.6), dpi=100)
        ax.plot(np.arange(1, len(hist) + 1), hist, lw=0.3, alpha=0.35, color="grey", label="loss per step")
        ax.plot(np.arange(k, len(hist) + 1), mean, lw=1.2, color="C0", label=f"mean of {k} steps")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(plt.MaxNLocator(5))
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(png)
        plt.close(fig)
    if not png.exists():
        return ""
    return "\n![training loss per step and its running mean](loss.png)\n"


def _geometric_evaluation(ev: dict) -> str:
    """The geometric judge's figures and the two judges' agreement, where the evaluation has them."""
    geo = ev.get("geometric")
    if not geo:
        return ""
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    rows = []
    for r in ev["prompts"]:
        named = r.get("geometric_both")
        if named is None:
            named = r["geometric_named_shape"] if r["named_shape"] else r["geometric_named_colour"]
        rows.append(f"| {r['prompt']} | {pct(named)} | {pct(r['geometric_shape_none'])} | {pct(r['accuracy'])} | "
                    f"{pct(r['agree_shape'])} | {pct(r['agree_colour'])} |")  # fmt: skip
    met = ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in geo["targets_met"].items() if v is not None)
    said = []
    if geo["geometric_colour_prompts_named_colour"] is not None:
        said.append(f"colour prompts give the named colour {pct(geo['geometric_colour_prompts_named_colour'])} of the "
                    f"time (worst prompt {pct(geo['geometric_colour_prompts_min'])})")  # fmt: skip
    if geo["geometric_shape_prompts_named_shape"] is not None:
        said.append(f"shape prompts the named shape {pct(geo['geometric_shape_prompts_named_shape'])} (worst "
                    f"{pct(geo['geometric_shape_prompts_min'])})")  # fmt: skip
    if geo.get("geometric_joint_prompts_both") is not None:
        said.append(f"prompts naming both attributes give both {pct(geo['geometric_joint_prompts_both'])} of the time")
    return f"""
Under the geometric judge (`examples/shapes/geometry.py`: measured shape and colour, thresholds fitted on renders),
on the same images: {"; ".join(said)}; it names no shape for {pct(geo["geometric_shape_none"])} of the images.
Targets of the single-attribute models (colour >= 98%, shape >= 95%, none <= 5%): {met}. The two judges agree on the
shape of {pct(geo["agree_shape"])} and on the colour of {pct(geo["agree_colour"])} of the images.

| prompt | geometric: named | geometric: no shape | classifier: accuracy | agree: shape | agree: colour |
|---|---|---|---|---|---|
{chr(10).join(rows)}
"""


def _prompt_rows(ev: dict) -> str:
    return "\n".join(
        f"| {r['prompt']} | {100 * r['accuracy']:.1f}% | {100 * r['valid_frac']:.1f}% | "
        f"{100 * r['valid_and_correct_frac']:.1f}% | "
        + (
            ", ".join(f"{k} {v}" for k, v in r["shape_hist"].items())
            if r["named_shape"] is None
            else ", ".join(f"{k} {v}" for k, v in r["colour_hist"].items())
        )
        + " |"
        for r in ev["prompts"]
    )


def _flow_grad_clip(ti: dict):
    """The gradient-clipping norm: train_info.json's, else the recorded command parsed by train_flow.py."""
    if "grad_clip" in ti:
        return ti["grad_clip"]
    from examples.shapes.train_flow import parse_args

    return parse_args(shlex.split(ti["command"])[2:]).grad_clip


def _counterpart(folder: Path) -> str:
    """One sentence on the UNet counterpart `shapes-text`'s own measured figures, when its eval.json is there."""
    path = folder.parent / "shapes-text" / "eval.json"
    if not path.is_file():
        return ""
    ev = json.loads(path.read_text())
    return (
        f" For orientation only (a different network, sampler and sample count, so not a controlled comparison): the "
        f"DDPM counterpart `shapes-text` measured accuracy {100 * ev['mean_accuracy']:.1f}%, valid "
        f"{100 * ev['mean_valid_frac']:.1f}%, valid and correct {100 * ev['mean_valid_and_correct_frac']:.1f}% with "
        f"{ev['n_per_prompt']} samples per prompt, {ev['sampler']} with {ev['steps']} steps and guidance {ev['cfg']}."
    )


def _fine_tune(ti: dict, name: str, subfolders: str) -> tuple[str, str, str | None]:
    """(how the weights came about, the note on the copied weights, the restore command or None) of a run: from
    scratch, or fine-tuned from this folder's earlier weights (`init` is the folder; `init_commit`, recorded when the
    fine-tune was shipped, the commit that holds them). subfolders: the shell glob of what the copy moves."""
    if ti.get("init") != f"model_cards/{name}":
        return "trained from scratch", "", None
    prev = ti.get("init_commit")
    checkout = f"git checkout {prev} -- model_cards/{name}" if prev else None
    origin = "trained from scratch, then fine-tuned from those weights" + (
        f" (commit {prev}; `{checkout}` restores them)" if prev else ""
    )
    if " " in subfolders:
        copy = f"for d in {subfolders}; do cp outputs/models/{name}/$d/* model_cards/{name}/$d/; done"
    else:
        copy = f"cp outputs/models/{name}/{subfolders}/* model_cards/{name}/{subfolders}/"
    restore = f"{checkout + '; ' if prev else ''}{ti['command']}; {copy}"
    return origin, " (then the EMA weights copied into this folder)", restore


def flow_card(folder: Path, notes: str, state: Path | None = None) -> str:
    ti = json.loads((folder / "train_info.json").read_text())
    ev = json.loads((folder / "eval.json").read_text())
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    ctx_len = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())["model_max_length"]
    name = folder.name
    mode = ti["captions"]
    size, patch, hidden = ti["size"], ti["patch_size"], ti["heads"] * ti["head_dim"]
    joint = 2 * ti["text_hidden"]
    grad_clip = _flow_grad_clip(ti)
    hp = {
        k: ti[k]
        for k in (
            "captions", "caption_dropout", "size", "patch_size", "layers", "heads", "head_dim", "text_hidden",
            "text_layers", "t5_tokens", "transformer_parameters", "text_encoder_parameters", "batch", "lr", "warmup",
            "lr_schedule", "lr_final", "init", "ema_decay",
        )
        if k in ti
    }  # fmt: skip
    hp["grad_clip"] = grad_clip
    hp.update({k: ti[k] for k in ("seed", "threads", "steps", "images_seen")})
    hp_rows = "\n".join(f"| {k} | {v} |" for k, v in hp.items())
    eval_cmd = _prompt_eval_cmd(name, ev)
    sampling = (
        f"Euler with {ev['steps']} steps on the checkpoint's own FlowMatchEuler sigmas (the deterministic "
        "probability-flow ODE, through `ComposePipeline` with one prompt)"
    )
    unfinished = _unfinished(ti)
    origin, copied, restore = _fine_tune(ti, name, "transformer text_encoder text_encoder_2")
    return f"""---
license: apache-2.0
library_name: diffusers
pipeline_tag: text-to-image
tags:
- diffusers
- sd3
- flow-matching
- rectified-flow
- text-to-image
- pixel-space
- classifier-free-guidance
- synthetic-data
- procedural-shapes
- superdiff
---

# {name}

A small text-conditional **rectified-flow** model in pixel space (no VAE), the flow-matching counterpart of
`shapes-text`: a diffusers `SD3Transformer2DModel` ({ti["transformer_parameters"]:,} parameters; {size}x{size}x3
images cut into {patch}x{patch} patches, so {(size // patch) ** 2} image tokens; {ti["layers"]} joint-attention
layers, {ti["heads"]} heads of width {ti["head_dim"]} (hidden {hidden})) {origin}, together with a tiny
transformers `CLIPTextModelWithProjection` ({ti["text_encoder_parameters"]:,} parameters, {ti["text_layers"]} layers,
hidden {ti["text_hidden"]}, context length {ctx_len}) and a `CLIPTokenizer` over our own
{len(ti["vocabulary_words"])}-word vocabulary. Scheduler: `FlowMatchEulerDiscreteScheduler`, shift {sched["shift"]}.
Captions: {_CAPTION_TEXT[mode]}. {100 * ti["caption_dropout"]:.0f}% of the captions are replaced by the empty prompt ""
for classifier-free guidance.

SD3 takes two CLIP encoders and a T5. Here **both CLIP slots hold the same encoder** (`text_encoder` and
`text_encoder_2` are identical copies, as are the two tokenizers): its penultimate hidden states side by side give
the {joint}-wide joint-attention context and its pooled projection twice the {joint}-wide pooled vector. There is
**no T5**: its slot is {ti["t5_tokens"]} zero tokens, and `model_index.json` stores `max_sequence_length:
{ti["t5_tokens"]}` so that `ComposePipeline` uses that length.
{unfinished}
```python
import torch
from pipelines import ComposePipeline

pipe = ComposePipeline.from_pretrained("model_cards/{name}")  # family SD3; no VAE, no T5
out = pipe(prompt="a red shape", guidance_scale={ev["cfg"]}, num_inference_steps={ev["steps"]}, method="ode",
           solver="euler", batch_size=8, generator=torch.Generator().manual_seed(0), output_type="pt")
out.images  # (8, 3, {size}, {size}) in [0, 1]
```

`method="ode", solver="euler"` on the default grid (`schedule="scheduler"`: the checkpoint's own FlowMatchEuler
sigmas) is the sampling of diffusers' `StableDiffusion3Pipeline` on the same latents. Several prompts compose
(`operator="and"`, `"or"`, ...) as for every checkpoint of this project. With the raw diffusers / transformers
components:

```python
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

folder = "model_cards/{name}"
transformer = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer")
text_encoder = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder")  # = text_encoder_2
tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")


@torch.no_grad()
def conditioning(prompts):
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    out = text_encoder(ids, output_hidden_states=True)
    h, pooled = out.hidden_states[-2], out.text_embeds  # (n, {ctx_len}, {ti["text_hidden"]}), (n, {ti["text_hidden"]})
    t5 = torch.zeros(len(prompts), {ti["t5_tokens"]}, {joint})  # the empty T5 slot
    return {{"encoder_hidden_states": torch.cat([torch.cat([h, h], -1), t5], 1),  # both CLIP slots, then T5
            "pooled_projections": torch.cat([pooled, pooled], -1)}}


n, cfg = 4, {ev["cfg"]}
context = conditioning([""] * n + ["a red shape"] * n)
x = torch.randn(n, 3, {size}, {size}, generator=torch.Generator().manual_seed(0))
scheduler.set_timesteps({ev["steps"]})
with torch.no_grad():
    for t in scheduler.timesteps:  # 1000 t, from t = 1 (noise) towards 0 (data)
        v_u, v_c = transformer(hidden_states=torch.cat([x, x]), timestep=t.expand(2 * n), **context).sample.chunk(2)
        x = scheduler.step(v_u + cfg * (v_c - v_u), t, x).prev_sample  # the velocity eps - x0
images = (x.clamp(-1, 1) + 1) / 2  # in [0, 1]; equal to the ComposePipeline call above on the same noise
```

Vocabulary (each word is ONE token; other words split into known pieces or the unknown token `<|endoftext|>`,
as the CLIP tokenizer does, without error): {", ".join(ti["vocabulary_words"])}.

## Training data

{DATA_BLURB}

All four shapes and all four colours; a fresh batch is rendered at every step, seeded by (seed, step) (which also
draws the caption choice, the dropout, the noise and t), so the model saw {ti["images_seen"]:,} images.

## Training procedure

- Script: `examples/shapes/train_flow.py`; exact command{copied}:
  `{ti["command"]}`
- CPU only, torch {ti["torch"]}, {ti["threads"]} thread; transformer and text encoder trained jointly with AdamW
  (no weight decay), {lr_schedule(ti)}{warm_start(ti)}, gradient clipping (norm {grad_clip}), EMA of both
  (the saved weights are the EMA ones).
- Loss: rectified flow. x_t = (1 - t) x0 + t eps with eps ~ N(0, I), the network (at time 1000 t) predicts the
  velocity eps - x0, MSE; t logit-normal (t = sigmoid(u), u ~ N(0, 1)), as SD3.
- Measured training time: {_minutes(ti["train_seconds"])} of wall-clock for {ti["steps"]} steps, on a 2-core machine
  shared with other jobs (so the step rate varied); final loss (mean of last 100 steps): {ti["final_loss_avg100"]}.
- Resumable: `--resume` continues from the state file under `outputs/shapes/{name}/` (not shipped).
{loss_plot(folder, state)}
| hyper-parameter | value |
|---|---|
{hp_rows}

{_prompt_evaluation(ev, eval_cmd, sampling, _counterpart(folder))}
## Intended use and limits

A test fixture and teaching model for composing flow-matching (SD3-family) checkpoints at sampling time (e.g.
SuperDiff AND of "a red shape" and "a circle" on this one model) where the truth of every sample can be checked
with the shapes classifier, and for testing the SD3 code paths without downloading a real SD3. It is tiny and
briefly trained on a toy world: expect imperfect edges, occasional malformed shapes or wrong attributes, and nothing
at all outside that world. Prompts other than its training captions (including "a red circle", which it has never
seen) are out of distribution. It is not a real SD3 (no VAE, no T5, one small CLIP twice). Not for any real-image
use.

{_restore(name, eval_cmd, restore)}{notes}"""


def _out_of_distribution(mode: str) -> str:
    if mode == "joint":
        return "Prompts other than its training captions (one or both attributes) are out of distribution."
    return (
        'Prompts other than its training captions (including "a red circle", which it has never seen) are out of '
        "distribution."
    )


def cond_card(folder: Path, notes: str, state: Path | None = None) -> str:
    ti = json.loads((folder / "train_info.json").read_text())
    ev = json.loads((folder / "eval.json").read_text())
    name = folder.name
    mode = ti["captions"]
    hp = {
        k: ti[k]
        for k in (
            "captions", "caption_dropout", "size", "block_out_channels", "layers_per_block", "cross_attention_heads",
            "text_hidden", "text_layers", "text_heads", "max_length", "unet_parameters", "text_encoder_parameters",
            "batch", "lr", "warmup", "lr_schedule", "lr_final", "min_snr_gamma", "init", "ema_decay", "grad_clip",
            "seed", "threads", "steps", "images_seen",
        )
        if k in ti
    }  # fmt: skip
    hp_rows = "\n".join(f"| {k} | {v} |" for k, v in hp.items())
    eval_cmd = _prompt_eval_cmd(name, ev)
    sampler_text = "ancestral DDPM" if ev["sampler"] == "ddpm" else "DDIM (eta 0)"
    sampling = f"{sampler_text} with {ev['steps']} steps"
    unfinished = _unfinished(ti)
    return f"""---
license: apache-2.0
library_name: diffusers
pipeline_tag: text-to-image
tags:
- diffusers
- ddpm
- text-to-image
- pixel-space
- classifier-free-guidance
- synthetic-data
- procedural-shapes
- superdiff
---

# {name}

A small text-conditional pixel-space DDPM (no VAE) trained from scratch on {ti["size"]}x{ti["size"]} procedural
shapes images: a diffusers `UNet2DConditionModel` ({ti["unet_parameters"]:,} parameters, cross-attention at the
two lower resolutions and in the middle block) conditioned on a tiny transformers `CLIPTextModel`
({ti["text_encoder_parameters"]:,} parameters, {ti["text_layers"]} layers, hidden {ti["text_hidden"]}, context
length {ti["max_length"]}) with a `CLIPTokenizer` over our own {len(ti["vocabulary_words"])}-word vocabulary, trained
jointly. Captions: {_CAPTION_TEXT[mode]}. {100 * ti["caption_dropout"]:.0f}% of the captions are replaced by the
empty prompt "" for classifier-free guidance. Part of {_ROLE[mode]}.
{unfinished}
```python
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

folder = "model_cards/{name}"
unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")  # model_max_length {ti["max_length"]}
scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
ids = tokenizer(["a red shape"], padding="max_length", max_length=tokenizer.model_max_length,
                truncation=True, return_tensors="pt").input_ids
context = text_encoder(ids)[0]  # (1, {ti["max_length"]}, {ti["text_hidden"]}): encoder_hidden_states for the UNet
```

`model_index.json` names `ComposePipeline` with these four components (no VAE, no safety checker), so the
project's pipeline loads the folder with `ComposePipeline.from_pretrained("model_cards/{name}")`;
`examples/shapes/train_conditional.py:load_components` loads them directly.

Vocabulary (each word is ONE token; other words split into known pieces or the unknown token `<|endoftext|>`,
as the CLIP tokenizer does, without error): {", ".join(ti["vocabulary_words"])}.

## Training data

{DATA_BLURB}

Subset: shapes {ti["shapes"]}, colours {ti["colours"]}; a fresh batch is rendered at every step, seeded by
(seed, step) (which also draws the caption choice and the dropout), so the model saw {ti["images_seen"]:,} images.

## Training procedure

- Script: `examples/shapes/train_conditional.py`; exact command:
  `{ti["command"]}`
- CPU only, torch {ti["torch"]}, {ti["threads"]} thread; UNet and text encoder trained jointly with AdamW,
  {training_recipe(ti)}; gradient clipping, EMA of both (the saved weights are the EMA ones); noise schedule: DDPM,
  linear betas 1e-4..0.02 over 1000 steps, epsilon prediction.
- Measured training time: {_minutes(ti["train_seconds"])} of wall-clock for {ti["steps"]} steps, on a 2-core machine
  shared with other jobs; final loss (mean of last 100 steps): {ti["final_loss_avg100"]}.
- Resumable: `--resume` continues from the state file under `outputs/shapes/{name}/` (not shipped).
{loss_plot(folder, state)}
| hyper-parameter | value |
|---|---|
{hp_rows}

{_prompt_evaluation(ev, eval_cmd, sampling)}
## Intended use and limits

A test fixture and teaching model for composing diffusion models at sampling time (e.g. SuperDiff AND of two
prompts, on one model or across experts) where the truth of every sample can be checked with the shapes
classifier. It is tiny and knows only a toy world: expect occasional malformed shapes or wrong attributes, and
nothing at all outside that world. {_out_of_distribution(mode)} Not for any real-image use.

{_restore(name, eval_cmd)}{notes}"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder")
    p.add_argument("--notes", default="", help="extra markdown appended to the card (e.g. visual inspection)")
    p.add_argument("--state", default=None,
                   help="training-state file to plot the loss curve from (loss.png; default: "
                        "outputs/shapes/<folder name>/state.pt where it exists)")  # fmt: skip
    args = p.parse_args(argv)
    folder = Path(args.folder)
    notes = f"\n## Notes\n\n{args.notes}\n" if args.notes else ""
    state = Path(args.state) if args.state else Path("outputs/shapes") / folder.name / "state.pt"
    if (folder / "metrics.json").exists():
        text = classifier_card(folder, notes)
    elif "transformer_parameters" in (info := json.loads((folder / "train_info.json").read_text())):
        text = flow_card(folder, notes, state)
    elif "captions" in info:
        text = cond_card(folder, notes, state)
    else:
        text = uncond_card(folder, notes, state)
    (folder / "README.md").write_text(text)
    print(f"wrote {folder / 'README.md'}")


if __name__ == "__main__":
    main()
