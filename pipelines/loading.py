"""Loading several checkpoints as one `ComposePipeline`: where they come from, what they share, what is refused.

- (names: a path, a shipped name or a hub id are resolved by `pipelines.shipped.resolve_model`, which refuses a
  local-looking path that does not exist with "no such folder" and the closest names, not the hub's advice).
- `read_models_file`: the `compose_models.json` of a saved multi-checkpoint folder, validated: a list of
  sub-folders inside the folder (no absolute paths, no `..` out of it, no link out of it), no self-reference or
  cycle, every entry a folder.
- `share_components` / `same_component`: identical components (same class, config and weights / vocabulary) are
  loaded once and shared.
- `check_latent_spaces`: checkpoints with different latent spaces are refused at load time.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from .families import COMPONENTS, ComposeModel

MODELS_FILE = "compose_models.json"  # written by save_pretrained when a pipeline holds several checkpoints
MAX_MODELS = 32
# diffusers' way into a custom pipeline (as on the hub): model_index.json's `_class_name` is a [module, class] pair and
# the folder holds that module; `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` imports it.
PIPELINE_MODULE = "compose_pipeline"
CLASS_NAME = [PIPELINE_MODULE, "ComposePipeline"]
PIPELINE_MODULE_TEXT = '''\
"""diffusers' entry to this folder: `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`.

