"""The shipped flow model's card and evaluation script: `write_model_card.py` writes a flow card from the folder's
train_info.json / eval.json (copied into tmp_path), and `eval_conditional.py` refuses a sampler that does not fit
the folder (ddpm / ddim on a flow transformer, euler on a UNet) before loading anything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from examples.shapes import eval_conditional, write_model_card

FLOW = Path(__file__).resolve().parents[1] / "model_cards" / "shapes-text-flow"


def fake_eval() -> dict:
    """An eval.json of the shape eval_conditional.py writes (used when the shipped folder has none yet)."""
    prompts = [{"prompt": p, "n": 2, "named_shape": s, "named_colour": c, "accuracy": 0.5, "valid_frac": 1.0,
                "valid_and_correct_frac": 0.5, "shape_hist": {"circle": 1, "square": 1, "triangle": 0, "star": 0},
                "colour_hist": {"red": 2, "green": 0, "blue": 0, "yellow": 0}}
               for p, s, c in (("a red shape", None, "red"), ("a circle", "circle", None))]  # fmt: skip
    return {"prompts": prompts, "mean_accuracy": 0.5, "mean_valid_frac": 1.0, "mean_valid_and_correct_frac": 0.5,
            "n_per_prompt": 2, "sampler": "euler", "steps": 3, "cfg": 4.0, "seed": 1234, "threshold": 0.9,
            "sample_seconds": 1.0, "seconds_per_image": 0.25}  # fmt: skip


@pytest.mark.skipif(not (FLOW / "train_info.json").is_file(), reason="model_cards/shapes-text-flow missing")
@pytest.mark.parametrize("finished", [True, False])
def test_flow_card_is_written_from_the_measured_files(tmp_path, finished):
    folder = tmp_path / "shapes-text-flow"
    for sub in ("scheduler", "tokenizer"):
        shutil.copytree(FLOW / sub, folder / sub)
    info = {**json.loads((FLOW / "train_info.json").read_text()), "finished": finished}
    (folder / "train_info.json").write_text(json.dumps(info))
    if (FLOW / "eval.json").is_file():
        shutil.copy(FLOW / "eval.json", folder / "eval.json")
    else:
        (folder / "eval.json").write_text(json.dumps(fake_eval()))
    ev = json.loads((folder / "eval.json").read_text())
    write_model_card.main([str(folder), "--notes", "looked at the samples", "--state", str(tmp_path / "none.pt")])
    card = (folder / "README.md").read_text()
    for tag in ("- sd3", "- flow-matching", "- rectified-flow"):
        assert tag in card
    assert "SD3Transformer2DModel" in card and f"{info['transformer_parameters']:,} parameters" in card
    assert "CLIPTextModelWithProjection" in card and f"max_sequence_length:\n{info['t5_tokens']}`" in card
    assert info["command"] in card and f"for {info['steps']} steps" in card
    assert "| grad_clip | " in card and f"| steps | {info['steps']} |" in card
    flat = " ".join(card.split())  # the prose is wrapped by hand in the writer: compare it unwrapped
    assert f"accuracy **{100 * ev['mean_accuracy']:.1f}%**" in flat
    assert f"classifier-free guidance scale {ev['cfg']}" in flat
    assert f"seed {ev['seed']} (+ the prompt's index)" in flat
    for r in ev["prompts"]:
        assert f"| {r['prompt']} | {100 * r['accuracy']:.1f}% |" in card
    assert ("Training did not finish" in card) is not finished
    assert card.rstrip().endswith("looked at the samples")


@pytest.mark.skipif(not (FLOW / "train_info.json").is_file(), reason="model_cards/shapes-text-flow missing")
def test_a_fine_tuned_flow_card_says_where_the_earlier_weights_are(tmp_path):
    """A run warm-started from the folder's own weights (`--init model_cards/shapes-text-flow`) with a cosine schedule:
    the card names the commit of the earlier weights, how to restore them and the schedule; from scratch it says so."""
    folder = tmp_path / "shapes-text-flow"
    for sub in ("scheduler", "tokenizer"):
        shutil.copytree(FLOW / sub, folder / sub)
    (folder / "eval.json").write_text(json.dumps(fake_eval()))
    base = json.loads((FLOW / "train_info.json").read_text())
    info = {**base, "init": "model_cards/shapes-text-flow", "init_commit": "abc1234", "lr_schedule": "cosine",
            "lr_final": 0.05, "warmup": 100, "grad_clip": 1.0,
            "command": "python examples/shapes/train_flow.py --out o --init x"}  # fmt: skip
    (folder / "train_info.json").write_text(json.dumps(info))
    write_model_card.main([str(folder), "--state", str(tmp_path / "none.pt")])
    flat = " ".join((folder / "README.md").read_text().split())
    checkout = "`git checkout abc1234 -- model_cards/shapes-text-flow`"
    assert f"then fine-tuned from those weights (commit abc1234; {checkout} restores them)" in flat
    assert "cosine decay to 0.05 x lr at the last step; warm start from `model_cards/shapes-text-flow`" in flat
    assert "train_flow.py --out o --init x; for d in transformer text_encoder text_encoder_2; do cp" in flat
    assert "| init | model_cards/shapes-text-flow |" in flat
    scratch = {k: v for k, v in base.items() if k not in ("init", "init_commit")}
    (folder / "train_info.json").write_text(json.dumps(scratch))
    write_model_card.main([str(folder), "--state", str(tmp_path / "none.pt")])
    flat = " ".join((folder / "README.md").read_text().split())
    assert "trained from scratch, together with" in flat and "git checkout" not in flat


def test_eval_refuses_samplers_that_do_not_fit_the_folder(tmp_path, capsys):
    flow, unet = tmp_path / "flow", tmp_path / "unet"
    (flow / "transformer").mkdir(parents=True)
    (unet / "unet").mkdir(parents=True)
    for folder, sampler, fix in ((flow, "ddpm", "use --sampler euler"), (flow, "ddim", "use --sampler euler"),
                                 (unet, "euler", "use --sampler ddpm or ddim")):  # fmt: skip
        with pytest.raises(SystemExit):
            eval_conditional.main([str(folder), "--sampler", sampler])
        err = capsys.readouterr().err
        assert f"--sampler {sampler} does not apply here" in err and fix in err
    assert eval_conditional.pick_sampler("flow", None) == "euler"
    assert eval_conditional.pick_sampler("unet", None) == "ddpm"
    with pytest.raises(ValueError, match="flow-matching folder"):
        eval_conditional.pick_sampler("flow", "ddpm")


@pytest.mark.skipif(not (FLOW / "README.md").is_file(), reason="model_cards/shapes-text-flow has no card yet")
def test_card_raw_diffusers_loop_equals_compose_pipeline(monkeypatch):
    """The card's two code blocks (ComposePipeline, and the raw diffusers / transformers loop) give the same images
    on the same noise: run both as printed, with 8 steps instead of 50 to keep it short."""
    import re

    import torch

    monkeypatch.chdir(FLOW.parents[1])
    blocks = re.findall(r"```python\n(.*?)```", (FLOW / "README.md").read_text(), re.S)
    assert len(blocks) == 2
    ours, raw = ({} for _ in blocks)
    short = blocks[0].replace("inference_steps=50", "inference_steps=8").replace("batch_size=8", "batch_size=4")
    exec(short, ours)
    exec(raw_code := blocks[1].replace("set_timesteps(50)", "set_timesteps(8)"), raw)
    assert "set_timesteps(8)" in raw_code
    assert raw["images"].shape == ours["out"].images.shape == (4, 3, 24, 24)
    torch.testing.assert_close(ours["out"].images, raw["images"], atol=2e-4, rtol=0)
