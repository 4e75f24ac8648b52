"""Tests for the procedural shapes toy world (examples/shapes): data, labels, classifier, shipped models.

Fast and offline: everything is rendered on the fly; shipped model folders are used only where present.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.shapes import data  # noqa: E402
from examples.shapes.classifier import ClassifierLoadError, load_classifier  # noqa: E402

CLASSIFIER_DIR = ROOT / "model_cards" / "shapes-classifier"
UNCOND_DIRS = [ROOT / "model_cards" / "shapes-uncond-a", ROOT / "model_cards" / "shapes-uncond-b"]


def _coverage(images: torch.Tensor, colour_idx: torch.Tensor) -> torch.Tensor:
    """Per-pixel coverage recovered from the image: (x - background) / (colour - background), brightest channel."""
    x = (images + 1) / 2
    rgb = torch.tensor([data.COLOUR_RGB[c] for c in data.COLOURS])[colour_idx]  # (n, 3)
    bg = torch.tensor(data.BACKGROUND_RGB)
    ch = (rgb - bg).abs().argmax(-1)
    num = x[torch.arange(len(x)), ch] - bg[ch][:, None, None]
    return num / (rgb[torch.arange(len(x)), ch] - bg[ch])[:, None, None]


@pytest.fixture(scope="module")
def batch32():
    return data.make_batch(96, 2024, size=32, return_params=True)


def test_constants():
    assert data.SHAPES == ("circle", "square", "triangle", "star")
    assert data.COLOURS == ("red", "green", "blue", "yellow")
    assert set(data.COLOUR_RGB) == set(data.COLOURS)


def test_determinism():
    a = data.make_batch(24, 7)
    b = data.make_batch(24, 7)
    c = data.make_batch(24, torch.Generator().manual_seed(7))
    d = data.make_batch(24, 8)
    for u, v, w in zip(a, b, c, strict=True):
        assert torch.equal(u, v) and torch.equal(u, w)
    assert not torch.equal(a[0], d[0])
    g = torch.Generator().manual_seed(7)
    first, second = data.make_batch(24, g)[0], data.make_batch(24, g)[0]
    assert torch.equal(first, a[0]) and not torch.equal(first, second)


@pytest.mark.parametrize("size", [24, 32])
def test_range_and_shapes(size):
    x, s, c = data.make_batch(40, 1, size=size)
    assert x.shape == (40, 3, size, size) and x.dtype == torch.float32
    assert s.shape == c.shape == (40,) and s.dtype == c.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1
    assert 0 <= s.min() and s.max() < 4 and 0 <= c.min() and c.max() < 4
    # plain black background: the corner pixels are exactly background
    assert torch.all(x[:, :, 0, 0] == -1) and torch.all(x[:, :, -1, -1] == -1)


def test_subsets_and_all_labels_occur():
    _, s, c = data.make_batch(200, 3, shapes=["circle", "square"], colours=["blue"])
    assert set(s.tolist()) == {0, 1} and set(c.tolist()) == {2}
    _, s, c = data.make_batch(200, 3)
    assert set(s.tolist()) == {0, 1, 2, 3} and set(c.tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError):
        data.make_batch(2, 0, shapes=["hexagon"])


def test_colour_label_matches_pixels(batch32):
    x, s, c, _ = batch32
    palette = torch.tensor([data.COLOUR_RGB[k] for k in data.COLOURS]) * 2 - 1  # (4, 3)
    for img, ci in zip(x, c, strict=True):
        pix = img.reshape(3, -1).T
        fg = pix[(pix != -1).any(-1)]
        assert len(fg) > 10
        full = fg[torch.isclose(fg, palette[ci], atol=1e-6).all(-1)]
        assert len(full) > 5, "fully covered pixels carry exactly the labelled colour"
        # every non-background pixel is a blend of background and the labelled colour only
        t = (fg + 1) / (palette[ci] + 1)
        assert torch.allclose(t, t[:, :1].expand_as(t), atol=1e-5)
        # and the mean foreground colour is nearest to the labelled colour
        mean_dir = (fg + 1).mean(0)
        cos = torch.nn.functional.cosine_similarity(mean_dir[None], palette + 1)
        assert cos.argmax().item() == ci.item()


def test_area_matches_size(batch32):
    x, s, c, p = batch32
    cov = _coverage(x, c)
    assert cov.min() > -1e-5 and cov.max() < 1 + 1e-5
    for k in range(len(x)):
        expected = data.shape_area(data.SHAPES[s[k]], p["s"][k].item())
        area = cov[k].sum().item()
        assert abs(area - expected) / expected < 0.04, (data.SHAPES[s[k]], area, expected)


def test_fill_ratio_separates_circles_from_other_shapes(batch32):
    """area / (pi * r_max^2), r_max measured from the centroid: 1 for a disc, 2/pi for a square, less for the rest."""
    x, s, c, _ = batch32
    cov = _coverage(x, c)
    size = x.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    for k in range(len(x)):
        w = cov[k]
        area = w.sum()
        cy, cx = (w * yy).sum() / area, (w * xx).sum() / area
        r = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
        r_max = r[w > 0.5].max() + 0.5
        fill = (area / (math.pi * r_max**2)).item()
        if data.SHAPES[s[k]] == "circle":
            assert fill > 0.8, fill
        else:
            assert fill < 0.75, (data.SHAPES[s[k]], fill)


def test_captions():
    assert data.caption(colour="red") == "a red shape"
    assert data.caption(shape="circle") == "a circle"
    assert data.caption("circle", "red") == "a red circle"
    assert data.caption(3, 1) == "a green star"
    assert data.captions_for(torch.tensor([0, 2]), torch.tensor([3, 0])) == ["a yellow circle", "a red triangle"]
    assert data.captions_for(torch.tensor([0]), torch.tensor([3]), which="colour") == ["a yellow shape"]
    with pytest.raises(ValueError):
        data.caption(shape="hexagon")


def test_loader_error_names_folder_and_restore_command(tmp_path):
    missing = tmp_path / "no-such-classifier"
    with pytest.raises(ClassifierLoadError) as e:
        load_classifier(missing)
    msg = str(e.value)
    assert str(missing) in msg and "python examples/shapes/train_classifier.py --out" in msg
    assert isinstance(e.value, FileNotFoundError)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"width": 16, "n_shapes": 4, "n_colours": 4}))
    with pytest.raises(ClassifierLoadError, match="model.safetensors"):
        load_classifier(broken)
    (broken / "model.safetensors").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ClassifierLoadError) as e:
        load_classifier(broken)
    assert "corrupt" in str(e.value) and str(broken) in str(e.value) and "train_classifier.py" in str(e.value)


@pytest.mark.skipif(not (CLASSIFIER_DIR / "model.safetensors").exists(), reason="classifier not trained/shipped")
@pytest.mark.parametrize("size", [24, 32])
def test_shipped_classifier_accuracy(size):
    torch.manual_seed(0)
    model = load_classifier(CLASSIFIER_DIR)
    x, s, c = data.make_batch(400, 987_654 + size, size=size)
    ps, pc = model.predict(x)
    assert (ps.argmax(-1) == s).float().mean().item() >= 0.99
    assert (pc.argmax(-1) == c).float().mean().item() >= 0.99


@pytest.mark.parametrize("folder", UNCOND_DIRS, ids=lambda p: p.name)
def test_shipped_unconditional_models_load(folder):
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    if not weights.exists():
        pytest.skip(f"{folder.name} not trained/shipped")
    from diffusers import DDPMPipeline

    assert weights.stat().st_size <= 10 * 2**20
    pipe = DDPMPipeline.from_pretrained(folder)
    cfg = pipe.scheduler.config
    assert cfg.num_train_timesteps == 1000 and cfg.beta_schedule == "linear" and cfg.prediction_type == "epsilon"
    size = pipe.unet.config.sample_size
    with torch.no_grad():
        out = pipe.unet(torch.zeros(1, 3, size, size), 500).sample
    assert out.shape == (1, 3, size, size) and torch.isfinite(out).all()
    assert (folder / "README.md").exists()


# ---------------------------------------------------------------------------------------- text-conditional models

torch.set_num_threads(1)

COND_NAMES = ("shapes-text", "shapes-text-joint", "shapes-text-colour", "shapes-text-shape")
COND_DIRS = [ROOT / "model_cards" / n for n in COND_NAMES]


def _front_matter(readme: Path) -> str:
    text = readme.read_text()
    assert text.startswith("---\n"), f"{readme} has no YAML front matter"
    return text.split("---\n", 2)[1]


def test_conditional_tokenizer_roundtrip(tmp_path):
    from examples.shapes import train_conditional as tc

    tok = tc.build_tokenizer(tmp_path)
    assert tok.model_max_length == tc.MAX_LENGTH
    vocab = tok.get_vocab()
    bos, eos = vocab[tc.BOS], vocab[tc.EOS]
    seen = set()
    for w in tc.WORDS:
        ids = tok(w).input_ids
        assert len(ids) == 3 and ids[0] == bos and ids[2] == eos, (w, ids)
        assert ids[1] not in (bos, eos) and tok.convert_ids_to_tokens(ids[1]) == w + "</w>"
        seen.add(ids[1])
    assert len(seen) == len(tc.WORDS)
    assert tok("A RED Circle").input_ids == tok("a red circle").input_ids
    # unknown words, punctuation, over-long prompts: no crash, fixed length, ids inside the vocabulary
    ids = tc.tokenize(tok, ["a purple dodecahedron!!", "", "a red circle " * 20])
    assert ids.shape == (3, tc.MAX_LENGTH) and ids.max() < len(vocab) and ids.min() >= 0
    assert ids[1, 0] == bos and torch.all(ids[1, 1:] == eos)
    # the text encoder's context length matches the tokenizer's
    assert tc.build_text_encoder(tok, hidden=16, layers=1, heads=2).config.max_position_embeddings == tc.MAX_LENGTH


def test_conditional_training_captions():
    from examples.shapes import train_conditional as tc

    s = torch.arange(400) % 4
    c = (torch.arange(400) // 4) % 4
    g = torch.Generator().manual_seed(0)
    caps = tc.training_captions(s, c, "attribute", 0.1, g)
    named = [data.SHAPES[i] in cap for i, cap in zip(s.tolist(), caps, strict=True)]
    coloured = [data.COLOURS[i] in cap for i, cap in zip(c.tolist(), caps, strict=True)]
    assert not any(a and b for a, b in zip(named, coloured, strict=True)), "never both attributes in one caption"
    assert 0.3 < sum(named) / 400 < 0.6 and 0.3 < sum(coloured) / 400 < 0.6
    assert 0.04 < caps.count("") / 400 < 0.18
    colour_caps = tc.training_captions(s, c, "colour", 0.1, g)
    shape_caps = tc.training_captions(s, c, "shape", 0.1, g)
    assert all(cap in ("", data.caption(colour=k)) for k, cap in zip(c.tolist(), colour_caps, strict=True))
    assert all(cap in ("", data.caption(shape=k)) for k, cap in zip(s.tolist(), shape_caps, strict=True))


def test_joint_training_captions():
    """The ceiling model's captions: about half name both attributes, the rest one of them, never a wrong one."""
    from examples.shapes import train_conditional as tc

    s = torch.arange(800) % 4
    c = (torch.arange(800) // 4) % 4
    caps = tc.training_captions(s, c, "joint", 0.1, torch.Generator().manual_seed(0))
    both = [cap == data.caption(k, j) for k, j, cap in zip(s.tolist(), c.tolist(), caps, strict=True)]
    single = [cap in (data.caption(shape=k), data.caption(colour=j)) for k, j, cap in
              zip(s.tolist(), c.tolist(), caps, strict=True)]  # fmt: skip
    empty = [cap == "" for cap in caps]
    assert all(a + b + e == 1 for a, b, e in zip(both, single, empty, strict=True))
    assert 0.38 < sum(both) / 800 < 0.52 and 0.38 < sum(single) / 800 < 0.52 and 0.06 < sum(empty) / 800 < 0.14


def test_learning_rate_schedules_and_min_snr_weights():
    from types import SimpleNamespace

    from examples.shapes.training import learning_rate, snr_weights, weighted_mse

    args = SimpleNamespace(lr=1e-3, warmup=10, steps=110, lr_schedule="cosine", lr_final=0.1)
    lrs = [learning_rate(args, k) for k in range(111)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(0.55e-3) and lrs[110] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    args.lr_schedule = "constant"
    assert learning_rate(args, 100) == 1e-3
    alpha_bar = torch.tensor([0.999, 0.5, 0.01])
    w = snr_weights(alpha_bar, 5.0)
    snr = alpha_bar / (1 - alpha_bar)
    torch.testing.assert_close(w, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert w[0] < 0.01 and w[1] == 1 and w[2] == 1 and snr_weights(alpha_bar, 0) is None
    pred, target = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(weighted_mse(pred, target, torch.ones(3)), torch.nn.functional.mse_loss(pred, target))
    per = (pred - target).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(weighted_mse(pred, target, w), (per * w).mean())


def test_conditional_training_smoke_and_resume(tmp_path):
    from examples.shapes import train_conditional as tc

    out, state = tmp_path / "model", tmp_path / "state" / "state.pt"
    small = ["--channels", "16", "16", "--heads", "2", "--text-hidden", "16", "--text-layers", "1", "--text-heads"]
    small += ["2", "--batch", "4", "--size", "16", "--out", str(out), "--state", str(state), "--log-every", "1"]
    tc.main(["--captions", "attribute", "--steps", "2", *small])
    info = json.loads((out / "train_info.json").read_text())
    assert info["steps"] == 2 and info["finished"] and info["captions"] == "attribute"
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["compose_pipeline", "ComposePipeline"] and "_diffusers_version" in index
    assert (out / "compose_pipeline.py").is_file()
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert "vae" not in index and "safety_checker" not in index
    comps = tc.load_components(out)
    assert comps["tokenizer"].model_max_length == tc.MAX_LENGTH
    with torch.no_grad():
        ctx = tc.encode(comps["text_encoder"], tc.tokenize(comps["tokenizer"], ["a red shape", "a zebra"]))
        eps = comps["unet"](torch.zeros(2, 3, 16, 16), 10, encoder_hidden_states=ctx).sample
    assert ctx.shape == (2, tc.MAX_LENGTH, 16) and eps.shape == (2, 3, 16, 16) and torch.isfinite(eps).all()
    tc.main(["--captions", "attribute", "--steps", "3", "--resume", *small])
    assert json.loads((out / "train_info.json").read_text())["steps"] == 3


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        out.update({f"{f.parent.name}/{k}": v for k, v in load_file(f).items()})
    return out


TRAINERS = {
    "unconditional-eps": ("train_unconditional", ["--channels", "16", "16"]),
    "unconditional-flow": ("train_unconditional", ["--channels", "16", "16", "--objective", "flow"]),
    "flow-transformer": ("train_flow", ["--layers", "1", "--heads", "2", "--head-dim", "8", "--text-hidden", "16",
                                        "--text-layers", "1"]),
}  # fmt: skip


def test_flow_trainer_time_sampling():
    """The default draws are the shipped model's (sigmoid of a standard normal, the same generator calls); uniform
    and shifted logit-normal times have the distribution they name; bad parameters are refused."""
    from examples.shapes import train_flow as F

    def draw(*more):
        args = F.parse_args(["--out", "o", "--batch", "20000", *more])
        return F.sample_t(args, torch.Generator().manual_seed(0)), F.t_description(args)

    t, what = draw()
    assert torch.equal(t, torch.sigmoid(torch.randn(20000, generator=torch.Generator().manual_seed(0))))
    assert what == "logit-normal"
    t, what = draw("--t-sampling", "uniform")
    assert what == "uniform" and 0 < float(t.min()) and float(t.max()) < 1
    assert abs(float((t < 0.1).float().mean()) - 0.1) < 0.01  # uniform: a tenth of the times below 0.1
    t, what = draw("--t-mean", "-1", "--t-std", "0.5")
    assert abs(float(t.median()) - 1 / (1 + math.e)) < 0.01 and "location -1, scale 0.5" in what
    for bad in (["--t-std", "0"], ["--t-mean", "nan"]):
        with pytest.raises(SystemExit):
            F.parse_args(["--out", "o", *bad])


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_trainer_resume_matches_an_uninterrupted_run(tmp_path, name):
    """The shared loop (examples/shapes/training.py): 2 steps, then --resume to 3, saves what 3 steps in one go save
    (batches are seeded by step; optimiser, EMA and loss history travel in the state), and the loss goes down the
    same path."""
    import importlib

    module, extra = TRAINERS[name]
    trainer = importlib.import_module(f"examples.shapes.{module}")
    common = ["--batch", "4", "--size", "16", "--warmup", "2", "--log-every", "1", *extra]

    def run(tag, steps, *more):
        out = tmp_path / tag
        state = str(tmp_path / f"{tag}.pt")
        trainer.main(["--out", str(out), "--state", state, "--steps", str(steps), *common, *more])
        return out

    whole = run("whole", 3)
    run("parts", 2)
    parts = run("parts", 3, "--resume")
    a, b = _weights(whole), _weights(parts)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    ia, ib = (json.loads((f / "train_info.json").read_text()) for f in (whole, parts))
    assert ia["steps"] == ib["steps"] == 3 and ia["finished"] and ib["finished"]
    assert ia["final_loss_avg100"] == pytest.approx(ib["final_loss_avg100"], rel=1e-6)
    sa, sb = (torch.load(tmp_path / f"{t}.pt", weights_only=False) for t in ("whole", "parts"))
    assert len(sa["loss_hist"]) == 3 and sa["loss_hist"] == pytest.approx(sb["loss_hist"], rel=1e-6)


@pytest.mark.parametrize("folder", COND_DIRS, ids=lambda p: p.name)
def test_shipped_conditional_models_load(folder):
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    if not weights.exists():
        pytest.skip(f"{folder.name} not trained/shipped")
    from examples.shapes import train_conditional as tc

    assert weights.stat().st_size <= 10 * 2**20
    assert (folder / "text_encoder" / "model.safetensors").stat().st_size <= 10 * 2**20
    comps = tc.load_components(folder)
    cfg = comps["scheduler"].config
    assert cfg.num_train_timesteps == 1000 and cfg.beta_schedule == "linear" and cfg.prediction_type == "epsilon"
    size = comps["unet"].config.sample_size
    with torch.no_grad():
        ctx = tc.encode(comps["text_encoder"], tc.tokenize(comps["tokenizer"], ["a red shape", "a circle", ""]))
        out = comps["unet"](torch.zeros(3, 3, size, size), 500, encoder_hidden_states=ctx).sample
    assert out.shape == (3, 3, size, size) and torch.isfinite(out).all()
    # the hub's custom-pipeline layout: DiffusionPipeline.from_pretrained(folder, trust_remote_code=True) loads it
    from pipelines.loading import CLASS_NAME, PIPELINE_MODULE

    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == CLASS_NAME
    assert (folder / f"{PIPELINE_MODULE}.py").is_file()


@pytest.mark.parametrize("folder", UNCOND_DIRS + COND_DIRS, ids=lambda p: p.name)
def test_shipped_model_cards_have_metadata(folder):
    if not (folder / "README.md").exists():
        pytest.skip(f"{folder.name} has no card (not trained/shipped)")
    meta = _front_matter(folder / "README.md")
    for key in ("license: apache-2.0", "library_name: diffusers", "tags:"):
        assert key in meta, (folder.name, key)
    text = (folder / "README.md").read_text()
    assert "## Restore" in text and "train_info.json" not in meta
