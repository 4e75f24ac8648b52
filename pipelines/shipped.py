"""Model names: the shipped models and the ONE resolver of a model name, shared by `ComposePipeline.from_pretrained`,
the batch jobs (`pipelines.jobs`) and the Space.

A name is, in this order:
  1. an existing folder (what the caller typed, relative to the working directory): itself; it must hold
     model_index.json (or compose_models.json, a saved composition);
  2. a bare name (no "/") of a shipped model, a folder under one of `SHIPPED_DIRS` (`model_cards/` of this repository;
     the Space bundle adds its own): that folder, so "shapes-text" works from any working directory;
  3. a hub id, which has an owner ("org/name") that is not a local folder: unchanged, for diffusers to download.
Anything else is refused with "no such folder", the closest names and the shipped names.

This module imports neither torch nor diffusers (the batch command line parses jobs without them).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_DIRS: tuple[Path, ...] = (ROOT / "model_cards",)  # looked up in order; the Space bundle puts its own first
INDEX_FILES = ("model_index.json", "compose_models.json")  # a diffusers folder; a saved multi-checkpoint composition


def shipped_models() -> list[str]:
    """Names of the shipped diffusion models (folders with model_index.json under `SHIPPED_DIRS`)."""
    names = set()
    for d in SHIPPED_DIRS:
        if d.is_dir():
            names.update(p.name for p in d.iterdir() if (p / "model_index.json").is_file())
    return sorted(names)


def looks_local(name: str) -> bool:
    """True when `name` reads as a local path rather than a hub id (owner/name)."""
    if os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name):
        return True
    parts = name.replace("\\", "/").split("/")
    if len(parts) != 2 or not all(parts):
        return True
    return os.path.isdir(parts[0])  # e.g. "model_cards/shapes-uncond-c": its parent is a folder here


def _show(value: str, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_model(name: Any, field: str = "pretrained_model_name_or_path") -> str:
    """A model name -> the folder or hub id that diffusers loads (the rules of the module docstring).

    field: the argument's name in messages ("models" for jobs). ValueError, before anything is loaded, for a path
    that is not a folder, a folder without model_index.json, or a name that is neither shipped nor a hub id.
    """
    if not isinstance(name, (str, os.PathLike)):
        raise ValueError(f"{field} must be a folder, a shipped model name or a hub id; got {type(name).__name__}.")
    text = os.fspath(name)
    if not text.strip() or len(text) > 4096 or "\0" in text:
        raise ValueError(f"{field}: {_show(text)} is not a folder, a shipped model name or a hub id (owner/name).")
    path = os.path.expanduser(text)
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, f)) for f in INDEX_FILES):
            raise ValueError(
                f"{field}: cannot read {_show(text)}: the folder holds no model_index.json; give a checkpoint folder "
                "(as diffusers' save_pretrained writes it)."
            )
        return path
    bare = "/" not in text and os.sep not in text and text not in (".", "..") and not text.startswith("~")
    for d in SHIPPED_DIRS if bare else ():
        if (d / text / "model_index.json").is_file():
            return str(d / text)
    if not looks_local(text):
        return text
    what = "is a file, not a folder" if os.path.exists(path) else "no such folder"
    raise ValueError(
        f"{field}: cannot read {_show(text)}: {what}.{_closest(text, path, bare)} Give a checkpoint folder (with "
        f"model_index.json), a shipped model name ({', '.join(shipped_models()) or 'none here'}) or a hub id "
        "(owner/name)."
    )


def _closest(text: str, path: str, bare: bool) -> str:
    """The hint " Did you mean ...?": the closest folders next to `path` and, for a bare name, shipped names."""
    parent = os.path.dirname(os.path.normpath(path)) or "."
    close: list[str] = []
    if os.path.isdir(parent):
        names = [d for d in os.listdir(parent) if os.path.isdir(os.path.join(parent, d))]
        base = os.path.basename(os.path.normpath(path))
        close = [
            os.path.join(os.path.dirname(os.path.normpath(text)), c)
            for c in difflib.get_close_matches(base, names, n=3)
        ]
    if bare:
        close += [c for c in difflib.get_close_matches(text, shipped_models(), n=3) if c not in close]
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


__all__ = ["INDEX_FILES", "SHIPPED_DIRS", "looks_local", "resolve_model", "shipped_models"]