model_index.json names ["compose_pipeline", "ComposePipeline"], so diffusers runs this file and takes ComposePipeline
from it. The class comes from the diffusion-compose package (its repository: pip install -e .); this file only
imports it. `from pipelines import ComposePipeline; ComposePipeline.from_pretrained(folder)` needs no
trust_remote_code (it does not run this file).
"""

try:
    from pipelines.compose_pipeline import ComposePipeline
except ImportError as err:
    raise ImportError(
        "this folder's pipeline is ComposePipeline from the diffusion-compose package, which this environment cannot "
        f"import ({err}); install it (pip install -e . in its repository) and load the folder again."
    ) from err

__all__ = ["ComposePipeline"]
'''


def write_pipeline_module(folder: str | os.PathLike) -> list[str]:
    """Write `folder`'s compose_pipeline.py (the module diffusers imports for `DiffusionPipeline.from_pretrained(
    folder, trust_remote_code=True)`); returns the `_class_name` that model_index.json must hold."""
    with open(os.path.join(folder, f"{PIPELINE_MODULE}.py"), "w") as fh:
        fh.write(PIPELINE_MODULE_TEXT)
    return list(CLASS_NAME)


def write_diffusers_entry(folder: str | os.PathLike) -> None:
    """Lay a saved one-checkpoint folder out for diffusers' custom-pipeline loading: its module and model_index.json's
    `_class_name` [module, class] pair."""
    index = os.path.join(folder, "model_index.json")
    with open(index) as fh:
        config = json.load(fh)
    config["_class_name"] = write_pipeline_module(folder)
    with open(index, "w") as fh:
        fh.write(json.dumps(config, indent=2, sort_keys=True) + "\n")


def own_class_name(config: dict, cls_name: str) -> dict:
    """model_index.json as `ComposePipeline` (or a subclass) reads it: the [module, class] pair written for diffusers
    becomes the class name, so this class loads the folder itself, without running the folder's module (no
    trust_remote_code: the class is already imported)."""
    name = config.get("_class_name")
    if isinstance(name, (list, tuple)) and list(name) == CLASS_NAME:
        config = {**config, "_class_name": cls_name}
    return config


def read_models_file(folder: str, seen: tuple[str, ...] = ()) -> list[str] | None:
    """The checkpoint folders listed by `folder`'s compose_models.json (None when it has none), validated."""
    path = os.path.join(folder, MODELS_FILE)
    if not os.path.isfile(path):
        return None
    root = os.path.realpath(folder)
    if root in seen:
        raise ValueError(f"{MODELS_FILE} of {folder!r} lists a folder that lists it again (a cycle); fix the file.")
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); save the pipeline again.") from None
    subs = data.get("models") if isinstance(data, dict) else None
    if not isinstance(subs, list) or not subs or not all(isinstance(s, str) and s.strip() for s in subs):
        raise ValueError(f"{path}: 'models' must be a non-empty list of sub-folder names; save the pipeline again.")
    if len(subs) > MAX_MODELS:
        raise ValueError(f"{path}: {len(subs)} models; at most {MAX_MODELS} can be composed.")
    out = []
    for s in subs:
        if os.path.isabs(s) or os.path.expanduser(s) != s:
            raise ValueError(
                f"{path}: entry {s!r} is an absolute path; entries must be sub-folders of {folder!r}. To compose "
                "checkpoints elsewhere, pass their paths to from_pretrained as a list."
            )
        sub = os.path.realpath(os.path.join(folder, s))
        if os.path.commonpath([root, sub]) != root or sub == root:
            raise ValueError(
                f"{path}: entry {s!r} points outside {folder!r} (or at the folder itself); entries must be "
                "sub-folders. To compose checkpoints elsewhere, pass their paths to from_pretrained as a list."
            )
        if not os.path.isdir(sub):
            raise ValueError(f"{path}: entry {s!r} is not a folder inside {folder!r}; save the pipeline again.")
        nested = read_models_file(sub, (*seen, root))
        out.extend(nested if nested is not None else [os.path.join(folder, s)])
    return out


def same_component(a: Any, b: Any) -> bool:
    """True when two loaded components are the same (same class, config and weights / vocabulary)."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.nn.Module):
        ca = a.config.to_dict() if hasattr(a.config, "to_dict") else dict(a.config)
        cb = b.config.to_dict() if hasattr(b.config, "to_dict") else dict(b.config)
        for c in (ca, cb):
            c.pop("_name_or_path", None)
            c.pop("_commit_hash", None)
        if ca != cb:
            return False
        sa, sb = a.state_dict(), b.state_dict()
        if sa.keys() != sb.keys():
            return False
        return all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)
    if hasattr(a, "get_vocab"):  # tokenizers
        return a.get_vocab() == b.get_vocab() and a.model_max_length == b.model_max_length
    if hasattr(a, "config"):  # schedulers
        return dict(a.config) == dict(b.config)
    return False


def share_components(models: list[ComposeModel]) -> None:
    """Make identical components of the checkpoints one object (loaded once, moved once)."""
    pool: list[Any] = []
    for m in models:
        for key in COMPONENTS:
            comp = getattr(m, key)
            if comp is None:
                continue
            same = next((c for c in pool if same_component(c, comp)), None)
            if same is None:
                pool.append(comp)
            else:
                setattr(m, key, same)


def latent_signature(m: ComposeModel) -> dict[str, Any]:
    sig: dict[str, Any] = {
        "space": "pixel (no vae)" if m.vae is None else "latent",
        "network.in_channels": m.network.config.in_channels,
        "network.sample_size": getattr(m.network.config, "sample_size", None),
        "network family": type(m.family).__name__,
    }
    if m.vae is not None:
        c = m.vae.config
        sig.update(
            {
                "vae class": type(m.vae).__name__,
                "vae.latent_channels": c.latent_channels,
                "vae.scaling_factor": c.scaling_factor,
                "vae.shift_factor": getattr(c, "shift_factor", None),
                "vae scale factor": 2 ** (len(c.block_out_channels) - 1),
            }
        )
    return sig


def check_latent_spaces(models: list[ComposeModel]) -> None:
    ref = latent_signature(models[0])
    for m in models[1:]:
        sig = latent_signature(m)
        keys = sorted(set(ref) | set(sig))
        bad = [f"{k}: {ref.get(k)!r} vs {sig.get(k)!r}" for k in keys if ref.get(k) != sig.get(k)]
        if bad:
            raise ValueError(
                f"pretrained_model_name_or_path: checkpoints {models[0].name!r} and {m.name!r} do not share a latent "
                f"space ({'; '.join(bad)}); compose only checkpoints of one family (same VAE, channels, size)."
            )


def short_name(path: str | None, i: int) -> str:
    if not path:
        return f"model{i}"
    return os.path.basename(os.path.normpath(str(path))) or str(path)


__all__ = [
    "CLASS_NAME",
    "MODELS_FILE",
    "PIPELINE_MODULE",
    "check_latent_spaces",
    "own_class_name",
    "read_models_file",
    "same_component",
    "share_components",
    "short_name",
    "write_diffusers_entry",
    "write_pipeline_module",
]
