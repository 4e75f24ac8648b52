"""Model families as adapters: what one kind of checkpoint adds to the shared sampler (CONTRIBUTING.md).

`compose` owns the mathematics and the one sampling loop; a family only answers, for its checkpoints:
  - `encode(model, prompt, device, zero)`: the conditioning of one prompt (batch of one), computed once per call;
  - `forward(model, x, timesteps, conds, n)`: ONE batched network call over rows made of chunks of n rows, chunk c
    conditioned by conds[c] (the terms that share the network, the unconditional branch, the probe points);
  - `timestep(schedule, t)`: the network's timestep input at time t of its own schedule.
Everything else (grouping the rows by network, converting each prediction type to eps_hat on the shared schedule,
divergences, the step, the densities) is shared: `NetworkGroups` and `compose.sampler.run`.

`UNetFamily` serves Stable Diffusion 1.x / 2.x and SDXL UNets (`UNet2DConditionModel`) and pixel-space
`UNet2DModel`s. Further families (flow-matching transformers, LoRA experts) are further classes with the same
three methods.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

import compose
from compose.predictions import to_x0
from compose.schedule import NoiseSchedule

COMPONENTS = ("unet", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer",
              "text_encoder_3", "tokenizer_3")  # fmt: skip


@dataclass(eq=False)
class ComposeModel:
    """One checkpoint of a composition: its network, scheduler (read, never stepped) and text / latent components."""

    name: str
    unet: Any
    scheduler: Any
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    transformer: Any = None
    text_encoder_3: Any = None
    tokenizer_3: Any = None

    @property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_scheduler(self.scheduler)

    @property
    def prediction_type(self) -> str:
        if "FlowMatch" in type(self.scheduler).__name__:  # its config has no prediction_type: it is the velocity
            return "flow"
        return compose.normalize_prediction_type(self.scheduler.config.get("prediction_type", "epsilon"))

    @property
    def is_text(self) -> bool:
        return self.text_encoder is not None or self.text_encoder_2 is not None

    @property
    def is_xl(self) -> bool:
        return self.unet is not None and getattr(self.unet.config, "addition_embed_type", None) == "text_time"

    @property
    def network(self) -> Any:
        return self.unet if self.unet is not None else self.transformer

    @property
    def family(self) -> Any:
        """The adapter of this checkpoint's network: `UNetFamily`, `SD3Family` or `FluxFamily`."""
        name = type(self.network).__name__
        return {"SD3Transformer2DModel": SD3, "FluxTransformer2DModel": FLUX}.get(name, UNET)

    def components(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in COMPONENTS}


