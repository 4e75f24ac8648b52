"""Sample from a trained unconditional shapes DDPM folder and judge the samples with the shapes classifier.

    python examples/shapes/eval_unconditional.py model_cards/shapes-uncond-a --n 128 --steps 200 --sampler ddpm

Samples with DDIM (eta 0, ``--steps`` steps) or, with ``--sampler ddpm``, ancestral DDPM over ``--steps`` steps (much
better for these briefly trained models: DDIM's deterministic path gives blended colours), classifies each image,
and prints shape and colour histograms and the fraction of "valid" images (classifier max-probability > 0.9 on
both heads). ``--save`` writes ``samples.png`` (grid) and ``eval.json`` into the model folder (or ``--out-dir``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.shapes.classifier import DEFAULT_DIR, load_classifier  # noqa: E402
from examples.shapes.data import COLOURS, SHAPES, save_grid  # noqa: E402


@torch.no_grad()
def sample(folder, n: int, steps: int, seed: int, sampler: str = "ddim", batch: int = 64) -> torch.Tensor:
    from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler

    pipe = DDPMPipeline.from_pretrained(folder)
    unet = pipe.unet.eval()
    if sampler == "ddim":
        sched = DDIMScheduler.from_config(pipe.scheduler.config)
    else:
        sched = DDPMScheduler.from_config(pipe.scheduler.config)
    size = unet.config.sample_size
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, n, batch):
        m = min(batch, n - i)
        x = torch.randn(m, 3, size, size, generator=g)
        sched.set_timesteps(steps)  # fresh scheduler state per batch
        for t in sched.timesteps:
            eps = unet(x, t).sample
            kw = {"eta": 0.0} if sampler == "ddim" else {}
            x = sched.step(eps, t, x, generator=g, **kw).prev_sample
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


def judge(images: torch.Tensor, classifier, threshold: float = 0.9) -> dict:
    ps, pc = classifier.predict(images)
    s_conf, s_idx = ps.max(-1)
    c_conf, c_idx = pc.max(-1)
    valid = (s_conf > threshold) & (c_conf > threshold)
    return {
        "n": images.shape[0],
        "threshold": threshold,
        "shape_hist": {name: int((s_idx == k).sum()) for k, name in enumerate(SHAPES)},
        "colour_hist": {name: int((c_idx == k).sum()) for k, name in enumerate(COLOURS)},
        "valid_shape_hist": {name: int(((s_idx == k) & valid).sum()) for k, name in enumerate(SHAPES)},
        "valid_frac": valid.float().mean().item(),
        "shape_confident_frac": (s_conf > threshold).float().mean().item(),
        "colour_confident_frac": (c_conf > threshold).float().mean().item(),
        "_shape_idx": s_idx,
        "_valid": valid,
    }


def judge_geometric(images: torch.Tensor, trained_on: list[str] | None) -> dict:
    """The geometric judge's verdicts: "valid" = a shape and a colour it can name (issue 29's target: >= 0.9), the
    share of named shapes among the trained ones, and its shape histogram."""
    from examples.shapes.geometry import load_geometry_judge

    s, c = load_geometry_judge().predict(images)
    valid = (s >= 0) & (c >= 0)
    out = {
        "valid_frac": valid.float().mean().item(),
        "shape_none_frac": (s < 0).float().mean().item(),
        "shape_hist": {name: int((s == k).sum()) for k, name in enumerate(SHAPES)},
    }
    if trained_on:
        in_set = torch.tensor([k >= 0 and SHAPES[k] in trained_on for k in s.tolist()])
        out["valid_and_in_trained_shapes_frac"] = (in_set & valid).float().mean().item()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--classifier", default=str(DEFAULT_DIR))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save", action="store_true", help="write samples.png and eval.json")
    p.add_argument("--out-dir", default=None, help="where --save writes (default: the model folder)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    clf = load_classifier(args.classifier)
    t0 = time.time()
    x = sample(args.folder, args.n, args.steps, args.seed, args.sampler)
    t_sample = time.time() - t0
    res = judge(x, clf)
    info_path = Path(args.folder) / "train_info.json"
    trained_on = json.loads(info_path.read_text())["shapes"] if info_path.exists() else None
    if trained_on:
        in_set = torch.tensor([SHAPES[k] in trained_on for k in res["_shape_idx"].tolist()])
        res["trained_shapes"] = trained_on
        res["in_trained_shapes_frac"] = in_set.float().mean().item()
        res["valid_and_in_trained_shapes_frac"] = (in_set & res["_valid"]).float().mean().item()
    res["geometric"] = judge_geometric(x, trained_on)
    res.update({"sampler": args.sampler, "steps": args.steps, "seed": args.seed, "sample_seconds": round(t_sample, 1)})
    public = {k: v for k, v in res.items() if not k.startswith("_")}
    print(json.dumps(public, indent=2))
    if args.save:
        out_dir = Path(args.out_dir or args.folder)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_grid(x, out_dir / "samples.png", nrow=8, scale=4)
        (out_dir / "eval.json").write_text(json.dumps(public, indent=2) + "\n")
        print(f"wrote {out_dir / 'samples.png'} and {out_dir / 'eval.json'}")


if __name__ == "__main__":
    main()
