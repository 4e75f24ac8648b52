"""Model families as adapters: what one kind of checkpoint adds to the shared sampler (CONTRIBUTING.md).

`compose` owns the mathematics and the one sampling loop; `pipelines.batching` batches the rows of every step into
one call per network; `ComposePipeline` owns the call's I/O. A family answers everything else about its checkpoints:
how a prompt becomes conditioning, how its network is called, the shape of its state, its default grid and what its
guidance means. `Family` declares every member once (with its default); a family is one subclass that overrides
what differs, registered under the class names of its networks (`register`, `family_of`). The pipeline asks a
checkpoint's family (`ComposeModel.family`) and never tests which family it has.

Registered: `UNetFamily` (Stable Diffusion 1.x / 2.x and SDXL `UNet2DConditionModel`s, pixel-space `UNet2DModel`s),
`SD3Family` (`SD3Transformer2DModel`) and `FluxFamily` (`FluxTransformer2DModel`). CONTRIBUTING.md ("Adding a model
family") walks through a new one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from compose.options import SCHEDULER_GRID
from compose.predictions import scheduler_prediction_type
from compose.schedule import NoiseSchedule

COMPONENTS = (
    "unet",
    "scheduler",
    "vae",
    "text_encoder",
    "tokenizer",
    "text_encoder_2",
    "tokenizer_2",
    "transformer",
    "text_encoder_3",
    "tokenizer_3",
)


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
        return scheduler_prediction_type(self.scheduler)

    @property
    def is_text(self) -> bool:
        return self.text_encoder is not None or self.text_encoder_2 is not None

    @property
    def network(self) -> Any:
        return self.unet if self.unet is not None else self.transformer

    @property
    def family(self) -> Family:
        """The family of this checkpoint's network (`family_of`)."""
        return family_of(self.network, unet=self.unet is not None)

    def components(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in COMPONENTS}