class UNetFamily:
    """SD 1.x / 2.x and SDXL (`UNet2DConditionModel`, cross-attention on CLIP states; SDXL adds pooled text embeds
    and size ids) and pixel-space `UNet2DModel`s (no conditioning)."""

    @torch.no_grad()
    def encode(self, model: ComposeModel, prompt: str | None, device: Any, zero: bool = False,
               max_sequence_length: int | None = None) -> dict[str, Any]:  # fmt: skip
        """Conditioning of one prompt: {"encoder_hidden_states": (1, S, D)} (+ "text_embeds" (1, P) for SDXL)."""
        encoders = [(model.tokenizer, model.text_encoder), (model.tokenizer_2, model.text_encoder_2)]
        encoders = [(tok, enc) for tok, enc in encoders if enc is not None]
        hidden, pooled = [], None
        for tok, enc in encoders:
            if tok is None:
                raise ValueError(f"checkpoint {model.name!r} has a text encoder but no tokenizer; pass tokenizer=.")
            ids = tok(
                prompt or "", padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)  # fmt: skip
            if model.is_xl:
                out = enc(ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                pooled = out[0]  # the projected pooled output of the (last) encoder
            else:
                hidden.append(enc(ids)[0])
        cond = {"encoder_hidden_states": torch.cat(hidden, dim=-1)}
        if model.is_xl:
            if pooled is None or pooled.ndim != 2:
                raise ValueError(f"checkpoint {model.name!r} (SDXL-style) needs text_encoder_2 with a projection.")
            cond["text_embeds"] = pooled
        if zero:  # SDXL's force_zeros_for_empty_prompt for the unconditional branch
            cond = {k: torch.zeros_like(v) for k, v in cond.items()}
        return cond

    def timestep(self, schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
        return schedule.timestep(t)

    # latent space: the state is the VAE latent (or the image) as the network takes it
    def latent_shape(self, model: ComposeModel, n: int, height: int, width: int, f: int) -> tuple:
        return (n, model.network.config.in_channels, height // f, width // f)

    def size_multiple(self, model: ComposeModel, f: int) -> int:
        """Heights and widths must be multiples of this: the VAE's factor times the UNet's downsampling."""
        return f * 2 ** (len(model.network.config.block_out_channels) - 1)

    def native_size(self, model: ComposeModel, f: int) -> int:
        return model.network.config.sample_size * f

    def unpack(self, model: ComposeModel, x: torch.Tensor, height: int, width: int, f: int) -> torch.Tensor:
        """The state as the VAE decodes it (n, C, h, w)."""
        return x

    def forward(self, model: ComposeModel, x: torch.Tensor, timesteps: torch.Tensor, conds: list, n: int,
                extra: dict | None = None) -> torch.Tensor:  # fmt: skip
        """The network's raw output for rows x (C n, ...) at timesteps (C n,); chunk c uses conds[c] (or None)."""
        unet = model.unet
        kw: dict[str, Any] = {}
        ehs = [c["encoder_hidden_states"].expand(n, -1, -1) for c in conds if c is not None]
        if ehs:
            kw["encoder_hidden_states"] = torch.cat(ehs).to(unet.dtype)
        pooled = [c["text_embeds"].expand(n, -1) for c in conds if c is not None and "text_embeds" in c]
        if pooled:
            time_ids = (extra or {})["time_ids"]
            kw["added_cond_kwargs"] = {
                "text_embeds": torch.cat(pooled).to(unet.dtype),
                "time_ids": time_ids.to(device=x.device, dtype=unet.dtype).expand(x.shape[0], -1),
            }
        return unet(x.to(unet.dtype), timesteps, **kw, return_dict=False)[0].to(torch.float32)


UNET = UNetFamily()


def _clip(tok: Any, enc: Any, prompt: str, device: Any, hidden: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states or None, pooled / projected output) of one CLIP encoder for one prompt."""
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(device)  # fmt: skip
    out = enc(ids, output_hidden_states=hidden)
    return (out.hidden_states[-2] if hidden else None), out[0] if hidden else out.pooler_output


def _t5(tok: Any, enc: Any, prompt: str, device: Any, max_len: int, dim: int) -> torch.Tensor:
    """T5 states (1, max_len, D) of one prompt; zeros of the joint width without a T5 encoder (SD3 allows that)."""
    if enc is None:
        return torch.zeros(1, max_len, dim, device=device)
    ids = tok(prompt, padding="max_length", max_length=max_len, truncation=True, add_special_tokens=True,
              return_tensors="pt").input_ids.to(device)  # fmt: skip
    return enc(ids)[0]


def sd3_context(h1: torch.Tensor, p1: torch.Tensor, h2: torch.Tensor, p2: torch.Tensor, t5: torch.Tensor,
                dim: int) -> dict[str, torch.Tensor]:  # fmt: skip
    """SD3's conditioning from its encoders' outputs (as StableDiffusion3Pipeline builds it): the two CLIP states
    side by side, padded (or cut) to the joint width, then the T5 states; the two pooled outputs side by side."""
    clip = torch.nn.functional.pad(torch.cat([h1, h2], -1), (0, dim - h1.shape[-1] - h2.shape[-1]))
    return {"encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], -2),
            "pooled_projections": torch.cat([p1, p2], -1)}  # fmt: skip


class FlowFamily:
    """What the flow-matching transformers share: the velocity on the rectified-flow path (`compose.to_eps`
    "flow"), the network time 1000 t, and the scheduler's own grid (FlowMatchEuler's sigmas with its shift or
    dynamic shifting, `default_sigmas`)."""

    default_max_sequence_length = 256

    def timestep(self, schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
        return schedule.timestep(t)

    def native_size(self, model: ComposeModel, f: int) -> int:
        return int(getattr(model.network.config, "sample_size", 128)) * f

    def image_seq_len(self, model: ComposeModel, shape: tuple) -> int:
        raise NotImplementedError

    def default_sigmas(self, model: ComposeModel, steps: int, shape: tuple, given: Any = None) -> torch.Tensor:
        """The (steps,) sigmas (= t) the checkpoint's own pipeline samples at (shift / dynamic shift applied).

        `given`: the user's `sigmas=` (without a trailing 0); they go through the scheduler's shift once, as in
        diffusers' `set_timesteps(sigmas=...)`, so the same argument gives the same grid in both pipelines."""
        import copy

        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        sched = copy.deepcopy(model.scheduler)
        cfg = sched.config
        kw: dict[str, Any] = {}
        if cfg.get("use_dynamic_shifting", False):
            kw["mu"] = calculate_shift(self.image_seq_len(model, shape), cfg.get("base_image_seq_len", 256),
                                       cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                       cfg.get("max_shift", 1.15))  # fmt: skip
        if given is not None:
            kw["sigmas"] = np.asarray(given, dtype=np.float64)
            sched.set_timesteps(**kw)
        elif self.linear_sigmas:
            kw["sigmas"] = np.linspace(1.0, 1.0 / steps, steps)
            sched.set_timesteps(**kw)
        else:
            sched.set_timesteps(steps, **kw)
        return torch.as_tensor(sched.sigmas[:-1], dtype=torch.float64)


class SD3Family(FlowFamily):
    """Stable Diffusion 3 / 3.5 (`SD3Transformer2DModel`): CLIP-L and CLIP-G penultimate states and pooled
    projections, T5 states (zeros without `text_encoder_3`), latents (n, C, h, w) patched by the transformer."""

    linear_sigmas = False  # SD3's pipeline lets the scheduler place its sigmas

    @torch.no_grad()
    def encode(self, model: ComposeModel, prompt: str | None, device: Any, zero: bool = False,
               max_sequence_length: int | None = None) -> dict[str, Any]:  # fmt: skip
        prompt = prompt or ""
        h1, p1 = _clip(model.tokenizer, model.text_encoder, prompt, device, hidden=True)
        h2, p2 = _clip(model.tokenizer_2, model.text_encoder_2, prompt, device, hidden=True)
        dim = model.transformer.config.joint_attention_dim
        t5 = _t5(model.tokenizer_3, model.text_encoder_3, prompt, device,
                 max_sequence_length or self.default_max_sequence_length, dim)  # fmt: skip
        return sd3_context(h1, p1, h2, p2, t5, dim)

    def latent_shape(self, model: ComposeModel, n: int, height: int, width: int, f: int) -> tuple:
        return (n, model.transformer.config.in_channels, height // f, width // f)

    def size_multiple(self, model: ComposeModel, f: int) -> int:
        return f * model.transformer.config.patch_size

    def image_seq_len(self, model: ComposeModel, shape: tuple) -> int:
        p = model.transformer.config.patch_size
        return (shape[-2] // p) * (shape[-1] // p)

    def unpack(self, model: ComposeModel, x: torch.Tensor, height: int, width: int, f: int) -> torch.Tensor:
        return x

    def forward(self, model: ComposeModel, x: torch.Tensor, timesteps: torch.Tensor, conds: list, n: int,
                extra: dict | None = None) -> torch.Tensor:  # fmt: skip
        net = model.transformer
        ehs = torch.cat([c["encoder_hidden_states"].expand(n, -1, -1) for c in conds]).to(net.dtype)
        pooled = torch.cat([c["pooled_projections"].expand(n, -1) for c in conds]).to(net.dtype)
        out = net(hidden_states=x.to(net.dtype), timestep=timesteps, encoder_hidden_states=ehs,
                  pooled_projections=pooled, return_dict=False)[0]  # fmt: skip
        return out.to(torch.float32)


class FluxFamily(FlowFamily):
    """Flux.1 dev / schnell (`FluxTransformer2DModel`): CLIP pooled output, T5 states, packed 2x2 latents
    (n, h w / 4, 4 C) with image / text position ids, and (dev) the guidance-distilled embedding: every term's rows
    carry `guidance_scale` with no unconditional pass; true CFG with a negative prompt (`true_cfg_scale`) adds one."""

    linear_sigmas = True  # FluxPipeline passes sigmas = linspace(1, 1 / N, N) and a dynamic shift
    default_max_sequence_length = 512

    @torch.no_grad()
    def encode(self, model: ComposeModel, prompt: str | None, device: Any, zero: bool = False,
               max_sequence_length: int | None = None) -> dict[str, Any]:  # fmt: skip
        prompt = prompt or ""
        _, pooled = _clip(model.tokenizer, model.text_encoder, prompt, device, hidden=False)
        states = _t5(model.tokenizer_2, model.text_encoder_2, prompt, device,
                     max_sequence_length or self.default_max_sequence_length, 0)  # fmt: skip
        return {"encoder_hidden_states": states, "pooled_projections": pooled}

    def latent_shape(self, model: ComposeModel, n: int, height: int, width: int, f: int) -> tuple:
        h, w = 2 * (height // (2 * f)), 2 * (width // (2 * f))
        return (n, (h // 2) * (w // 2), model.transformer.config.in_channels)

    def size_multiple(self, model: ComposeModel, f: int) -> int:
        return 2 * f

    def image_seq_len(self, model: ComposeModel, shape: tuple) -> int:
        return shape[1]

    def unpack(self, model: ComposeModel, x: torch.Tensor, height: int, width: int, f: int) -> torch.Tensor:
        from diffusers import FluxPipeline

        return FluxPipeline._unpack_latents(x, height, width, f)

    def img_ids(self, height: int, width: int, f: int, device: Any) -> torch.Tensor:
        from diffusers import FluxPipeline

        h, w = 2 * (height // (2 * f)), 2 * (width // (2 * f))
        return FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, torch.float32)

    def forward(self, model: ComposeModel, x: torch.Tensor, timesteps: torch.Tensor, conds: list, n: int,
                extra: dict | None = None) -> torch.Tensor:  # fmt: skip
        net, extra = model.transformer, extra or {}
        ehs = torch.cat([c["encoder_hidden_states"].expand(n, -1, -1) for c in conds]).to(net.dtype)
        pooled = torch.cat([c["pooled_projections"].expand(n, -1) for c in conds]).to(net.dtype)
        guidance = None
        if net.config.guidance_embeds:
            guidance = torch.full((x.shape[0],), float(extra.get("guidance", 3.5)), device=x.device)
        txt_ids = torch.zeros(conds[0]["encoder_hidden_states"].shape[1], 3, device=x.device, dtype=net.dtype)
        out = net(hidden_states=x.to(net.dtype), timestep=timesteps / 1000, guidance=guidance,
                  pooled_projections=pooled, encoder_hidden_states=ehs, txt_ids=txt_ids,
                  img_ids=extra["img_ids"].to(device=x.device, dtype=net.dtype), return_dict=False)[0]  # fmt: skip
        return out.to(torch.float32)


SD3 = SD3Family()
FLUX = FluxFamily()


class _UncondMarker(str):
    """The prompt of the unconditional branch (a distinct object, so no user prompt is mistaken for it)."""


UNCOND = _UncondMarker("")


class Leaf:
    """A leaf of the compose expression: one term (checkpoint, prompt); the core only needs `schedule` and `name`."""

    def __init__(self, schedule: NoiseSchedule, name: str, model: ComposeModel | None, prompt: str | None,
                 adapter: Any = None):  # fmt: skip
        self.schedule = schedule
        self.name = name
        self.model = model
        self.prompt = prompt
        self.adapter = adapter  # its LoRA on the model's network (pipelines.lora; None: the network as it is)
        self.model_schedule = model.schedule if model is not None else None

    @property
    def unconditional(self) -> bool:
        return self.prompt is UNCOND

    def __repr__(self) -> str:
        return f"<term {self.name}>"


class NetworkGroups:
    """The rows of every step, grouped by network: one batched call per distinct network.

    core: the expression's leaves in the core's order; their predictions are returned in that order. terms: the term
    leaves in the order the rows are batched. extra: the per-checkpoint unconditional rows, averaged into the
    expression's one unconditional leaf (index `u_index` of core; its `model` is None). conds: id(leaf) ->
    conditioning; call_extra: keyword arguments every network call of the family gets (SDXL's time ids). routing
    (`pipelines.lora.Routing`, or None): the LoRA adapter of every row (`Leaf.adapter`) is set for each call by
    `routing.context`, so the terms of one base network stay in one call whatever their LoRA (`routing.split`: one
    call per network and adapter instead).
    """

    def __init__(self, core: list[Leaf], terms: list[Leaf], extra: list[Leaf], conds: dict, u_index: int | None,
                 call_extra: dict | None = None, routing: Any = None) -> None:  # fmt: skip
        self.leaves = [*core, *extra]
        self.num_core = len(core)
        self.u_index = u_index
        self.call_extra = call_extra
        self.routing = routing
        self.groups: list[dict] = []
        for leaf in terms + extra:
            key = leaf.adapter if routing is not None and routing.split else None
            g = next((g for g in self.groups if g["net"] is leaf.model.network and g["key"] == key), None)
            if g is None:
                g = {"net": leaf.model.network, "model": leaf.model, "parts": [], "key": key}
                self.groups.append(g)
            g["parts"].append(leaf)
        for g in self.groups:
            g["conds"] = [conds.get(id(leaf)) for leaf in g["parts"]]

    def predict(self, x: torch.Tensor, t: Any, schedule: NoiseSchedule, *, zeta: torch.Tensor | None = None,
                divergence: str | None = None, fd_e: float = 0.0) -> tuple[torch.Tensor, Any]:  # fmt: skip
        """eps_hat (L, n, ...) of the core's leaves at (x, t) and, with probes zeta (K, n, ...), div_x eps_hat (L, n).

        One network call per group (per probe for forward-mode JVPs). The unconditional leaf is the mean over its
        rows; its divergence is left at 0 since no operator reads its log q. At alpha = 0 (t = 1 of a flow path) a
        third element, the data predictions x0_hat (L, n, ...), which the step from there needs; no divergence is
        computed there (the step moves every log q alike).
        """
        L, n = len(self.leaves), x.shape[0]
        index = {id(leaf): i for i, leaf in enumerate(self.leaves)}
        t64 = torch.as_tensor(t, dtype=torch.float64).detach().cpu()
        need_x0 = float(schedule.alpha(t64)) == 0.0
        if need_x0:
            zeta = divergence = None
        eps = torch.zeros((L, *x.shape), dtype=torch.float32, device=x.device)
        x0 = torch.zeros_like(eps) if need_x0 else None
        counts = torch.zeros(L, dtype=torch.float32)
        div = torch.zeros(L, n, dtype=torch.float64, device=x.device) if zeta is not None else None
        K = 0 if zeta is None else zeta.shape[0]
        for g in self.groups:
            model, family = g["model"], g["model"].family
            xs, tins, chunks, conds = [], [], [], []
            for leaf, cond in zip(g["parts"], g["conds"], strict=True):
                sch = leaf.model_schedule
                same = sch == schedule
                t_m = t64 if same else sch.t_from_log_snr(schedule.log_snr(t64))
                scale = 1.0 if same else float((sch.log_alpha(t_m) - schedule.log_alpha(t64)).exp())
                probe = divergence == "hutchinson_fd" and not leaf.unconditional and zeta is not None
                copies = [x] + ([x + fd_e * z for z in zeta] if probe else [])
                for j, xc in enumerate(copies):
                    xs.append(xc * scale)
                    chunks.append((index[id(leaf)], j, leaf, t_m, scale))
                    tins.append(family.timestep(sch, t_m))
                    conds.append(cond)
            X = torch.cat(xs)
            T = torch.cat([tt.reshape(1).expand(n) for tt in tins]).to(device=x.device, dtype=torch.float32)

            def fn(Xin: torch.Tensor, model=model, family=family, T=T, conds=conds, chunks=chunks) -> torch.Tensor:
                pred = family.forward(model, Xin, T, conds, n, self.call_extra)
                out = []
                for c, (li, j, leaf, t_m, _) in enumerate(chunks):
                    rows, kind = slice(c * n, (c + 1) * n), leaf.model.prediction_type
                    out.append(compose.to_eps(pred[rows], Xin[rows], t_m, leaf.model_schedule, kind))
                    if need_x0 and j == 0:  # x0 is the same data in every parametrisation (equal SNR)
                        x0[li] += to_x0(pred[rows], Xin[rows], t_m, leaf.model_schedule, kind)
                return torch.cat(out)

            with self._adapters(g["net"], [c[2].adapter for c in chunks], n):  # set outside the JVP's transform
                if divergence == "hutchinson" and zeta is not None:
                    E = None
                    math_attention = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)
                    with math_attention, forward_ad_ready(g["net"]):
                        for k in range(K):
                            tangent = torch.cat(
                                [torch.zeros_like(x) if lf.unconditional else zeta[k] * s for (_, _, lf, _, s) in
                                 chunks]
                            )  # fmt: skip
                            out, jv = torch.func.jvp(fn, (X,), (tangent,))
                            E = out if E is None else E
                            for c, (li, _, lf, _, _) in enumerate(chunks):
                                if not lf.unconditional:
                                    jvc = jv[c * n : (c + 1) * n]
                                    div[li] += (zeta[k] * jvc).reshape(n, -1).sum(-1).to(torch.float64) / K
                else:
                    E = fn(X)
            for c, (li, j, _, _, _) in enumerate(chunks):
                Ec = E[c * n : (c + 1) * n]
                if j == 0:
                    eps[li] += Ec
                    counts[li] += 1
                    base = Ec
                else:
                    diff = (zeta[j - 1] * (Ec - base)).reshape(n, -1).sum(-1)
                    div[li] += diff.to(torch.float64) / (fd_e * K)
        scale = counts.clamp_min(1).to(eps.device).reshape(L, *([1] * x.ndim))
        eps = eps / scale
        M = self.num_core
        eps_l, div_l = eps[:M].clone(), None if div is None else div[:M].clone()
        if self.u_index is not None:
            eps_l[self.u_index] = eps[M:].mean(0)
            if div_l is not None:
                div_l[self.u_index] = 0.0
        if not need_x0:
            return eps_l, div_l
        x0 = x0 / scale
        x0_l = x0[:M].clone()
        if self.u_index is not None:
            x0_l[self.u_index] = x0[M:].mean(0)
        return eps_l, div_l, x0_l

    def _adapters(self, net: Any, specs: list, n: int):
        """The LoRA adapter state of one call (chunk c of n rows under specs[c]); nothing without routing."""
        if self.routing is None:
            return contextlib.nullcontext()
        return self.routing.context(net, specs, n)


@contextlib.contextmanager
def forward_ad_ready(module: torch.nn.Module):
    """Make `module` safe for forward-mode AD (`torch.func.jvp`) while the context is open.

    torch's forward-AD rule for group_norm views its tangent, which fails ("view size is not compatible ...") when
    the tangent arrives non-contiguous, as it does in diffusers' attention blocks of UNet2DModel for batches > 1.
    A pre-hook hands every GroupNorm a contiguous copy (primal and tangent); the hooks are removed on exit.
    """

    def contiguous_input(_mod, args):
        return (args[0].clone(memory_format=torch.contiguous_format), *args[1:])

    hooks = [
        m.register_forward_pre_hook(contiguous_input) for m in module.modules() if isinstance(m, torch.nn.GroupNorm)
    ]
    try:
        yield module
    finally:
        for h in hooks:
            h.remove()


__all__ = ["COMPONENTS", "ComposeModel", "FluxFamily", "Leaf", "NetworkGroups", "SD3Family", "UNCOND", "UNetFamily",
           "forward_ad_ready"]  # fmt: skip
