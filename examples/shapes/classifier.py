"""A small two-headed CNN that recognises the shape and the colour of procedural shapes images.

Input: float images in [-1, 1], shape (n, 3, H, W), any H, W >= 16 (global average pooling; trained on 24x24
and 32x32). Output: logits for :data:`~examples.shapes.data.SHAPES` and for
:data:`~examples.shapes.data.COLOURS`. Saved as ``model.safetensors`` + ``config.json`` in a folder (by default
``model_cards/shapes-classifier``) and loaded with :func:`load_classifier`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from examples.shapes.data import COLOURS, SHAPES

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "model_cards" / "shapes-classifier"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
RESTORE_COMMAND = "python examples/shapes/train_classifier.py --out {folder}"


class ClassifierLoadError(FileNotFoundError):
    """The classifier folder, its weights or its config is missing or unreadable."""


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ShapesClassifier(nn.Module):
    def __init__(self, width: int = 16, n_shapes: int = len(SHAPES), n_colours: int = len(COLOURS)):
        super().__init__()
        self.config = {"width": width, "n_shapes": n_shapes, "n_colours": n_colours}
        self.features = nn.Sequential(
            _block(3, width),
            nn.MaxPool2d(2),
            _block(width, 2 * width),
            nn.MaxPool2d(2),
            _block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.shape_head = nn.Linear(4 * width, n_shapes)
        self.colour_head = nn.Linear(4 * width, n_colours)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.shape_head(h), self.colour_head(h)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities ``(shape_probs (n, 4), colour_probs (n, 4))`` in eval mode."""
        was_training = self.training
        self.eval()
        ps, pc = [], []
        for i in range(0, x.shape[0], batch):
            a, b = self(x[i : i + batch].float())
            ps.append(a.softmax(-1))
            pc.append(b.softmax(-1))
        self.train(was_training)
        return torch.cat(ps), torch.cat(pc)


def save_classifier(model: ShapesClassifier, folder, extra_config: dict | None = None) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    cfg = {"architecture": "ShapesClassifier", **model.config, "shapes": list(SHAPES), "colours": list(COLOURS)}
    cfg.update(extra_config or {})
    (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")


def load_classifier(path=DEFAULT_DIR, map_location: str = "cpu") -> ShapesClassifier:
    """Load the classifier saved in ``path`` (a folder with ``model.safetensors`` and ``config.json``).

    Raises :class:`ClassifierLoadError` naming the folder and the command that re-creates it when the folder or
    a file is missing or corrupt. The model is returned in eval mode."""
    from safetensors.torch import load_file

    folder = Path(path)
    restore = RESTORE_COMMAND.format(folder=folder)
    hint = f"Restore it by re-training (a few minutes on CPU): `{restore}`"
    if not folder.is_dir():
        raise ClassifierLoadError(f"shapes classifier folder {str(folder)!r} does not exist. {hint}")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise ClassifierLoadError(f"shapes classifier folder {str(folder)!r} has no {name}. {hint}")
    try:
        cfg = json.loads((folder / CONFIG_NAME).read_text())
        model = ShapesClassifier(width=cfg["width"], n_shapes=cfg["n_shapes"], n_colours=cfg["n_colours"])
        state = load_file(str(folder / WEIGHTS_NAME), device=map_location)
        model.load_state_dict(state)
    except Exception as e:  # corrupt JSON, truncated safetensors, mismatched keys or shapes, git-lfs pointer ...
        raise ClassifierLoadError(
            f"shapes classifier in {str(folder)!r} is corrupt or incompatible ({type(e).__name__}: {e}). {hint}"
        ) from e
    if list(cfg.get("shapes", SHAPES)) != list(SHAPES) or list(cfg.get("colours", COLOURS)) != list(COLOURS):
        raise ClassifierLoadError(f"shapes classifier in {str(folder)!r} was trained on other label lists. {hint}")
    return model.eval()
