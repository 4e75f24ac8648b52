"""Train the two-headed shapes/colour classifier on procedural data and save it with its measured accuracy.

    python examples/shapes/train_classifier.py --out model_cards/shapes-classifier

A fixed training set is rendered once (seeded) at 24x24 and 32x32 and augmented with flips and 90-degree
rotations (which change neither label) and light Gaussian pixel noise (so that slightly imperfect diffusion
samples are still judged sensibly). Accuracy is then measured on a fresh held-out set rendered from a different
seed. Writes ``model.safetensors``, ``config.json`` and ``metrics.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.shapes.classifier import ShapesClassifier, save_classifier  # noqa: E402
from examples.shapes.data import make_batch  # noqa: E402


def augment(x: torch.Tensor, g: torch.Generator, noise: float) -> torch.Tensor:
    k = int(torch.randint(4, (1,), generator=g))
    x = torch.rot90(x, k, dims=(2, 3))
    if torch.rand(1, generator=g).item() < 0.5:
        x = x.flip(3)
    if noise > 0:
        sigma = noise * torch.rand(x.shape[0], 1, 1, 1, generator=g)
        x = x + sigma * torch.randn(x.shape, generator=g)
    return x


@torch.no_grad()
def evaluate(model, n: int, seed: int, size: int) -> dict:
    x, s, c = make_batch(n, seed, size=size)
    ps, pc = model.predict(x)
    return {
        "size": size,
        "n": n,
        "seed": seed,
        "shape_acc": (ps.argmax(-1) == s).float().mean().item(),
        "colour_acc": (pc.argmax(-1) == c).float().mean().item(),
        "both_confident_frac": ((ps.max(-1).values > 0.9) & (pc.max(-1).values > 0.9)).float().mean().item(),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="model_cards/shapes-classifier")
    p.add_argument("--sizes", type=int, nargs="+", default=[24, 32])
    p.add_argument("--n-train", type=int, default=12000, help="training images per size")
    p.add_argument("--n-test", type=int, default=2000, help="held-out images per size")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--noise", type=float, default=0.1, help="max std of the Gaussian pixel-noise augmentation")
    p.add_argument("--seed", type=int, default=0, help="training-data seed; held-out data use seed + 10_000")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])

    t0 = time.time()
    data = {sz: make_batch(args.n_train, args.seed * 100 + sz, size=sz) for sz in args.sizes}
    t_data = time.time() - t0
    print(f"rendered {args.n_train} x {len(args.sizes)} training images in {t_data:.0f} s", flush=True)

    model = ShapesClassifier(width=args.width)
    steps_per_epoch = args.n_train // args.batch * len(args.sizes)
    total = steps_per_epoch * args.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.15)
    g = torch.Generator().manual_seed(args.seed)
    step = 0
    t1 = time.time()
    model.train()
    for epoch in range(args.epochs):
        batches = []
        for sz in args.sizes:
            perm = torch.randperm(args.n_train, generator=g)
            batches += [(sz, perm[i : i + args.batch]) for i in range(0, args.n_train - args.batch + 1, args.batch)]
        order = torch.randperm(len(batches), generator=g).tolist()
        for bi in order:
            sz, idx = batches[bi]
            x, s, c = data[sz]
            xb = augment(x[idx], g, args.noise)
            ls, lc = model(xb)
            loss = torch.nn.functional.cross_entropy(ls, s[idx]) + torch.nn.functional.cross_entropy(lc, c[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0:
                el = time.time() - t1
                print(
                    f"epoch {epoch} step {step}/{total} loss {loss.item():.4f} "
                    f"{step / el:.2f} it/s ETA {(total - step) / (step / el) / 60:.1f} min",
                    flush=True,
                )
    t_train = time.time() - t1
    model.eval()
    results = [evaluate(model, args.n_test, args.seed + 10_000 + sz, sz) for sz in args.sizes]
    for r in results:
        print(json.dumps(r), flush=True)
    metrics = {
        "command": command,
        "hyperparameters": {k: v for k, v in vars(args).items() if k != "out"},
        "render_seconds": round(t_data, 1),
        "train_seconds": round(t_train, 1),
        "steps": step,
        "parameters": sum(p.numel() for p in model.parameters()),
        "held_out": results,
        "torch": torch.__version__,
    }
    save_classifier(model, args.out, extra_config={"train_sizes": args.sizes})
    Path(args.out, "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"saved {args.out} (train {t_train / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
