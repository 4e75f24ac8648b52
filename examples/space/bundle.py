"""Assemble a Hugging Face Space folder: app, README (front matter), requirements, the packages, shipped models, the
LoRAs of the bundled models and the learned schedules of the bundled models (so `model_cards/schedules-.../*.json`
paths work in the Space).

    python examples/space/bundle.py DIR [--models shapes-text shapes-uncond-a ...]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FILES = ("app.py", "README.md", "requirements.txt")
PACKAGES = ("compose", "pipelines")
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "samples.png")


def bundle(dest: str | Path, models: list[str] | None = None) -> Path:
    """Copy the Space into `dest` (created; must be empty or absent); `models` defaults to every shipped model."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise ValueError(f"dest {str(dest)!r} is not empty; give a new or empty folder.")
    cards = ROOT / "model_cards"
    shipped = sorted(p.name for p in cards.iterdir() if (p / "model_index.json").is_file())
    models = shipped if models is None else list(models)
    unknown = [m for m in models if m not in shipped]
    if unknown:
        raise ValueError(f"models {unknown} are not shipped; choose from {shipped}.")
    dest.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        shutil.copy2(HERE / f, dest / f)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=SKIP)
    for m in models:
        shutil.copytree(cards / m, dest / "model_cards" / m, ignore=SKIP)
    for folder in sorted(cards.iterdir()):  # shipped LoRAs whose base model is bundled (the Space's LoRA list)
        if (folder / "pytorch_lora_weights.safetensors").is_file() and _lora_base(folder) in models:
            shutil.copytree(folder, dest / "model_cards" / folder.name, ignore=SKIP)
    for folder in sorted(cards.glob("schedules-*")):  # learned schedules: files whose models are all bundled
        files = [f for f in sorted(folder.glob("*.json")) if set(_schedule_models(f)) <= set(models)]
        if files:
            (dest / "model_cards" / folder.name).mkdir(parents=True, exist_ok=True)
            for f in [*files, folder / "README.md"]:
                if f.is_file():
                    shutil.copy2(f, dest / "model_cards" / folder.name / f.name)
    return dest


def _lora_base(folder: Path) -> str | None:
    """The shipped model a LoRA was trained on (the folder name of train_info.json's `base`)."""
    import json

    try:
        return Path(json.loads((folder / "train_info.json").read_text())["base"]).name
    except (OSError, KeyError, ValueError, TypeError):
        return None


def _schedule_models(path: Path) -> list[str]:
    """The checkpoint names a schedule file was learned for (its `model` key, comma-separated)."""
    import json

    return str(json.loads(path.read_text()).get("model", "")).split(",")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dest")
    p.add_argument("--models", nargs="*", default=None, help="shipped models to include (default: all)")
    args = p.parse_args()
    out = bundle(args.dest, args.models)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    print(f"wrote {out} ({size:.1f} MiB); push it to a gradio Space")


if __name__ == "__main__":
    main()