class Family:
    """What one kind of checkpoint adds to the shared sampler. Every member is documented here; a family overrides
    the ones that differ (`encode`, `forward`, `latent_shape`, `size_multiple` and `native_size` have no default).

    Arguments shared by the members: `model` is the `ComposeModel` (its network, scheduler and text components);
    `f` the VAE's scale factor (1 without a VAE); `n` the rows of one chunk (images x particles).

    Attributes:
        network_classes: the class names of the networks it serves: its keys in the registry (`register`); a
            subclass of a registered class finds its base's family.
        lora_prefix: the key prefix of its denoiser's LoRA files ("unet", "transformer"), `pipelines.lora`.
        scheduler_grid: it samples by default on its scheduler's own sigmas (`default_sigmas`; the grid
            `compose.options.SCHEDULER_GRID`), as its diffusers pipeline does; otherwise on compose's log-SNR grid.
        default_max_sequence_length: its T5 prompt length (None: no T5 encoder).
    """

    network_classes: tuple[str, ...] = ()
    lora_prefix = "unet"
    scheduler_grid = False
    default_max_sequence_length: int | None = None

    # ---------------------------------------------------------------- conditioning (once per call and prompt)
    def encode(
        self,
        model: ComposeModel,
        prompt: str | None,
        device: Any,
        zero: bool = False,
        max_sequence_length: int | None = None,
    ) -> dict[str, Any]:
        """The conditioning of one prompt (tensors with a batch of one), as `forward` takes it; zero: all zeros (the
        unconditional branch where `zeros_for_empty_negative`)."""
        raise NotImplementedError

    def zeros_for_empty_negative(self, model: ComposeModel) -> bool:
        """Whether the unconditional branch without a negative prompt is zeros rather than the empty prompt's
        encoding (SDXL's force_zeros_for_empty_prompt)."""
        return False

    def guidance(self, guidance_scale: float | None, true_cfg_scale: float, text: bool) -> tuple[float, float | None]:
        """What a call's guidance arguments mean: (classifier-free guidance scale, embedded guidance or None).

        Default: guidance_scale is classifier-free guidance (7.5 when a term's checkpoint has a text encoder (`text`),
        else 1) and true_cfg_scale is refused. Guidance-distilled families embed guidance_scale instead."""
        if true_cfg_scale != 1.0:
            raise ValueError(
                f"true_cfg_scale={true_cfg_scale} is Flux's (its guidance_scale is embedded); for this checkpoint "
                "classifier-free guidance is guidance_scale. Drop true_cfg_scale."
            )
        if guidance_scale is None:
            guidance_scale = 7.5 if text else 1.0
        return float(guidance_scale), None

    def call_inputs(
        self, model: ComposeModel, height: int, width: int, f: int, device: Any, guidance: float | None
    ) -> dict[str, Any]:
        """The inputs every network call of one pipeline call gets besides the rows and the conditioning (`forward`'s
        `extra`): size ids, position ids, the embedded guidance (`guidance`, from `guidance()`)."""
        return {}

    # ---------------------------------------------------------------- the network call (once per step)
    def forward(
        self,
        model: ComposeModel,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        conds: list,
        n: int,
        extra: dict | None = None,
    ) -> torch.Tensor:
        """ONE batched network call: the raw output (float32) for rows x (C n, ...) at timesteps (C n,), made of C
        chunks of n rows, chunk c conditioned by conds[c] (an `encode` result, or None for an unconditional
        network); extra: `call_inputs`. The rows are the terms that share the network, the unconditional branch
        and the probe points of the divergence (`pipelines.batching.NetworkGroups`)."""
        raise NotImplementedError

    def timestep(self, schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
        """The network's timestep input at time t of its own schedule."""
        return schedule.timestep(t)

    # ---------------------------------------------------------------- the state
    def latent_shape(self, model: ComposeModel, n: int, height: int, width: int, f: int) -> tuple:
        """The shape of n states as the sampler holds them (the network's input; packed where the family packs
        its latents), for images of height x width pixels."""
        raise NotImplementedError

    def size_multiple(self, model: ComposeModel, f: int) -> int:
        """Heights and widths must be multiples of this (the VAE's factor times the network's downsampling)."""
        raise NotImplementedError

    def native_size(self, model: ComposeModel, f: int) -> int:
        """The image side it was trained at (the default height and width)."""
        raise NotImplementedError

    def unpack(self, model: ComposeModel, x: torch.Tensor, height: int, width: int, f: int) -> torch.Tensor:
        """The states as the VAE decodes them (n, C, h, w): the inverse of the family's packing (default: none)."""
        return x

    # ---------------------------------------------------------------- the grid
    def default_sigmas(self, model: ComposeModel, steps: int, shape: tuple, given: Any = None) -> torch.Tensor:
        """(steps,) the scheduler's own sigmas (= t) for a `scheduler_grid` family; given: the user's `sigmas=`,
        through the scheduler's shift once. Families without a grid of their own refuse."""
        raise ValueError(
            f"schedule={SCHEDULER_GRID!r} (a checkpoint's own scheduler sigmas) applies to SD3 / Flux checkpoints; "
            f"checkpoint {model.name!r} samples on the grids of compose.GRIDS, a schedule file, or timesteps=."
        )


FAMILIES: dict[str, Family] = {}  # network class name -> its family


def register(family: Family) -> Family:
    """Add a family to the registry under the class names of its networks (`Family.network_classes`)."""
    for name in family.network_classes:
        if name in FAMILIES and FAMILIES[name] is not family:
            raise ValueError(f"network class {name!r} already has a family ({type(FAMILIES[name]).__name__}).")
        FAMILIES[name] = family
    return family


def family_of(network: Any, unet: bool = False) -> Family:
    """The family of a network: the registered family of its class or of its nearest registered base class. A
    network of no registered class given as `unet=` is called as a UNet (`UNetFamily`: a UNet2DModel-like module);
    any other is refused."""
    for cls in type(network).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    if unet:
        return UNET
    raise ValueError(
        f"network {type(network).__name__} has no model family; registered: {sorted(FAMILIES)}. Add one (see "
        "CONTRIBUTING.md, 'Adding a model family')."
    )


class UNetFamily(Family):
    """SD 1.x / 2.x and SDXL (`UNet2DConditionModel`, cross-attention on CLIP states; SDXL adds pooled text embeds
    and size ids) and pixel-space `UNet2DModel`s (no conditioning). The state is the VAE latent (or the image) as
    the network takes it."""

    network_classes = ("UNet2DConditionModel", "UNet2DModel")
    lora_prefix = "unet"

    @staticmethod
    def is_xl(model: ComposeModel) -> bool:
        """SDXL-style: pooled text embeds and size ids as added conditioning."""
        return model.unet is not None and getattr(model.unet.config, "addition_embed_type", None) == "text_time"

    @torch.no_grad()
    def encode(
        self,
        model: ComposeModel,
        prompt: str | None,
        device: Any,
        zero: bool = False,
        max_sequence_length: int | None = None,
    ) -> dict[str, Any]:
        """Conditioning of one prompt: {"encoder_hidden_states": (1, S, D)} (+ "text_embeds" (1, P) for SDXL)."""
        encoders = [(model.tokenizer, model.text_encoder), (model.tokenizer_2, model.text_encoder_2)]
        encoders = [(tok, enc) for tok, enc in encoders if enc is not None]
        xl = self.is_xl(model)
        hidden, pooled = [], None
        for tok, enc in encoders:
            if tok is None:
                raise ValueError(f"checkpoint {model.name!r} has a text encoder but no tokenizer; pass tokenizer=.")
            ids = tok(
                prompt or "",
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            if xl:
                out = enc(ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                pooled = out[0]  # the projected pooled output of the (last) encoder
            else:
                hidden.append(enc(ids)[0])
        cond = {"encoder_hidden_states": torch.cat(hidden, dim=-1)}
        if xl:
            if pooled is None or pooled.ndim != 2:
                raise ValueError(f"checkpoint {model.name!r} (SDXL-style) needs text_encoder_2 with a projection.")
            cond["text_embeds"] = pooled
        if zero:  # SDXL's force_zeros_for_empty_prompt for the unconditional branch
            cond = {k: torch.zeros_like(v) for k, v in cond.items()}
        return cond

    def zeros_for_empty_negative(self, model: ComposeModel) -> bool:
        return self.is_xl(model)

    def call_inputs(
        self, model: ComposeModel, height: int, width: int, f: int, device: Any, guidance: float | None
    ) -> dict[str, Any]:
        """SDXL's size ids (original size, crop (0, 0), target size), read by `forward` where a chunk has pooled
        text embeds."""
        return {"time_ids": torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)}

    def latent_shape(self, model: ComposeModel, n: int, height: int, width: int, f: int) -> tuple:
        return (n, model.network.config.in_channels, height // f, width // f)

    def size_multiple(self, model: ComposeModel, f: int) -> int:
        return f * 2 ** (len(model.network.config.block_out_channels) - 1)

    def native_size(self, model: ComposeModel, f: int) -> int:
        return model.network.config.sample_size * f

    def forward(
        self,
        model: ComposeModel,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        conds: list,
        n: int,
        extra: dict | None = None,
    ) -> torch.Tensor:
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


def _clip(tok: Any, enc: Any, prompt: str, device: Any, hidden: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states or None, pooled / projected output) of one CLIP encoder for one prompt."""
    ids = tok(
        prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    out = enc(ids, output_hidden_states=hidden)
    return (out.hidden_states[-2] if hidden else None), out[0] if hidden else out.pooler_output


def _t5(tok: Any, enc: Any, prompt: str, device: Any, max_len: int, dim: int) -> torch.Tensor:
    """T5 states (1, max_len, D) of one prompt; zeros of the joint width without a T5 encoder (SD3 allows that)."""
    if enc is None:
        return torch.zeros(1, max_len, dim, device=device)
    ids = tok(
        prompt,
        padding="max_length",
        max_length=max_len,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    ).input_ids.to(device)
    return enc(ids)[0]


def sd3_context(
    h1: torch.Tensor, p1: torch.Tensor, h2: torch.Tensor, p2: torch.Tensor, t5: torch.Tensor, dim: int
) -> dict[str, torch.Tensor]:
    """SD3's conditioning from its encoders' outputs (as StableDiffusion3Pipeline builds it): the two CLIP states
    side by side, padded (or cut) to the joint width, then the T5 states; the two pooled outputs side by side."""
    clip = torch.nn.functional.pad(torch.cat([h1, h2], -1), (0, dim - h1.shape[-1] - h2.shape[-1]))
    return {
        "encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], -2),
        "pooled_projections": torch.cat([p1, p2], -1),
    }


class FlowFamily(Family):
    """What the flow-matching transformers share: the velocity on the rectified-flow path (`compose.to_eps`
    "flow"), the network time 1000 t, and the scheduler's own grid (FlowMatchEuler's sigmas with its shift or
    dynamic shifting, `default_sigmas`)."""

    lora_prefix = "transformer"
    scheduler_grid = True
    default_max_sequence_length = 256
    linear_sigmas = False  # True: the grid's sigmas are linspace(1, 1 / N, N) before the shift (FluxPipeline)

    def native_size(self, model: ComposeModel, f: int) -> int:
        return int(getattr(model.network.config, "sample_size", 128)) * f

    def image_seq_len(self, model: ComposeModel, shape: tuple) -> int:
        """The transformer's image tokens for states of `shape` (the dynamic shift's input)."""
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
            kw["mu"] = calculate_shift(
                self.image_seq_len(model, shape),
                cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5),
                cfg.get("max_shift", 1.15),
            )
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

    network_classes = ("SD3Transformer2DModel",)

    @torch.no_grad()
    def encode(
        self,
        model: ComposeModel,
        prompt: str | None,
        device: Any,
        zero: bool = False,
        max_sequence_length: int | None = None,
    ) -> dict[str, Any]:
        prompt = prompt or ""
        h1, p1 = _clip(model.tokenizer, model.text_encoder, prompt, device, hidden=True)
        h2, p2 = _clip(model.tokenizer_2, model.text_encoder_2, prompt, device, hidden=True)
        dim = model.transformer.config.joint_attention_dim
        max_len = max_sequence_length or self.default_max_sequence_length
        t5 = _t5(model.tokenizer_3, model.text_encoder_3, prompt, device, max_len, dim)
        return sd3_context(h1, p1, h2, p2, t5, dim)

    def latent_shape(self, model: ComposeModel, n: int, height: int, width: int, f: int) -> tuple:
        return (n, model.transformer.config.in_channels, height // f, width // f)

    def size_multiple(self, model: ComposeModel, f: int) -> int:
        return f * model.transformer.config.patch_size

    def image_seq_len(self, model: ComposeModel, shape: tuple) -> int:
        p = model.transformer.config.patch_size
        return (shape[-2] // p) * (shape[-1] // p)

    def forward(
        self,
        model: ComposeModel,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        conds: list,
        n: int,
        extra: dict | None = None,
    ) -> torch.Tensor:
        net = model.transformer
        ehs = torch.cat([c["encoder_hidden_states"].expand(n, -1, -1) for c in conds]).to(net.dtype)
        pooled = torch.cat([c["pooled_projections"].expand(n, -1) for c in conds]).to(net.dtype)
        out = net(
            hidden_states=x.to(net.dtype),
            timestep=timesteps,
            encoder_hidden_states=ehs,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        return out.to(torch.float32)


class FluxFamily(FlowFamily):
    """Flux.1 dev / schnell (`FluxTransformer2DModel`): CLIP pooled output, T5 states, packed 2x2 latents
    (n, h w / 4, 4 C) with image / text position ids, and (dev) the guidance-distilled embedding: every term's rows
    carry `guidance_scale` with no unconditional pass; true CFG with a negative prompt (`true_cfg_scale`) adds one."""

    network_classes = ("FluxTransformer2DModel",)
    linear_sigmas = True  # FluxPipeline passes sigmas = linspace(1, 1 / N, N) and a dynamic shift
    default_max_sequence_length = 512

    @torch.no_grad()
    def encode(
        self,
        model: ComposeModel,
        prompt: str | None,
        device: Any,
        zero: bool = False,
        max_sequence_length: int | None = None,
    ) -> dict[str, Any]:
        prompt = prompt or ""
        _, pooled = _clip(model.tokenizer, model.text_encoder, prompt, device, hidden=False)
        max_len = max_sequence_length or self.default_max_sequence_length
        states = _t5(model.tokenizer_2, model.text_encoder_2, prompt, device, max_len, 0)
        return {"encoder_hidden_states": states, "pooled_projections": pooled}

    def guidance(self, guidance_scale: float | None, true_cfg_scale: float, text: bool) -> tuple[float, float | None]:
        """guidance_scale is embedded in every row (default 3.5); classifier-free guidance is true_cfg_scale."""
        embedded = 3.5 if guidance_scale is None else float(guidance_scale)
        return float(true_cfg_scale), embedded

    def call_inputs(
        self, model: ComposeModel, height: int, width: int, f: int, device: Any, guidance: float | None
    ) -> dict[str, Any]:
        """The image position ids of the packed latents and the embedded guidance."""
        from diffusers import FluxPipeline

        h, w = 2 * (height // (2 * f)), 2 * (width // (2 * f))
        img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, torch.float32)
        return {"img_ids": img_ids, "guidance": guidance}

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

    def forward(
        self,
        model: ComposeModel,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        conds: list,
        n: int,
        extra: dict | None = None,
    ) -> torch.Tensor:
        net, extra = model.transformer, extra or {}
        ehs = torch.cat([c["encoder_hidden_states"].expand(n, -1, -1) for c in conds]).to(net.dtype)
        pooled = torch.cat([c["pooled_projections"].expand(n, -1) for c in conds]).to(net.dtype)
        guidance = None
        if net.config.guidance_embeds:
            guidance = torch.full((x.shape[0],), float(extra.get("guidance", 3.5)), device=x.device)
        txt_ids = torch.zeros(conds[0]["encoder_hidden_states"].shape[1], 3, device=x.device, dtype=net.dtype)
        out = net(
            hidden_states=x.to(net.dtype),
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=ehs,
            txt_ids=txt_ids,
            img_ids=extra["img_ids"].to(device=x.device, dtype=net.dtype),
            return_dict=False,
        )[0]
        return out.to(torch.float32)


UNET = register(UNetFamily())
SD3 = register(SD3Family())
FLUX = register(FluxFamily())


__all__ = [
    "COMPONENTS",
    "FAMILIES",
    "FLUX",
    "SD3",
    "UNET",
    "ComposeModel",
    "Family",
    "FlowFamily",
    "FluxFamily",
    "SD3Family",
    "UNetFamily",
    "family_of",
    "register",
]
