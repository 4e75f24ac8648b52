"""LoRA experts: several LoRA fine-tunes of one base network composed as terms, all in ONE network call per step.

A term is (checkpoint, LoRA adapter, prompt). `ComposePipeline.load_lora_experts({"purple": folder, ...})` attaches
diffusers-format LoRA files (`pytorch_lora_weights.safetensors`, local folders or hub ids; safetensors only, never a
pickle) to a checkpoint's network as named PEFT adapters; `pipe(prompt=..., lora=["purple", "outline"],
operator="and")` pairs the i-th term with the i-th adapter (None: the base network alone).

One call. Every term that shares a base network, whatever its LoRA, and the unconditional rows go through that
network in one batched call, each row with its own adapter (`adapter_call`): every LoRA layer computes the base layer
on all rows and adds each adapter's low-rank update to that adapter's rows only. For plain LoRA layers a forward hook
adds B(A(x)) * scale to each adapter's contiguous rows, in two stacked products per layer with a per-row mask
(`_fused_update`; a loop over the adapters' row slices where that does not apply); otherwise PEFT's mixed adapter
batches do it, through an `adapter_names` list that a forward pre-hook sets on every PEFT `LoraLayer` (diffusers'
models do not pass it down). A call whose rows all use the same adapter (or none) runs PEFT's ordinary path (no
routing). The pipeline sets this state once per sampling run and restores the network after it (`Routing.session`).

The unconditional branch of classifier-free guidance (`lora_uncond`):
  - "lora" (default): each LoRA's own unconditional row (its adapter active, the negative / empty prompt), as
    diffusers does with a LoRA loaded and as LoRA Composite does; the expression's unconditional leaf is the mean of
    those rows. A single LoRA term is then exactly diffusers' pipeline with that LoRA (`set_adapters`).
  - "base": one unconditional row of the base network without any LoRA (one row instead of one per LoRA); the
    guidance then also amplifies each LoRA's effect by the guidance scale.

Baselines in the same call (`lora_mode`; `operator` must be None, the mode is the combination):
  - "merge": the LoRAs merged into one network with weights (`weights=`, default 1 each; diffusers'
    `set_adapters(names, weights)`); one prompt. One row per image and branch.
  - "switch": LoRA Switch (Zhong et al. 2024, arXiv 2402.16843): one LoRA active at a time, the next one every
    `lora_switch_steps` steps (their callback switches after steps k, 2k, ...: steps 0..k use the first LoRA, then k
    steps each); only the active term's rows (and its unconditional row) are evaluated.
  - "composite": LoRA Composite (same paper): the average over LoRAs of each LoRA's CFG-guided prediction,
    mean_i [eps_u^(i) + w (eps_c^(i) - eps_u^(i))], which is operator "average" with lora_uncond "lora". Published as
    one network call per LoRA per step; here the same update in one call (`lora_calls="separate"` makes one call
    per LoRA, as published, e.g. to time it).
`lora_scale` multiplies every LoRA's update (diffusers' `cross_attention_kwargs={"scale": ...}`).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from compose.options import LORA_CALLS, LORA_MODES, LORA_UNCOND

BASE = "__base__"  # PEFT's row name for "no adapter" in a mixed batch
MAX_LORA_SCALE = 10.0
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# How a routed call adds each row's update (`adapter_call`): "stacked" (two stacked products per plain LoRA layer,
# `_fused_update`), "loop" (each adapter's update on its rows' slice, one adapter at a time) or "peft" (PEFT's mixed
# adapter batch). The first two fall back to the next where a layer does not allow them.
ROUTED_UPDATES = ("stacked", "loop", "peft")
UPDATE_OF_CALLS = {"batched": "stacked", "batched_loop": "loop", "batched_peft": "peft", "separate": "stacked"}
TEXT_PREFIXES = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass(frozen=True)
class Merged:
    """Several adapters active at once with weights (diffusers' `set_adapters(names, weights)`): a LoRA merge."""

    names: tuple[str, ...]
    weights: tuple[float, ...]

    def __str__(self) -> str:
        return "merge(" + ", ".join(f"{n}:{w:g}" for n, w in zip(self.names, self.weights, strict=True)) + ")"


@dataclass
class LoraExpert:
    """One loaded adapter: its name, where it came from, and the checkpoint (and network) that carries it."""

    name: str
    source: str
    model: str
    network: Any
    folder: str = ""
    weight_name: str | None = None


# ---------------------------------------------------------------------- the adapter state of one network call
def lora_layers(net: torch.nn.Module) -> list:
    """The PEFT LoRA layers of `net` (empty without PEFT or adapters)."""
    if not getattr(net, "peft_config", None):
        return []
    from peft.tuners.lora import LoraLayer

    return [m for m in net.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def adapter_call(net: torch.nn.Module, specs: list, n: int, scale: float = 1.0, update: str = "stacked"):
    """Run `net` (inside the block) with chunk c of its n-row chunks under specs[c]: BASE (no LoRA), an adapter name
    (that LoRA alone, scaled by `scale`) or a `Merged` set; None leaves the network as it is (all specs None).

    One spec for every row: that adapter state is set for the call (PEFT's ordinary forward). Several: each row gets
    its own adapter's update (`_routed`, the way `update` of `ROUTED_UPDATES` says). The layers' active adapters,
    enabled flag and scales are restored on exit.
    """
    if update not in ROUTED_UPDATES:
        raise ValueError(f"update={update!r} is not known; use one of {ROUTED_UPDATES}.")
    if all(s is None for s in specs):
        yield
        return
    layers = lora_layers(net)
    if not layers:
        yield
        return
    saved = [(m, m.disable_adapters, list(m.active_adapters), dict(m.scaling)) for m in layers]
    hooks: list = []
    try:
        kinds = list(dict.fromkeys(BASE if s is None else s for s in specs))
        if len(kinds) == 1:
            names, weights = _names_weights(kinds[0])
            for m in layers:
                if not names:
                    m.enable_adapters(False)
                    continue
                m.enable_adapters(True)
                m.set_adapter(list(names), inference_mode=True)
                for a, w in zip(names, weights, strict=True):
                    m.set_scale(a, w * scale)
        else:
            if any(isinstance(s, Merged) for s in kinds):
                raise ValueError("a LoRA merge cannot share a network call with other adapters (internal error).")
            hooks = _routed(net, layers, [BASE if s is None else s for s in specs], n, scale, update)
        yield
    finally:
        for h in hooks:
            h.remove()
        for m, disabled, active, scaling in saved:
            m.enable_adapters(not disabled)
            m.set_adapter(active, inference_mode=True)
            m.scaling.update(scaling)


def _routed(net: torch.nn.Module, layers: list, chunk_specs: list, n: int, scale: float, update: str) -> list:
    """Per-row adapters for one call (chunk c of n rows: chunk_specs[c]); returns the hooks to remove afterwards.

    Plain LoRA layers (PEFT `Linear` / `Conv*d` without a variant such as DoRA): the layers run as the base (adapters
    disabled) and a forward hook adds each adapter's update B(A(x)) * scale to its own contiguous rows, on views (the
    same operations as PEFT's forward, on a slice). Otherwise PEFT's mixed adapter batch: a forward pre-hook sets
    `adapter_names` (one name per row, "__base__" for none), which diffusers' models do not pass down themselves.
    """
    from peft.tuners.lora.layer import Linear, _ConvNd

    used = [s for s in dict.fromkeys(chunk_specs) if s != BASE]
    rows = len(chunk_specs) * n
    ranges, start = [], 0  # (adapter, first row, end row) of consecutive chunks with the same adapter
    for k in range(1, len(chunk_specs) + 1):
        if k == len(chunk_specs) or chunk_specs[k] != chunk_specs[start]:
            if chunk_specs[start] != BASE:
                ranges.append((chunk_specs[start], start * n, k * n))
            start = k

    def check(x: torch.Tensor) -> None:
        if x.shape[0] != rows:
            raise ValueError(
                f"LoRA routing: a layer of {type(net).__name__} got {x.shape[0]} rows for {rows} routed rows (a model "
                "that folds the batch into another axis); use lora_calls='separate'."
            )

    plain = update != "peft" and all(
        isinstance(m, (Linear, _ConvNd)) and not m.merged and not any(v in m.lora_variant for v in used)
        for m in layers
    )
    for m in layers:
        m.enable_adapters(not plain)
        if not plain:
            m.set_adapter(used, inference_mode=True)
        for a in used:
            m.set_scale(a, scale)
    if plain:

        def add_updates(module, args, kwargs, out):
            x = args[0] if args else next(iter(kwargs.values()))
            check(x)
            for a, lo, hi in ranges:
                if a in module.lora_A:
                    xa = x[lo:hi].to(module.lora_A[a].weight.dtype)
                    delta = module.lora_B[a](module.lora_A[a](module.lora_dropout[a](xa))) * module.scaling[a]
                    out[lo:hi] += delta.to(out.dtype)
            return out

        hooks = []
        for m in layers:
            fused = _fused_update(m, ranges, rows, check) if update == "stacked" else None
            hooks.append(m.register_forward_hook(fused or add_updates, with_kwargs=True))
        return hooks
    names = [s for s in chunk_specs for _ in range(n)]

    def route(module, args, kwargs):
        check(args[0] if args else next(iter(kwargs.values())))
        kwargs["adapter_names"] = names
        return args, kwargs

    return [m.register_forward_pre_hook(route, with_kwargs=True) for m in layers]


def _fused_update(m, ranges: list, rows: int, check):
    """The slice routing's update of one layer in two products over all rows (None where it does not apply).

    The used adapters' down-projections are stacked (R = the sum of their ranks) and applied to every row at once,
    each row keeps only its own adapter's R-slice (a 0/1 mask; rows of the base keep none), and the stacked
    up-projections, each scaled, bring the update back: sum over adapters of mask_a * B_a(A_a(x)) * scaling_a, the
    same sum the per-slice loop adds, in 4 operations per layer whatever the number of adapters (the loop makes about
    6 per adapter). The stacked weights are built once per routed state (a copy of the used adapters' LoRA weights of
    this layer, held while the state is). Applies where the LoRA dropout is the identity (none, p = 0 or eval mode),
    without a LoRA bias, to Linear layers and to convolutions whose up-projection is 1x1.
    """
    names = [a for a in dict.fromkeys(a for a, _, _ in ranges) if a in m.lora_A]
    if not names:
        return None
    downs, ups = [m.lora_A[a] for a in names], [m.lora_B[a] for a in names]
    if any(u.bias is not None or d.bias is not None for d, u in zip(downs, ups, strict=True)):
        return None
    drops = [m.lora_dropout[a] for a in names]  # the loop applies them: fuse only where they are the identity
    if not all(
        isinstance(d, torch.nn.Identity) or (type(d) is torch.nn.Dropout and (d.p == 0 or not d.training))
        for d in drops
    ):
        return None
    conv = downs[0].weight.dim() > 2
    if conv:
        ops = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}
        d0 = downs[0]
        geometry = (d0.stride, d0.padding, d0.dilation, 1)
        same = all((d.stride, d.padding, d.dilation, d.groups) == geometry for d in downs)
        ones = all(set(u.kernel_size) == {1} and set(u.stride) == {1} and u.groups == 1 for u in ups)
        if not (same and ones and d0.weight.dim() in ops and isinstance(d0.padding, tuple)):
            return None
        op = ops[d0.weight.dim()]
    with torch.no_grad():
        A = torch.cat([d.weight for d in downs])  # (R, in, *kernel)
        B = torch.cat([u.weight * m.scaling[a] for u, a in zip(ups, names, strict=True)], dim=1)  # (out, R, *1)
        mask = torch.zeros(rows, A.shape[0], dtype=A.dtype, device=A.device)
        offset, start = {}, 0  # adapter -> its columns of the stacked rank axis
        for a, d in zip(names, downs, strict=True):
            offset[a] = (start, start + d.weight.shape[0])
            start += d.weight.shape[0]
        for a, lo, hi in ranges:
            if a in offset:
                mask[lo:hi, offset[a][0] : offset[a][1]] = 1

    def update(module, args, kwargs, out):
        x = args[0] if args else next(iter(kwargs.values()))
        check(x)
        x = x.to(A.dtype)
        if conv:
            h = op(x, A, None, d0.stride, d0.padding, d0.dilation)
            h = h * mask.view(rows, -1, *([1] * (h.dim() - 2)))
            delta = op(h, B)
        else:
            h = F.linear(x, A)
            h = h * mask.view(rows, *([1] * (h.dim() - 2)), -1)
            delta = F.linear(h, B)
        out += delta.to(out.dtype)
        return out

    return update


def _names_weights(spec) -> tuple[tuple[str, ...], tuple[float, ...]]:
    if isinstance(spec, Merged):
        return spec.names, spec.weights
    if spec == BASE:
        return (), ()
    return (spec,), (1.0,)


@dataclass
class Routing:
    """What `NetworkGroups` asks of the LoRA plan: whether to split a network's rows into one call per adapter
    (`split`), and the adapter state of each call (`context`).

    Inside `session()` (the pipeline opens one around its sampling loop) a network's adapter state is set once and
    held from one call to the next while the calls ask for the same state (a sampling run makes the same call every
    step): the set-up (each LoRA layer's adapters, scales and routing hooks) is paid once per run instead of once per
    step. Outside a session every call sets and restores its own state.
    """

    split: bool = False
    scale: float = 1.0
    update: str = "stacked"  # how a routed call adds each row's update (`ROUTED_UPDATES`)
    _held: dict | None = field(default=None, repr=False)  # in a session: id(net) -> (specs, n, ExitStack)

    @contextlib.contextmanager
    def session(self):
        """Hold the networks' adapter states across calls; every network is restored on exit (also on error)."""
        if self._held is not None:  # nested: the outer session holds
            yield self
            return
        self._held = {}
        try:
            yield self
        finally:
            held, self._held = self._held, None
            with contextlib.ExitStack() as restore:  # restores every network even if one restore raises
                for _, _, stack in held.values():
                    restore.push(stack)

    def context(self, net: torch.nn.Module, specs: list, n: int):
        if self._held is None:
            return adapter_call(net, specs, n, self.scale, self.update)
        held = self._held.get(id(net))
        if held is None or held[0] != list(specs) or held[1] != n:
            if held is not None:
                del self._held[id(net)]
                held[2].close()  # restore before setting the new state
            stack = contextlib.ExitStack()
            stack.enter_context(adapter_call(net, specs, n, self.scale, self.update))
            self._held[id(net)] = (list(specs), n, stack)
        return contextlib.nullcontext()


# ---------------------------------------------------------------------- loading
def registry(pipe) -> dict[str, LoraExpert]:
    """The pipeline's loaded LoRA experts by name (created empty on first use)."""
    reg = pipe.__dict__.get("_lora_experts")
    if reg is None:
        reg = {}
        pipe.__dict__["_lora_experts"] = reg
    return reg


def check_lora_source(name: str, source: Any, weight_name: str | None = None) -> tuple[str, str | None]:
    """A LoRA source -> (folder or hub id, weight file name or None). A local path must exist (checked first: a
    missing file is "no such file", whatever its suffix), then hold safetensors: pickled weights (.bin, .pt, .ckpt,
    ...) are refused."""
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise ValueError(
            f"load_lora_experts: the source of {name!r} must be a folder, a .safetensors file or a hub id; got "
            f"{type(source).__name__}."
        )
    text = os.fspath(source)
    if "\0" in text or len(text) > 4096:
        raise ValueError(f"load_lora_experts: the source of {name!r} is not a usable path or hub id.")
    p = Path(text).expanduser()
    pickled = (
        f"load_lora_experts: {name!r}: {text} holds pickled weights ({p.suffix or 'a pickle'}), which can run code "
        "when read; ComposePipeline loads LoRA weights from safetensors only. Convert it (load it once where you "
        "trust it, then `safetensors.torch.save_file`) and give the .safetensors file."
    )
    looks_local = p.exists() or p.is_absolute() or text.startswith((".", "~")) or text.count("/") != 1
    if looks_local and not p.exists():  # existence first: a missing "nope.bin" is missing, whatever its suffix
        raise ValueError(f"load_lora_experts: {name!r}: no such file or folder {text!r}.")
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(pickled)
    if weight_name is not None:
        if not isinstance(weight_name, str) or Path(weight_name).name != weight_name:
            raise ValueError(f"weight_name must be a file name (no folder); got {weight_name!r}.")
        if Path(weight_name).suffix.lower() != ".safetensors":
            raise ValueError(
                pickled
                if Path(weight_name).suffix.lower() in PICKLE_SUFFIXES
                else f"weight_name={weight_name!r} must name a .safetensors file."
            )
    if not looks_local:
        return text, weight_name  # a hub id (owner/name); diffusers downloads safetensors only
    if p.is_file():
        if p.suffix.lower() != ".safetensors":
            raise ValueError(f"load_lora_experts: {name!r}: {text} is not a .safetensors file.")
        return str(p.parent), p.name
    files = sorted(f.name for f in p.iterdir() if f.suffix.lower() == ".safetensors")
    if weight_name is not None:
        if weight_name not in files:
            raise ValueError(f"load_lora_experts: {name!r}: the folder {text} has no {weight_name}; it has {files}.")
        return str(p), weight_name
    if not files:
        if any(f.suffix.lower() in PICKLE_SUFFIXES for f in p.iterdir()):
            raise ValueError(pickled)
        raise ValueError(
            f"load_lora_experts: {name!r}: the folder {text} has no .safetensors file; give a folder with "
            f"{WEIGHT_NAME}."
        )
    if WEIGHT_NAME in files:
        return str(p), WEIGHT_NAME
    if len(files) > 1:
        raise ValueError(
            f"load_lora_experts: {name!r}: the folder {text} has several .safetensors files {files}; name one with "
            "weight_name=."
        )
    return str(p), files[0]


def require_peft() -> None:
    """ValueError when this environment cannot attach LoRA adapters: diffusers does it through peft (its "PEFT
    backend"), which is an install dependency of this project that a hand-made environment may lack."""
    try:
        import peft  # noqa: F401
        from diffusers.utils import USE_PEFT_BACKEND
    except ImportError as err:
        raise ValueError(f"load_lora_experts: {missing_package(err)}") from None
    if not USE_PEFT_BACKEND:
        raise ValueError(
            "load_lora_experts: diffusers' PEFT backend is off in this environment (peft or transformers too old); "
            "install the versions this project asks for: pip install 'peft>=0.10' 'transformers>=4.40'."
        )


def missing_package(err: ImportError) -> str:
    """The message for a LoRA that cannot load because a package is missing (named, with the install command)."""
    package = (getattr(err, "name", None) or "peft").split(".")[0]
    return (
        f"LoRA experts need the {package!r} package, which this environment cannot import ({type(err).__name__}); "
        f"install it (pip install {package}) and restart. The LoRA file and the checkpoint are not at fault."
    )


def read_lora(name: str, folder: str, weight_name: str | None, prefix: str) -> tuple[dict, Any, Any, str | None]:
    """(state dict, network alphas, metadata, key prefix) of a LoRA file in diffusers' format (kohya / other
    layouts are converted by diffusers' `lora_state_dict`). Text-encoder weights are refused. prefix: the key
    prefix of the target network's family (`Family.lora_prefix`); the file's keys are read under it where they
    carry it, as they are otherwise."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    try:
        state, alphas, meta = StableDiffusionLoraLoaderMixin.lora_state_dict(
            folder, weight_name=weight_name, use_safetensors=True, return_lora_metadata=True
        )
    except Exception as err:  # noqa: BLE001 -- hub errors, corrupt files, missing files: name the source
        raise ValueError(
            f"load_lora_experts: {name!r}: cannot read LoRA weights from {folder!r}: {type(err).__name__}: "
            f"{str(err).splitlines()[0][:300] if str(err) else ''}"
        ) from None
    if not state:
        raise ValueError(f"load_lora_experts: {name!r}: {folder} holds no LoRA weights.")
    heads = {k.split(".", 1)[0] for k in state}
    text = sorted(heads & set(TEXT_PREFIXES))
    if text:
        raise ValueError(
            f"load_lora_experts: {name!r}: {folder} also trains the text encoder ({', '.join(text)}); ComposePipeline "
            "composes denoiser LoRAs only (the text encoder is shared by every term). Save the denoiser part alone "
            "(its 'unet.' / 'transformer.' keys) and load that."
        )
    return state, alphas, meta, prefix if prefix in heads else None


def load_experts(pipe, experts: Mapping, model: str | int | None = None, weight_name: str | None = None) -> list[str]:
    """Attach LoRA adapters to one checkpoint's network (see `ComposePipeline.load_lora_experts`); returns the names.

    A name already loaded from the same source onto the same network is kept (loading is idempotent); any other
    clash is refused. The network is left with its adapters disabled (outside a pipeline call it is the base)."""
    if not isinstance(experts, Mapping) or not experts:
        raise ValueError(
            "load_lora_experts takes a dict {name: folder, .safetensors file or hub id}, e.g. {'style': "
            "'model_cards/shapes-lora-outline'}; got "
            + (type(experts).__name__ if experts is not None else "None")
            + "."
        )
    target = _target_model(pipe.models, model)
    net = target.network
    if not hasattr(net, "load_lora_adapter"):
        raise ValueError(
            f"checkpoint {target.name!r}: its network ({type(net).__name__}) takes no LoRA adapters; LoRA experts "
            "need a diffusers network with PEFT support (UNet2DConditionModel, SD3 / Flux transformers)."
        )
    require_peft()
    reg = registry(pipe)
    names = []
    for name, source in experts.items():
        if not isinstance(name, str) or not NAME.fullmatch(name) or name == BASE:
            raise ValueError(
                f"load_lora_experts: the name {name!r} must be 1-100 letters, digits, '.', '_' or '-' (starting "
                "with a letter or digit)."
            )
        folder, weight = check_lora_source(name, source, weight_name)
        key = f"{folder}/{weight}" if weight else folder
        if name in reg:
            if reg[name].source == key and reg[name].network is net:
                names.append(name)
                continue
            raise ValueError(
                f"load_lora_experts: {name!r} is already loaded (from {reg[name].source}); unload it with "
                f"pipe.unload_lora_experts([{name!r}]) or choose another name."
            )
        state, alphas, meta, prefix = read_lora(name, folder, weight, target.family.lora_prefix)
        try:
            kw = {"metadata": meta} if meta else {"network_alphas": alphas}
            with warnings.catch_warnings():  # several adapters on one network is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                net.load_lora_adapter(state, prefix=prefix, adapter_name=name, **kw)
        except ImportError as err:  # a package the loader needs, not the file or the checkpoint
            raise ValueError(f"load_lora_experts: {name!r}: {missing_package(err)}") from None
        except Exception as err:  # noqa: BLE001 -- shape mismatches, unknown modules: name the pair
            if name in (getattr(net, "peft_config", None) or {}):
                net.delete_adapters([name])
            raise ValueError(
                f"load_lora_experts: {name!r} ({key}) does not fit checkpoint {target.name!r}: {type(err).__name__}: "
                f"{str(err).splitlines()[0][:300] if str(err) else ''}"
            ) from None
        if name not in (getattr(net, "peft_config", None) or {}):
            raise ValueError(
                f"load_lora_experts: {name!r} ({key}) matched no layer of checkpoint {target.name!r}'s network; is "
                "it a LoRA of another base model?"
            )
        reg[name] = LoraExpert(name, key, target.name, net, folder, weight)
        names.append(name)
    net.disable_adapters()
    return names


def unload_experts(pipe, names: list[str] | None = None) -> None:
    """Remove loaded LoRA experts (all when `names` is None) from their networks."""
    reg = registry(pipe)
    names = list(reg) if names is None else list(names)
    unknown = [n for n in names if n not in reg]
    if unknown:
        raise ValueError(f"unload_lora_experts: {unknown} are not loaded; loaded: {sorted(reg)}.")
    nets = []
    for n in names:
        net = reg.pop(n).network
        net.delete_adapters([n])
        nets.append(net)
    for net in nets:  # no adapter left: the plain layers back (PEFT's wrappers removed)
        if not getattr(net, "peft_config", None) and any(True for _ in _peft_layers(net)):
            net.unload_lora()


def _peft_layers(net: torch.nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return (m for m in net.modules() if isinstance(m, BaseTunerLayer))


@contextlib.contextmanager
def unloaded(pipe):
    """The pipeline without its LoRA experts inside the block (e.g. to save the base checkpoints: a network with PEFT
    layers would be written with its LoRA-wrapped weights); they are loaded again from their files on exit."""
    reg = registry(pipe)
    kept = [(e.name, e.folder, e.weight_name, e.model) for e in reg.values()]
    unload_experts(pipe)
    try:
        yield pipe
    finally:
        for name, folder, weight, model in kept:
            load_experts(pipe, {name: folder}, model=model, weight_name=weight)


def _target_model(models: list, model: str | int | None):
    if model is None:
        return models[0]
    if isinstance(model, int) and not isinstance(model, bool) and 0 <= model < len(models):
        return models[model]
    hit = [m for m in models if m.name == model]
    if not hit:
        raise ValueError(
            f"load_lora_experts: model={model!r} is not a checkpoint of this pipeline; give one of "
            f"{[m.name for m in models]} or an index."
        )
    return hit[0]


# ---------------------------------------------------------------------- one call's plan
@dataclass
class LoraPlan:
    """The LoRA side of one pipeline call: the terms (checkpoint, prompt), each term's adapter spec, the operator and
    weights left for the composition, and how to evaluate (routing, the unconditional rows, the switch)."""

    terms: list
    adapters: list
    operator: Any
    weights: Any
    mode: str | None = None
    uncond: str = "lora"
    switch_steps: int = 5
    routing: Routing | None = None
    managed: set = field(default_factory=set)  # ids of the networks whose adapters this call sets

    def attach(self, leaves: list, uncond: list, conds: dict) -> list:
        """Give each term leaf its adapter (and name), and return the unconditional leaves: one per (checkpoint,
        adapter) with lora_uncond "lora", the base's otherwise; their conditioning is the checkpoint's."""
        for leaf, spec in zip(leaves, self.adapters, strict=True):
            leaf.adapter = spec
            if spec is not None and spec != BASE:
                leaf.name = f"{leaf.name} [{spec}]"
        if not uncond or self.routing is None:
            return uncond
        out = []
        by_model = {id(u.model): u for u in uncond}
        seen = set()
        for leaf in leaves:
            u0 = by_model.get(id(leaf.model))
            if u0 is None:
                continue
            managed = id(leaf.model.network) in self.managed
            spec = leaf.adapter if self.uncond == "lora" else (BASE if managed else None)
            key = (id(leaf.model), spec)
            if key in seen:
                continue
            seen.add(key)
            u = type(u0)(u0.schedule, u0.name if spec in (None, BASE) else f"{u0.name} [{spec}]", u0.model, u0.prompt)
            u.adapter = spec
            conds[id(u)] = conds[id(u0)]
            out.append(u)
        return out

    def wrap(self, groups, core: list, leaves: list, uncond: list, conds: dict, u_index: int | None):
        """The row groups `predict` uses: `groups` itself, or for lora_mode "switch" the per-step switch."""
        if self.mode != "switch":
            return groups
        return SwitchGroups(
            type(groups), core, leaves, uncond, conds, u_index, groups.call_extra, self.routing, self.switch_steps
        )


class SwitchGroups:
    """LoRA Switch: at step j only the active term (and its unconditional row) is evaluated; every term leaf gets its
    prediction (so the "average" over terms is the active LoRA's guided prediction).

    Active term at step j (0-based): 0 for j <= k, then ((j - 1) // k) mod N: the published callback switches after
    steps k, 2k, ... (`step_index % k == 0`), so the first LoRA runs k + 1 steps, the others k. The step index is
    counted from the distinct times `predict` is called at (one network evaluation per step)."""

    def __init__(self, groups_cls, core, leaves, uncond, conds, u_index, call_extra, routing, k: int) -> None:
        self.k = k
        self.core = core
        self.term_index = [next(i for i, lf in enumerate(core) if lf is leaf) for leaf in leaves]
        self.subs = []
        for leaf in leaves:
            mine = [u for u in uncond if u.model is leaf.model and u.adapter == leaf.adapter]
            self.subs.append(groups_cls(core, [leaf], mine, conds, u_index, call_extra, routing=routing))
        self.call_extra = call_extra
        self.step, self._t = -1, None
        self.active: list[int] = []  # the active term of every step so far

    def active_term(self, j: int) -> int:
        return (max(j - 1, 0) // self.k) % len(self.subs)

    def predict(self, x, t, schedule, **kw):
        t_key = float(torch.as_tensor(t).reshape(-1)[0])
        if t_key != self._t:
            self.step, self._t = self.step + 1, t_key
            self.active.append(self.active_term(self.step))
        i = self.active[-1]
        out = self.subs[i].predict(x, t, schedule, **kw)  # (eps, div) or (eps, div, x0): copied in place
        src = self.term_index[i]
        for li in self.term_index:
            for v in out:
                if v is not None and li != src:
                    v[li] = v[src]
        return out


def plan(
    pipe,
    terms: list,
    lora: Any,
    *,
    mode: Any,
    uncond: Any,
    switch_steps: Any,
    scale: Any,
    calls: Any,
    operator: Any,
    weights: Any,
) -> LoraPlan:
    """Check the LoRA arguments of a call and pair the terms with their adapters (ValueError naming the argument and
    the fix); a call without LoRA experts loaded and without `lora` is returned unchanged."""
    reg = registry(pipe)
    _check_options(mode, uncond, switch_steps, scale, calls)
    if lora is None:
        if mode is not None:
            raise ValueError(f"lora_mode={mode!r} needs lora= (the adapters to combine, e.g. lora=['a', 'b']).")
        if not reg:
            return LoraPlan(list(terms), [None] * len(terms), operator, weights)
    elif not reg:
        raise ValueError(
            f"lora={_show(lora)} but no LoRA experts are loaded; load them first with "
            "pipe.load_lora_experts({'name': 'folder or hub id', ...})."
        )
    entries = _entries(lora, reg)
    terms = list(terms)
    if entries is not None:
        L, T = len(entries), len(terms)
        if isinstance(lora, str):
            entries = entries * T
        elif T == 1 and L > 1:
            terms = terms * L
        elif L != T:
            raise ValueError(
                f"lora has {L} entries for {T} terms; give one adapter (or None) per term ({T}), a single name for "
                "every term, or several adapters with one prompt on one checkpoint (one term per adapter)."
            )
    else:
        entries = [None] * len(terms)
    managed = {id(e.network) for e in reg.values()}
    adapters = []
    for k, ((m, _), a) in enumerate(zip(terms, entries, strict=True)):
        if a is not None and reg[a].network is not m.network:
            raise ValueError(
                f"lora: {a!r} is loaded on checkpoint {reg[a].model!r}, but term {k + 1} uses checkpoint {m.name!r}; "
                f"load it there with pipe.load_lora_experts({{{a!r}: ...}}, model={m.name!r})."
            )
        adapters.append(a if a is not None else (BASE if id(m.network) in managed else None))
    routing = Routing(split=calls == "separate", scale=float(scale), update=UPDATE_OF_CALLS[calls])
    if mode is None:
        return LoraPlan(terms, adapters, operator, weights, None, uncond, switch_steps, routing, managed)
    return _baseline(terms, adapters, entries, mode, uncond, switch_steps, routing, managed, operator, weights)


def _baseline(terms, adapters, entries, mode, uncond, switch_steps, routing, managed, operator, weights) -> LoraPlan:
    """merge / switch / composite: the mode is the combination, so `operator` must be None."""
    if operator is not None:
        what = {
            "merge": "one merged network",
            "switch": "the active LoRA's guided prediction",
            "composite": "the average of each LoRA's guided prediction",
        }[mode]
        raise ValueError(f"lora_mode={mode!r} is itself the combination ({what}); drop operator={_show(operator)}.")
    if uncond != "lora":
        raise ValueError(
            f"lora_uncond={uncond!r} is for lora_mode=None; the baselines use each LoRA's own unconditional row, as "
            "published. Drop lora_uncond."
        )
    if len(terms) < 2 or any(a is None for a in entries):
        raise ValueError(
            f"lora_mode={mode!r} combines several LoRAs: give lora= a list of at least two loaded adapter names "
            f"(no None); got {_show(entries)}."
        )
    if mode == "merge":
        if len({(id(m), p) for m, p in terms}) != 1:
            raise ValueError(
                "lora_mode='merge' runs ONE merged network on ONE prompt; give a single prompt (and checkpoint), or "
                "use lora_mode=None / 'composite' for one prompt per LoRA."
            )
        w = [1.0] * len(entries) if weights is None else _merge_weights(weights, len(entries))
        spec = Merged(tuple(entries), tuple(w))
        return LoraPlan(terms[:1], [spec], None, None, mode, uncond, switch_steps, routing, managed)
    if weights is not None:
        raise ValueError(
            f"weights are the merge weights of lora_mode='merge'; lora_mode={mode!r} takes none. Drop weights."
        )
    return LoraPlan(terms, adapters, "average", None, mode, uncond, switch_steps, routing, managed)


def _merge_weights(weights: Any, k: int) -> list[float]:
    try:
        w = [float(v) for v in torch.as_tensor(weights, dtype=torch.float64).flatten()]
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"weights (the merge weights) must be numbers, one per LoRA; got {_show(weights)}.") from None
    if len(w) != k or not all(math.isfinite(v) and abs(v) <= MAX_LORA_SCALE for v in w):
        raise ValueError(
            f"weights (the merge weights) must be {k} finite numbers from -{MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}, "
            f"one per LoRA; got {_show(weights)}."
        )
    return w


def _entries(lora: Any, reg: dict) -> list | None:
    if lora is None:
        return None
    if isinstance(lora, str):
        items = [lora]
    elif isinstance(lora, (list, tuple)) and lora:
        items = list(lora)
    else:
        raise ValueError(
            f"lora must be an adapter name, a list of names / None (one per term), or None; got {_show(lora)}."
        )
    for a in items:
        if a is not None and (not isinstance(a, str) or a not in reg):
            raise ValueError(
                f"lora: {_show(a)} is not a loaded LoRA expert; loaded: {sorted(reg)}. Load it with "
                "pipe.load_lora_experts({name: folder}) or use None for the base."
            )
    return items


def _check_options(mode, uncond, switch_steps, scale, calls) -> None:
    if mode is not None and mode not in LORA_MODES:
        raise ValueError(
            f"lora_mode={_show(mode)} is not known; use None (compose with operator=) or one of {LORA_MODES}."
        )
    if uncond not in LORA_UNCOND:
        raise ValueError(f"lora_uncond={_show(uncond)} is not known; use one of {LORA_UNCOND}.")
    if calls not in LORA_CALLS:
        raise ValueError(f"lora_calls={_show(calls)} is not known; use one of {LORA_CALLS}.")
    if isinstance(switch_steps, bool) or not isinstance(switch_steps, int) or not 1 <= switch_steps <= 10_000:
        raise ValueError(f"lora_switch_steps must be an integer from 1 to 10000; got {_show(switch_steps)}.")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= MAX_LORA_SCALE:
        raise ValueError(f"lora_scale must be a number from 0 to {MAX_LORA_SCALE:g}; got {_show(scale)}.")


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "BASE",
    "LORA_CALLS",
    "LORA_MODES",
    "LORA_UNCOND",
    "LoraExpert",
    "LoraPlan",
    "Merged",
    "Routing",
    "SwitchGroups",
    "adapter_call",
    "check_lora_source",
    "load_experts",
    "lora_layers",
    "plan",
    "registry",
    "unload_experts",
    "unloaded",
]
