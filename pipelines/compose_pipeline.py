"""`ComposePipeline`: compose prompts and checkpoints at sampling time inside diffusers.

The pipeline is thin (CONTRIBUTING.md): it maps prompts / checkpoints to the leaves of a `compose` expression, encodes
their conditioning once (`pipelines.families`), evaluates every network once per step on all of its rows (the terms
that use it, the unconditional branch of classifier-free guidance and, for `divergence="hutchinson_fd"`, the probe
points; `NetworkGroups`), and hands the rest to the one sampling loop, `compose.loop.run` (docs/MATH.md sections
3-5).

Terms. `prompt` is the list of things to compose, not a batch: one checkpoint and several prompts gives one term per
prompt; several checkpoints and one prompt (or none) gives one term per checkpoint; as many prompts as checkpoints
pairs them. Prompts are never parsed: "a cat and a dog" is one term. The number of images is
`num_images_per_prompt` (alias `batch_size`); every image is one sample of the composition.

Shared trajectory. The first checkpoint's scheduler defines the schedule of the trajectory x_t and the x0 clipping
(its `clip_sample` / `thresholding`). A checkpoint m with another schedule is evaluated at the time t_m with the same
log-SNR, on x_m = x alpha_m(t_m) / alpha(t) (the change of variables of `compose.OnSchedule`); its eps_hat is the
same noise in both. Predictions of every type (epsilon, sample, v_prediction, flow) go through `compose.to_eps`.

Cost. `num_inference_steps` = N is N network evaluations per term and image, as in diffusers: the last step lands on
the data with x0_hat (DDIM's step to sigma = 0). ODE steps with "hutchinson_fd" add one row per probe and term.

Guidance. With guidance_scale > 1 every text checkpoint adds an unconditional row (negative_prompt, or SDXL's zeros)
to its own network call; the expression's single unconditional leaf is the mean of those rows, and `compose.Guided`
puts CFG around the composed prediction. Its divergence is not computed (no operator reads its log q).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FluxTransformer2DModel,
    SchedulerMixin,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import compose
from compose import options as O
from compose.composer import Composer
from compose.grids import grid_from_diffusers, is_schedule_file, resolve_grid
from compose.loop import run
from compose.operators import Expr, named_operator
from compose.schedule_files import expression_keys
from compose.smc import ParticleHooks
from compose.solvers import X0Clip
from compose.verify import LiftSteering

from . import lora as lora_experts
from .batching import UNCOND, Leaf, NetworkGroups, forward_ad_ready
from .families import COMPONENTS, ComposeModel
from .loading import (
    MODELS_FILE,
    check_latent_spaces,
    own_class_name,
    read_models_file,
    share_components,
    short_name,
    write_diffusers_entry,
)
from .shipped import resolve_model
from .verify import (
    DEFAULT_LEVELS,
    RenoiseSteering,
    Verification,
    choose,
    renoise_lifts,
    steering_steps,
    tracked_lifts,
    verification_rows,
)

OPERATORS = O.OPERATORS
# the names of __call__'s locals that `_verify` reads (its context)
VERIFY_CONTEXT = (
    "sch",
    "leaves",
    "uncond",
    "conds",
    "lora_plan",
    "extra",
    "draws",
    "n",
    "term_index",
    "composer",
    "terms",
    "negative_prompt",
    "max_sequence_length",
)
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_IMAGES = 4096  # rows of one call (images x particles)
MAX_GUIDANCE = O.MAX_GUIDANCE


@dataclass
class ComposePipelineOutput(BaseOutput):
    """What `ComposePipeline.__call__` returns.

    images: PIL images, a (n, H, W, C) numpy array, a (n, C, H, W) tensor in [0, 1], or latents ("latent").
    kappa: (steps, n, K) float64 weights of the outermost operator (below the guidance) at every step; ones (K = 1)
        for a single term. operator="product_smc" folds the guidance into its product: K = terms + 1, the exponents
        times guidance_scale and 1 minus their sum for the unconditional row (fixed at every step).
    log_q: (n, T) float64 tracked log-density of every term (un-guided conditionals) at the end (the data).
    log_q_trace: (steps, n, T) float64 the same after every step (its last row is `log_q`); for "product_smc", the
        trace of the particle slot each image was drawn from (resampling may have replaced that slot's particle).
    timesteps: (steps + 1,) the grid in t (t in [0, 1], data at 0) of the shared schedule.
    node_kappa: operator path ("root", "root.0", ...) -> (steps, n, K) weights of every operator node.
    ess, num_resamples, log_weights (operator="product_smc" only): (steps - 1, n) effective sample size of every
        image's particles after every reweighted step (in particles, before resampling), (n,) resampling events per
        image, and (n, P) float64 final normalised log-weights of the P particles (the image is one particle drawn by
        them).
    evaluations (operator="product_smc" only): (n,) network evaluations per particle of every image (per term):
        num_inference_steps, plus langevin_steps for every Langevin rejuvenation.
    lift: (n, T) float64 every term's lift, log q_term - log q_ref in nats, for the kept image (`pipelines.verify`:
        "renoise" by default, or "tracked"); None with lift=None, or "tracked" without guidance.
    lift_scores, candidate (candidates > 1): (n, K) the score of every candidate (by score_rule), and (n,) which one
        each image kept (0 .. K-1).
    verification_rows: network rows per output image that the lift cost beyond sampling (every candidate's).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    kappa: torch.Tensor
    log_q: torch.Tensor
    timesteps: torch.Tensor | None = None
    node_kappa: dict = field(default_factory=dict)
    log_q_trace: torch.Tensor | None = None
    ess: torch.Tensor | None = None
    num_resamples: torch.Tensor | None = None
    log_weights: torch.Tensor | None = None
    evaluations: torch.Tensor | None = None
    lift: torch.Tensor | None = None
    lift_scores: torch.Tensor | None = None
    candidate: torch.Tensor | None = None
    verification_rows: int = 0


@dataclass(frozen=True)
class Sampler:
    """A call's sampler: solver, method, divergence estimate, probes, finite-difference step, x0 clipping."""

    solver: str
    method: str
    divergence: str
    probes: int
    fd_eps: float
    clip: X0Clip | None


@dataclass(frozen=True)
class Particles:
    """A call's particle options (operator="product_smc"), checked by `check`."""

    num_particles: int | None
    ess_threshold: float
    resample_window: tuple[float, float]
    langevin_steps: int
    langevin_step: float
    langevin_after: str

    def check(self, smc: bool, operator: Any, method: str) -> int:
        """ValueError for particle options without a particle operator (or bad ones with it); the particles per
        image (1 without particles)."""
        if smc:
            O.check_smc_options(self.num_particles, self.ess_threshold, self.resample_window, method)
            O.check_langevin_options(self.langevin_steps, self.langevin_step, self.langevin_after)
            return self.num_particles
        if self.num_particles is not None:
            raise ValueError(f"num_particles is used by operator='product_smc'; got operator={operator!r}.")
        if self.langevin_steps != 0:
            raise ValueError(
                f"langevin_steps is used by operator='product_smc' (Langevin moves of the particles); got "
                f"operator={operator!r}. Drop langevin_steps or use operator='product_smc' with num_particles."
            )
        return 1

    def hook_options(self) -> dict[str, Any]:
        """The keyword arguments of `compose.smc.ParticleHooks`."""
        return dict(
            ess_threshold=self.ess_threshold,
            resample_window=self.resample_window,
            langevin_steps=self.langevin_steps,
            langevin_step=self.langevin_step,
            langevin_after=self.langevin_after,
        )


class PipelineDraws:
    """`compose.loop.Draws` with diffusers' conventions: `randn_tensor` in float32, one generator or one per image
    (rows of one image drawn from its own generator, so an image does not depend on the others)."""

    def __init__(self, generator: Any, device: Any) -> None:
        self.generator, self.device = generator, device

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        return _randn_rows(like.shape, self.generator, self.device)

    def probes(self, k: int, like: torch.Tensor) -> torch.Tensor:
        return _rademacher((k, *like.shape), self.generator, self.device)

    def uniforms(self, n: int) -> torch.Tensor:
        return _uniform_rows(n, self.generator)

    def uniform_rows(self, rows: int) -> torch.Tensor:
        return _uniform_rows(rows, self.generator)


class ComposePipeline(DiffusionPipeline):
    """Compose prompts and checkpoints with the operators of `compose` (OR / AND / average / product), CFG around them.

    `from_pretrained` takes one id / path or a list of them; identical components are loaded once and checkpoints
    must share one latent space. The first checkpoint's components are the pipeline's registered components
    (`save_pretrained` / `from_pretrained` round trip as usual); further checkpoints live in `self.models`.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->unet->transformer->vae"
    # every component has a default (a checkpoint has a unet OR a transformer); listing them here is what makes
    # diffusers' from_pretrained load them as components rather than pass their model_index entries through
    _optional_components = list(COMPONENTS)
    _callback_tensor_inputs = ["latents", "log_q"]

    def __init__(
        self,
        unet: UNet2DConditionModel | UNet2DModel | None = None,
        scheduler: SchedulerMixin | None = None,
        vae: AutoencoderKL | None = None,
        text_encoder: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        text_encoder_2: PreTrainedModel | None = None,
        tokenizer_2: PreTrainedTokenizerBase | None = None,
        transformer: SD3Transformer2DModel | FluxTransformer2DModel | None = None,
        text_encoder_3: PreTrainedModel | None = None,
        tokenizer_3: PreTrainedTokenizerBase | None = None,
        max_sequence_length: int | None = None,
    ) -> None:
        """A UNet checkpoint (SD 1.x / 2.x, SDXL, pixel UNet2D) or a flow-matching transformer (SD3 / SD3.5, Flux) with
        its scheduler and text / latent components (a folder's other components, e.g. a safety checker or an
        IP-Adapter image encoder, are not loaded).
        max_sequence_length: the checkpoint's T5 prompt length (saved in model_index.json; a call's own value
        overrides it), for checkpoints trained with another than their family's default (SD3 256, Flux 512).

        The annotations are what diffusers' `from_pipe` matches a pipeline's models against (it moves a model only
        when its class is listed): `ComposePipeline.from_pipe(pipe)` takes a loaded StableDiffusion(XL)Pipeline,
        StableDiffusion3Pipeline or FluxPipeline's modules, the same objects, no copies."""
        super().__init__()
        # a component saved as absent comes back from model_index.json as [null, null]
        given = dict(
            unet=unet,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )
        comps = {k: None if isinstance(v, (list, tuple)) and not any(v) else v for k, v in given.items()}
        unet, transformer = comps["unet"], comps["transformer"]
        if (unet is None) == (transformer is None):
            raise ValueError("give one network: unet= (a UNet checkpoint) or transformer= (SD3 / Flux), not both.")
        self.register_modules(**comps)
        self.register_to_config(max_sequence_length=max_sequence_length)
        self._extra_models: list[ComposeModel] = []
        self._first_name: str | None = None

    # ------------------------------------------------------------------ models
    @property
    def models(self) -> list[ComposeModel]:
        """The composed checkpoints, first the pipeline's own registered components."""
        first = ComposeModel(
            name=self._first_name or short_name(getattr(self, "name_or_path", None), 0),
            **{k: getattr(self, k, None) for k in COMPONENTS},
        )
        return [first, *self._extra_models]

    @property
    def vae_scale_factor(self) -> int:
        vae = getattr(self, "vae", None)
        return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1

    @property
    def size_multiple(self) -> int:
        """Heights and widths must be multiples of this: the VAE's factor times the UNet's downsampling."""
        first = self.models[0]
        return first.family.size_multiple(first, self.vae_scale_factor)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> ComposePipeline:
        """Load one checkpoint or a list of them; shared components are loaded once.

        Each is a folder, the bare name of a shipped model ("shapes-text": `model_cards/shapes-text` from any
        working directory) or a hub id (owner/name); `pipelines.shipped.resolve_model` is the rule, the same for the
        batch jobs and the Space. Raises ValueError for a name that is none of these (naming the closest folders and
        the shipped names), for a malformed compose_models.json (entries outside the folder, cycles), and when the
        checkpoints do not share a latent space (VAE family, latent channels, scaling factor, sample size).
        """
        paths = pretrained_model_name_or_path
        if isinstance(paths, (list, tuple)):
            if len(paths) == 0:
                raise ValueError("pretrained_model_name_or_path is an empty list; give at least one id or path.")
            pipes = [cls.from_pretrained(p, **kwargs) for p in [resolve_model(p) for p in paths]]
            return cls._from_models([m for p in pipes for m in p.models])
        paths = resolve_model(paths)
        subs = read_models_file(paths) if os.path.isdir(paths) else None
        if subs is not None:
            return cls._from_models([m for s in subs for m in cls.from_pretrained(s, **kwargs).models])
        pipe = super().from_pretrained(paths, **kwargs)
        pipe._first_name = short_name(str(paths), 0)
        return pipe

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike) -> dict:
        """diffusers reads model_index.json through this (local folders and the hub): a folder saved for diffusers'
        custom-pipeline loading (`_class_name` ["compose_pipeline", "ComposePipeline"]) is read as this class's own,
        so `ComposePipeline.from_pretrained` neither runs the folder's module nor asks for trust_remote_code."""
        return own_class_name(super()._dict_from_json_file(json_file), cls.__name__)

    @classmethod
    def from_models(cls, models: list[ComposeModel]) -> ComposePipeline:
        """A pipeline over already loaded checkpoints (see `ComposeModel`)."""
        return cls._from_models(list(models))

    @classmethod
    def _from_models(cls, models: list[ComposeModel]) -> ComposePipeline:
        share_components(models)
        check_latent_spaces(models)
        names = [m.name for m in models]
        for i, m in enumerate(models):
            if names.count(m.name) > 1:
                m.name = f"{m.name}#{i}"
        first = models[0]
        pipe = cls(**{k: getattr(first, k) for k in COMPONENTS})
        pipe._first_name = first.name
        pipe._extra_models = list(models[1:])
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save as a diffusers folder; several checkpoints go to model_0/, model_1/, ... plus compose_models.json.
        LoRA experts are not saved (their files stay where they are): the base networks are written without them.

        A one-checkpoint folder is laid out as the hub's custom pipelines are: model_index.json's `_class_name` is
        ["compose_pipeline", "ComposePipeline"] and compose_pipeline.py imports the class, so both
        `ComposePipeline.from_pretrained(folder)` and `DiffusionPipeline.from_pretrained(folder,
        trust_remote_code=True)` load it."""
        if lora_experts.registry(self):
            with lora_experts.unloaded(self):
                return self.save_pretrained(save_directory, **kwargs)
        if not self._extra_models:
            super().save_pretrained(save_directory, **kwargs)
            if type(self) is ComposePipeline:  # diffusers' custom-pipeline layout: DiffusionPipeline loads it too
                write_diffusers_entry(save_directory)
            return
        import json

        os.makedirs(save_directory, exist_ok=True)
        subs = []
        for i, m in enumerate(self.models):
            sub = f"model_{i}"
            type(self)(**m.components()).save_pretrained(os.path.join(save_directory, sub), **kwargs)
            subs.append(sub)
        with open(os.path.join(save_directory, MODELS_FILE), "w") as fh:
            json.dump({"models": subs, "names": [m.name for m in self.models]}, fh, indent=2)

    def to(self, *args, **kwargs) -> ComposePipeline:
        """Move / cast every checkpoint's modules (diffusers `to` only knows the registered ones)."""
        super().to(*args, **kwargs)
        device, dtype = kwargs.get("device"), kwargs.get("dtype")
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            elif isinstance(a, (str, torch.device)):
                device = a
        for comp in self._extra_modules():
            comp.to(device=device, dtype=dtype)
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """diffusers' model offload for the registered components, plus a hook on every further checkpoint's modules.

        The further checkpoints' modules move to the accelerator when first called and back to the CPU when the call
        ends (`maybe_free_model_hooks`), so they are all resident during a call.
        """
        super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        from accelerate import cpu_offload_with_hook

        for comp in self._extra_modules():
            _, hook = cpu_offload_with_hook(comp, self._offload_device)
            self._all_hooks.append(hook)

    def _extra_modules(self) -> list[torch.nn.Module]:
        """The further checkpoints' modules that are not registered components (each once)."""
        seen = {id(c) for c in self.components.values() if c is not None}
        out = []
        for m in self._extra_models:
            for comp in m.components().values():
                if isinstance(comp, torch.nn.Module) and id(comp) not in seen:
                    seen.add(id(comp))
                    out.append(comp)
        return out

    # ------------------------------------------------------------------ LoRA experts (pipelines/lora.py)
    def load_lora_experts(
        self, experts: dict[str, str | os.PathLike], model: str | int | None = None, weight_name: str | None = None
    ) -> list[str]:
        """Attach LoRA fine-tunes of one checkpoint as named experts, to be composed with `lora=` in a call.

        experts: {name: source}, each source a folder holding `pytorch_lora_weights.safetensors` (or one .safetensors
        file), a .safetensors file, or a hub id; diffusers' LoRA format (kohya layouts are converted), read through
        diffusers / PEFT from safetensors only (pickles are refused). model: the checkpoint (name or index; default
        the first) whose network the LoRAs were trained on. Denoiser LoRAs only: a file that also trains the text
        encoder is refused. Loading the same name from the same source again does nothing. Returns the names.
        """
        return lora_experts.load_experts(self, experts, model=model, weight_name=weight_name)

    @property
    def lora_experts(self) -> dict[str, str]:
        """The loaded LoRA experts: name -> source."""
        return {name: e.source for name, e in lora_experts.registry(self).items()}

    def unload_lora_experts(self, names: list[str] | None = None) -> None:
        """Remove LoRA experts (default: all) from their networks."""
        lora_experts.unload_experts(self, names)

    # ------------------------------------------------------------------ inputs
    def _terms(self, prompt: Any, models: list[ComposeModel]) -> list[tuple[ComposeModel, str | None]]:
        if prompt is None:
            prompts: list = []
        elif isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, (list, tuple)) and all(p is None or isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            raise ValueError(f"prompt must be a string, a list of strings or None; got {type(prompt).__name__}.")
        M = len(models)
        if any(prompts) and not any(m.is_text for m in models):
            raise ValueError(
                f"prompt={prompt!r} was given but no checkpoint has a text encoder; use prompt=None (unconditional)."
            )
        if not prompts:
            pairs = [(m, "" if m.is_text else None) for m in models]
        elif M == 1:
            pairs = [(models[0], p) for p in prompts]
        elif len(prompts) == 1:
            pairs = [(m, prompts[0] if m.is_text else None) for m in models]
        elif len(prompts) == M:
            pairs = list(zip(models, prompts, strict=True))
        else:
            raise ValueError(
                f"prompt has {len(prompts)} entries for {M} checkpoints; give one prompt (used by every checkpoint), "
                f"one per checkpoint ({M}), or several prompts with a single checkpoint."
            )
        out = []
        for m, p in pairs:
            if not m.is_text and p:
                raise ValueError(
                    f"prompt {p!r} was given to checkpoint {m.name!r}, which has no text encoder; give it None."
                )
            out.append((m, (p or "") if m.is_text else None))
        if len(out) > 64:
            raise ValueError(f"prompt: {len(out)} terms; at most 64 can be composed in one call.")
        return out

    def check_inputs(
        self,
        *,
        operator,
        n_terms,
        weights,
        temperature,
        guidance_scale,
        method,
        solver,
        divergence,
        probes,
        fd_eps,
        output_type,
        height,
        width,
        num_inference_steps,
        timesteps,
        sigmas,
        negative_prompt,
        callback_on_step_end_tensor_inputs,
    ) -> None:
        """Every call argument checked once, before any network is called (ValueError naming it and the fix)."""
        record = None  # the named operator's record (None: no operator, or a callable)
        if operator is not None and not callable(operator):
            record = O.operator_record(operator)
            if n_terms < record.min_terms:
                raise ValueError(
                    f"operator={operator!r} needs at least {record.min_terms} terms (prompts or checkpoints); got "
                    f"{n_terms}. Give more prompts / checkpoints, or operator=None for a single term."
                )
        if operator is None and n_terms > 1:
            raise ValueError(
                f"operator is None but there are {n_terms} terms; choose how to compose them: one of {OPERATORS}."
            )
        if weights is not None:
            if record is None or not record.weights:
                names = " / ".join(repr(o.name) for o in O.OPERATOR_TABLE.values() if o.weights)
                raise ValueError(
                    f"weights are used by operator={names} (mixture weights, signed weights, exponents); got "
                    f"operator={operator!r}. For AND biases build the expression yourself (operator=callable)."
                )
            k = torch.as_tensor(weights).numel()
            if k != n_terms:
                raise ValueError(f"weights has {k} entries but there are {n_terms} terms; give one weight per term.")
        O.check_float(temperature, "temperature", 0.0, None, open_lo=True)
        if temperature != 1.0 and not callable(operator) and not (record is not None and record.temperature):
            names = " / ".join(repr(o.name) for o in O.OPERATOR_TABLE.values() if o.temperature)
            raise ValueError(
                f"temperature={temperature} is used by operator={names} only; got operator={operator!r}. Drop "
                "temperature."
            )
        if guidance_scale is not None:
            O.check_guidance(guidance_scale)
        O.check_method(method)
        O.check_solver(solver, method)
        O.check_divergence(divergence, O.HUTCHINSON)
        O.check_probes(probes)
        O.check_fd_eps(fd_eps)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not known; use one of {OUTPUT_TYPES}.")
        f = self.size_multiple
        native = self.models[0].family.native_size(self.models[0], self.vae_scale_factor)
        top = max(4096, 8 * native)
        for name, v in (("height", height), ("width", width)):
            if v is None:
                continue
            if not O.is_int(v) or not 0 < v <= top or v % f:
                raise ValueError(
                    f"{name} must be a positive multiple of {f} up to {top} (this model's native size is {native}); "
                    f"got {v!r}."
                )
        if timesteps is not None and sigmas is not None:
            raise ValueError("give timesteps= or sigmas=, not both.")
        if timesteps is None and sigmas is None and num_inference_steps is not None:
            O.check_steps(num_inference_steps)
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string or None; got {type(negative_prompt).__name__}.")
        bad = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs has {bad}; allowed are {self._callback_tensor_inputs}."
            )

    # ------------------------------------------------------------------ decoding
    def _decode(self, x0: torch.Tensor, output_type: str, height: int | None = None, width: int | None = None):
        if output_type == "latent":
            return x0
        first = self.models[0]
        x0 = first.family.unpack(first, x0, height, width, self.vae_scale_factor)  # Flux: packed 2x2 -> (n, C, h, w)
        vae = getattr(self, "vae", None)
        if vae is not None:
            z = x0 / vae.config.scaling_factor
            shift = getattr(vae.config, "shift_factor", None)
            if shift:
                z = z + shift
            image = vae.decode(z.to(vae.dtype), return_dict=False)[0].float()
        else:
            image = x0.float()
        processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        return processor.postprocess(image.detach().cpu(), output_type=output_type)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str | None] | None = None,
        operator: str | Callable[..., Any] | None = None,
        weights: Any = None,
        temperature: float = 1.0,
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        grid: str | None = None,
        schedule: str | None = None,
        solver: str = "euler",
        method: str = "sde",
        divergence: str = "hutchinson_fd",
        probes: int = 1,
        fd_eps: float = 1e-3,
        clip_sample: bool | None = None,
        clip_sample_range: float | None = None,
        thresholding: bool | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int | None = None,
        batch_size: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        num_particles: int | None = None,
        ess_threshold: float = 0.5,
        resample_window: tuple[float, float] = (0.0, 1.0),
        langevin_steps: int = 0,
        langevin_step: float = 0.5,
        langevin_after: str = "every",
        lora: str | list[str | None] | None = None,
        lora_mode: str | None = None,
        lora_uncond: str = "lora",
        lora_switch_steps: int = 5,
        lora_scale: float = 1.0,
        lora_calls: str = "batched",
        true_cfg_scale: float = 1.0,
        max_sequence_length: int | None = None,
        lift: str | None = "auto",
        lift_levels: tuple = DEFAULT_LEVELS,
        lift_draws: int = 1,
        candidates: int = 1,
        select: str = "lift",
        steer: float = 0.0,
        score_rule: str | None = None,
    ) -> ComposePipelineOutput | tuple:
        """Sample the composition of the terms (prompts x checkpoints).

        Args:
            prompt: the terms' prompts (a string, a list, or None for unconditional terms); never parsed.
            operator: "or" (SuperDiff mixture), "and" (equal densities), "average", "product" (Composable Diffusion;
                negative weights negate), a callable building a nested `compose` expression from the term leaves
                (e.g. `lambda a, b, c: compose.OR(compose.AND(a, b), c)`), or None for a single term; or
                "product_smc", the product of the terms sampled by particles (see num_particles below).
            weights: per-term weights for "or" (mixture weights), "product" (signed) and "product_smc" (exponents).
            temperature: OR temperature (1 samples the mixture).
            guidance_scale: classifier-free guidance around the composed prediction; 1 or below disables the
                unconditional branch. Default 7.5 when a checkpoint has a text encoder, else 1. For Flux (guidance-
                distilled) it is the embedded guidance of every term's rows (default 3.5; no unconditional pass).
            true_cfg_scale: Flux only: classifier-free guidance with negative_prompt in the same batched call (as
                FluxPipeline's true_cfg_scale); 1 (default) turns it off.
            max_sequence_length: the T5 prompt length of SD3 (default 256) and Flux (default 512).
            negative_prompt: the unconditional branch's prompt.
            num_inference_steps, timesteps, sigmas: the time grid: `num_inference_steps` network evaluations
                (default 50) on the grid named by `schedule`, or the first checkpoint's network `timesteps` (e.g.
                981, 961, ..., 1, one evaluation each) or its diffusers `sigmas` (sigma / alpha, or t for flow
                matching; a trailing 0 is allowed). Every grid ends with the step to the data (x0_hat of the last
                evaluation), so N steps cost N evaluations.
            schedule: the grid by name ("log_snr" (default), "uniform", "karras", "ays_sd15", "ays_sdxl"; see
                `compose.grids`) or the path of a learned JSON schedule file (`compose learn-schedule`),
                refused unless it was learned for these checkpoints, operator, solver, guidance and NFE (the
                message names the keys that differ); its network times and learned solver coefficients, where it
                has them, are used as learned. `grid` is an alias.
            solver: "euler" (first order in t), "ddim" (first order in sigma / alpha: with method="ode" DDIM with
                eta = 0 and EulerDiscreteScheduler's step, with "sde" Euler-Maruyama in sigma / alpha, SuperDiff's
                reference update), "dpm2m" (DPM-Solver++(2M)) or "unipc" (UniPC: the 2M predictor and the UniC
                corrector, no extra network call; it rebuilds each state from the previous one, so latents changed by
                `callback_on_step_end` move only the point where the networks are called); the last two with
                method="ode" only; see `compose.sample` for which operators stay exact.
            method: "sde" (Ito density estimator) or "ode" (probability-flow ODE, divergence estimate).
            divergence: for "ode": "hutchinson_fd" (default: finite differences with step fd_eps * sigma_t, the probe
                points batched into the main network call) or "hutchinson" (forward-mode JVPs, math attention;
                about 5x the cost of a call, see docs/benchmarks/tracking.md for their accuracy).
            probes: Hutchinson probes per step (shared across terms).
            clip_sample, clip_sample_range, thresholding: the x0 clipping of the composed prediction (diffusers'
                DDPM / DDIM semantics); None: the first checkpoint's scheduler config decides.
            num_images_per_prompt / batch_size: number of images (aliases).
            generator: one generator or one per image (initial noise, SDE noise, probes).
            latents: (n, C, h, w) standard normal initial noise (scaled by sigma at the first grid time).
            output_type: "pil", "np", "pt" or "latent".
            callback_on_step_end: callback(pipe, step, timestep, tensors) -> dict; may replace "latents" / "log_q".
            num_particles, ess_threshold, resample_window: for operator="product_smc" (the product of the terms,
                prod_i q_i^{w_i}, sampled with Feynman-Kac weights; `compose.PoE`): P particles per image, resampled
                (systematic) when their ESS drops below ess_threshold * P at a t_next inside resample_window. Particles
                of one image share prompts and go through the network in the same batched call, so a step costs P
                times the rows of one image. With guidance the exponents are guidance_scale * weights around the
                unconditional branch (eps_u + w sum_i w_i (eps_i - eps_u), as "product", plus the weights).
            langevin_steps, langevin_step, langevin_after: for operator="product_smc": Metropolis-adjusted Langevin
                moves that leave the current product target invariant (`compose.sample_smc`, resample-move), after
                every step ("every") or after a resampling ("resample"); each move is one more batched network call
                on the moved particles. 0 (default): none.
            lora: the terms' LoRA experts (`load_lora_experts`): a name for every term, or a list pairing the i-th
                term with the i-th name (None: the base network); one prompt on one checkpoint with a list of names
                gives one term per name. Every term of one base network, whatever its LoRA, and the unconditional
                rows go through it in ONE batched call per step, each row with its own LoRA (`pipelines.lora`).
            lora_uncond: the unconditional rows under guidance: "lora" (default: each LoRA's own, with its adapter,
                as diffusers and LoRA Composite do) or "base" (one row of the base network without LoRA).
            lora_mode: None (compose the LoRA terms with `operator`), or a baseline, operator None: "merge" (one
                network with the LoRAs merged, `weights` the merge weights, default 1; one prompt), "switch" (LoRA
                Switch: one LoRA active at a time, the next every `lora_switch_steps` steps) or "composite" (LoRA
                Composite: the average of each LoRA's guided prediction, mean_i [eps_u^i + w (eps_c^i - eps_u^i)]).
            lora_scale: multiplies every LoRA's update (diffusers' cross_attention_kwargs scale).
            lora_calls: "batched" (default: one call per base network) or "separate" (one call per network and LoRA,
                as LoRA Composite is published); "batched_loop" and "batched_peft" make the batched call add each
                row's LoRA update one adapter at a time or through PEFT's mixed adapter batch. The same numbers up to
                rounding, for timing comparisons.
            lift, lift_levels, lift_draws, candidates, select, steer, score_rule: density verification
                (`pipelines.verify`, docs/guides/verification.md): every image's per-term lift (`out.lift`) by
                `lift` ("auto", "renoise", "tracked" or None), the "renoise" lift read at the log-SNR `lift_levels`
                with `lift_draws` noise draws each; `candidates` K per image, of which `select` ("lift" or "random")
                keeps one by `score_rule` ("min", "zmin", "mean", "max"; default "max" for OR, else "min"); `steer`
                > 0 resamples the candidates by their lift along the way.
        """
        # 1. check inputs (everything, before any network call)
        models, first = self.models, self.models[0]
        terms = self._terms(prompt, models)
        lora_plan = lora_experts.plan(
            self,
            terms,
            lora,
            mode=lora_mode,
            uncond=lora_uncond,
            switch_steps=lora_switch_steps,
            scale=lora_scale,
            calls=lora_calls,
            operator=operator,
            weights=weights,
        )
        terms, operator, weights = lora_plan.terms, lora_plan.operator, lora_plan.weights
        self.check_inputs(
            operator=operator,
            n_terms=len(terms),
            weights=weights,
            temperature=temperature,
            guidance_scale=guidance_scale,
            method=method,
            solver=solver,
            divergence=divergence,
            probes=probes,
            fd_eps=fd_eps,
            output_type=output_type,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            timesteps=timesteps,
            sigmas=sigmas,
            negative_prompt=negative_prompt,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        max_sequence_length = max_sequence_length or self.config.get("max_sequence_length")
        # guidance_scale is the CFG scale from here on; a guidance-distilled family embeds its guidance instead
        guidance_scale, embedded_guidance = self._guidance(first, terms, guidance_scale, true_cfg_scale)
        smc = isinstance(operator, str) and O.operator_record(operator).particles
        particles = Particles(
            num_particles, ess_threshold, resample_window, langevin_steps, langevin_step, langevin_after
        )
        verification = Verification(lift, lift_levels, candidates, select, steer, score_rule, lift_draws)
        P = particles.check(smc, operator, method) * verification.check(smc, method, operator)  # rows per image
        schedule_name = self._schedule_name(grid, schedule, first.family)
        clip_options = dict(clip_sample=clip_sample, clip_sample_range=clip_sample_range, thresholding=thresholding)
        clip = X0Clip.from_config(first.scheduler.config, **clip_options)
        use_cfg = guidance_scale > 1.0
        verification.check_reference(use_cfg)
        n = self._num_images(num_images_per_prompt, batch_size, latents, P, generator)
        family, f = first.family, self.vae_scale_factor
        height, width, shape = self._sizes(first, n * P, height, width)
        device = self._execution_device
        self._check_latents(latents, shape, smc, P)

        # 2. terms -> leaves on the shared schedule, their conditioning (each prompt encoded once)
        sch = first.schedule
        leaves, uncond, conds = self.encode_terms(
            terms, use_cfg, negative_prompt, len(models), device, guidance_scale, max_sequence_length
        )
        uncond = lora_plan.attach(leaves, uncond, conds)  # each term's LoRA; the unconditional rows per lora_uncond

        # 3. the expression: operator over the terms, CFG around it (product_smc: the particles' PoE), its rows
        extra = family.call_inputs(first, height, width, f, device, embedded_guidance)
        expr, poe = self._composition(operator, leaves, weights, temperature, guidance_scale, smc)
        composer = Composer(expr, schedule=sch, method=method)
        groups, term_index = self._groups(composer.leaves, leaves, uncond, conds, extra, lora_plan)

        # 4. the grid
        ts, t_net, offsets = self.prepare_grid(
            sch, expr, schedule_name, num_inference_steps, timesteps, sigmas, method, solver, probes, smc, first, shape
        )

        # 5. initial latents and their log q
        if latents is None:
            latents = _randn_rows(shape, generator, device)  # randn_tensor's draws (by image with a list)
        x = latents.to(device=device, dtype=torch.float32) * float(sch.sigma(float(ts[0])))
        if smc:
            x = x / math.sqrt(poe.total_exponent)  # the product of M priors N(0, sigma^2) is N(0, sigma^2 / A)
        log_q = composer.initial_log_q(x, float(ts[0]))

        # 6. sample: one batched call per network and step, the maths in compose.loop.run
        draws = PipelineDraws(generator, device)
        ctx = {k: v for k, v in locals().items() if k in VERIFY_CONTEXT}  # what the verification reads of this call
        hooks = self._hooks(poe, particles, verification, operator, ctx, len(ts) - 1, P, x.device)
        callback = self._step_callback(callback_on_step_end, callback_on_step_end_tensor_inputs, sch)
        sampler = Sampler(solver, method, divergence, probes, fd_eps, clip)
        tr = self._run(composer, groups, x, (ts, t_net, offsets), log_q, sampler, draws, hooks, callback, lora_plan)

        # 7. every image's lifts and the candidate kept; decode (product_smc: one particle drawn by its weights)
        pick, verdict = (hooks.pick(draws.uniforms(n)), None) if smc else self._verify(verification, tr, operator, ctx)
        if isinstance(hooks, RenoiseSteering):  # the checks along the way cost rows too
            verdict = (*verdict[:3], verdict[3] + hooks.rows * P)
        images = self._decode(tr.x[pick.to(tr.x.device)], output_type, height, width)
        self.maybe_free_model_hooks()
        single = len(leaves) == 1 and not smc
        out = self._output(images, tr, term_index, n, P, pick, hooks if smc else None, single, verdict)
        return out if return_dict else (out.images, out.kappa, out.log_q)

    def _hooks(self, poe, particles, verification: Verification, operator, ctx: dict, num_steps, P, device) -> Any:
        """The loop's hooks: the particles of product_smc, the steering of the candidates (by the tracked lift, or by
        the renoise lift at a few steps: `pipelines.verify.RenoiseSteering`), or None."""
        n = ctx["n"]
        if poe is not None:
            return ParticleHooks(poe, ctx["sch"], n, P, device=device, **particles.hook_options())
        if not verification.steer:
            return None
        rule = verification.default_rule(operator)
        if verification.estimator == "renoise":
            groups, term_idx, ref_idx = self._verification_groups(ctx)
            at = steering_steps(num_steps)
            return RenoiseSteering(
                n,
                P,
                groups,
                ctx["sch"],
                verification.levels,
                term_idx,
                ref_idx,
                rule=rule,
                repeats=verification.draws,
                strength=verification.steer,
                at=at,
                device=device,
            )
        core, term_index = ctx["composer"].leaves, ctx["term_index"]
        u_index = next(i for i, lf in enumerate(core) if lf.model is None)
        refs = [u_index] * len(term_index)
        return LiftSteering(n, P, term_index, refs, rule=rule, strength=verification.steer, device=device)

    def _verify(self, v: Verification, tr, operator, ctx: dict) -> tuple[torch.Tensor, tuple]:
        """(the flat row of every image's kept candidate, (lift (n, T), scores (n, K) or None, candidate (n,) or None,
        verification rows per image)) after a run of n x K candidates (`pipelines.verify`)."""
        n, K = ctx["n"], v.candidates
        ctx["core"] = ctx["composer"].leaves
        rows = 0
        if v.estimator == "tracked":
            u_index = next((i for i, lf in enumerate(ctx["core"]) if lf.model is None), None)
            lifts = tracked_lifts(tr.log_q, ctx["term_index"], u_index)
        elif v.estimator == "renoise":
            groups, term_idx, ref_idx = self._verification_groups(ctx)
            held = (
                ctx["lora_plan"].routing.session()
                if ctx["lora_plan"].routing is not None
                else contextlib.nullcontext()
            )
            with held:
                lifts = renoise_lifts(groups, tr.x, ctx["sch"], v.levels, ctx["draws"], term_idx, ref_idx, v.draws)
            rows = v.rows_per_check * len(groups.leaves) * K
        else:
            lifts = None
        pick, scores = choose(lifts, n, K, v.select, v.default_rule(operator), ctx["draws"])
        kept = None if lifts is None else lifts[pick.to(lifts.device)]
        candidate = None if K == 1 else pick - K * torch.arange(n)
        return pick, (kept, scores, candidate, rows)

    def _verification_groups(self, ctx: dict) -> tuple[NetworkGroups, list, list]:
        """The rows of the "renoise" lift: every term and its reference, batched per network (`verification_rows`);
        the unconditional conditioning is encoded here when the call ran without guidance."""
        uncond, conds = ctx["uncond"], dict(ctx["conds"])
        if not uncond and any(lf.model.is_text for lf in ctx["leaves"]):
            _, uncond, more = self.encode_terms(
                ctx["terms"],
                True,
                ctx["negative_prompt"],
                len(self.models),
                self._execution_device,
                2.0,
                ctx["max_sequence_length"],
            )
            conds.update(more)
        rows, term_idx, ref_idx = verification_rows(ctx["leaves"], uncond, conds, ctx["lora_plan"])
        groups = NetworkGroups(rows, rows, [], conds, None, ctx["extra"], routing=ctx["lora_plan"].routing)
        return groups, term_idx, ref_idx

    # ------------------------------------------------------------------ the steps of __call__
    def _composition(self, operator, leaves, weights, temperature, guidance_scale, smc) -> tuple[Any, Any]:
        """(expression, PoE or None): the operator over the term leaves with CFG around it (guidance_scale > 1: an
        unconditional leaf, the mean of the checkpoints' unconditional rows), or for product_smc the particles'
        PoE (the exponents times guidance_scale around the unconditional leaf) and its product."""
        use_cfg = guidance_scale > 1.0
        u_leaf = Leaf(leaves[0].schedule, "uncond", None, UNCOND) if use_cfg else None
        if smc:
            a = torch.ones(len(leaves)) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
            poe = compose.PoE(*leaves, exponents=a * guidance_scale if use_cfg else a, unconditional=u_leaf)
            return poe.product, poe
        expr = self._expression(operator, leaves, weights, temperature)
        return (compose.Guided(expr, u_leaf, guidance_scale) if use_cfg else expr), None

    @staticmethod
    def _groups(core, leaves, uncond, conds, extra, lora_plan) -> tuple[Any, list[int]]:
        """(the row groups of every step, the index in `core` of every term leaf); core: the composer's leaves."""
        u_index = next((i for i, lf in enumerate(core) if lf.model is None), None)  # the unconditional leaf
        groups = NetworkGroups(core, leaves, uncond, conds, u_index, extra, routing=lora_plan.routing)
        groups = lora_plan.wrap(groups, core, leaves, uncond, conds, u_index)  # lora_mode="switch": one LoRA a step
        return groups, [next(i for i, lf in enumerate(core) if lf is leaf) for leaf in leaves]

    def _run(self, composer, groups, x, grid, log_q, sampler: Sampler, draws, hooks, callback, lora_plan):
        """The sampling loop (`compose.loop.run`) with one batched call per network and step (`groups.predict`);
        grid: (ts, learned network times or None, learned solver offsets or None). LoRA adapter states are set once
        for the run and restored after it (`Routing.session`)."""
        sch = composer.schedule
        ts, t_net, offsets = grid

        def predict(x_in: torch.Tensor, t: torch.Tensor, zeta: torch.Tensor | None):
            fd_e = sampler.fd_eps * float(sch.sigma(t))
            divergence = sampler.divergence if zeta is not None else None
            return groups.predict(x_in, t, sch, zeta=zeta, divergence=divergence, fd_e=fd_e)

        held = lora_plan.routing.session() if lora_plan.routing is not None else contextlib.nullcontext()
        with self.progress_bar(total=len(ts) - 1) as bar, held:
            return run(
                composer,
                predict,
                x,
                ts,
                log_q,
                solver=sampler.solver,
                draws=draws,
                probes=sampler.probes if sampler.method == "ode" else None,
                network_times=t_net,
                offsets=offsets,
                clip=sampler.clip,
                hooks=hooks,
                callback=callback,
                progress=bar.update,
            )

    def encode_terms(
        self,
        terms,
        use_cfg: bool,
        negative_prompt: str | None,
        num_models: int,
        device,
        guidance_scale: float,
        max_sequence_length: int | None = None,
    ) -> tuple[list[Leaf], list[Leaf], dict]:
        """The term leaves, the per-checkpoint unconditional leaves (with CFG) and id(leaf) -> conditioning."""
        sch = terms[0][0].schedule
        leaves = [Leaf(sch, _term_name(m, p, num_models), m, p) for m, p in terms]
        text_models = _unique([m for m, _ in terms if m.is_text])
        if use_cfg and not text_models:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs a text encoder (classifier-free guidance), but no checkpoint "
                "has one; use guidance_scale=1."
            )
        uncond = [Leaf(sch, f"uncond@{m.name}", m, UNCOND) for m in text_models] if use_cfg else []
        conds: dict[int, Any] = {}
        cache: dict[tuple, Any] = {}
        for leaf in [*leaves, *uncond]:
            m = leaf.model
            if not m.is_text:
                continue
            zero = leaf.unconditional and negative_prompt is None and m.family.zeros_for_empty_negative(m)
            text = negative_prompt if leaf.unconditional else leaf.prompt
            key = (id(m.text_encoder), id(m.text_encoder_2), text, zero)
            if key not in cache:
                cache[key] = m.family.encode(m, text, device, zero=zero, max_sequence_length=max_sequence_length)
            conds[id(leaf)] = cache[key]
        return leaves, uncond, conds

    def prepare_grid(
        self,
        sch,
        expr,
        schedule_name,
        num_inference_steps,
        timesteps,
        sigmas,
        method,
        solver,
        probes,
        smc,
        first,
        shape,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(grid ending at 0, learned network times or None, learned solver offsets or None). "scheduler": a
        flow-matching checkpoint's own sigmas (its shift / dynamic shift), as its diffusers pipeline samples."""
        t_net = offsets = None
        if schedule_name == O.SCHEDULER_GRID and timesteps is None and sigmas is None:
            steps = 50 if num_inference_steps is None else num_inference_steps
            ts = torch.cat([first.family.default_sigmas(first, steps, shape), torch.zeros(1, dtype=torch.float64)])
            ts = O.check_grid(ts, "the scheduler's sigmas")
        elif timesteps is None and sigmas is None:
            expect = {**expression_keys(expr), "solver": solver if method == "ode" else "sde", "schedule": repr(sch)}
            explicit = is_schedule_file(schedule_name)
            steps = 50 if num_inference_steps is None and not explicit else num_inference_steps
            hutch = probes if method == "ode" else None
            ts, t_net, offsets = resolve_grid(
                sch, schedule_name, None if explicit else steps, expect=expect, probes=hutch
            )
            if explicit and num_inference_steps is not None and len(ts) - 1 != num_inference_steps:
                raise ValueError(
                    f"num_inference_steps={num_inference_steps} does not match the schedule file {schedule_name} "
                    f"({len(ts) - 1} network evaluations); drop num_inference_steps or learn a schedule for that NFE."
                )
        else:
            if sigmas is not None and first.family.scheduler_grid:
                sigmas = self._shifted_sigmas(first, sigmas, shape)
            ts = grid_from_diffusers(sch, timesteps, sigmas, num_inference_steps)
        O.check_grid_length(ts, solver)
        if smc and t_net is not None:
            raise ValueError(
                f"schedule={schedule_name!r} carries learned network times, which operator='product_smc' does not "
                "use; give a named grid or a schedule file without a time shift."
            )
        return ts, t_net, offsets

    @staticmethod
    def _shifted_sigmas(first: ComposeModel, sigmas, shape) -> torch.Tensor:
        """A flow-matching checkpoint's `sigmas=` through its scheduler's shift, once (as its diffusers pipeline)."""
        try:
            vals = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"sigmas must be a list of numbers; got {sigmas!r}.") from None
        if vals.numel() > O.MAX_STEPS + 1:
            raise ValueError(f"sigmas has {vals.numel()} entries; the limit is {O.MAX_STEPS} steps.")
        if vals.numel() > 1 and float(vals[-1]) == 0.0:
            vals = vals[:-1]  # diffusers' trailing 0
        if vals.numel() == 0 or not bool(torch.isfinite(vals).all()) or not bool(((vals > 0) & (vals <= 1)).all()):
            raise ValueError(
                f"sigmas of a flow-matching checkpoint must lie in (0, 1] (a trailing 0 is allowed); got "
                f"{vals.tolist()[:8]}."
            )
        return first.family.default_sigmas(first, vals.numel(), shape, given=vals.numpy())

    def _step_callback(self, callback_on_step_end, tensor_inputs, sch):
        """diffusers' callback_on_step_end(pipe, step, timestep, tensors) -> dict, as the loop's callback."""
        if callback_on_step_end is None:
            return None

        def callback(k, t_cur, t_next, x, log_q):
            tensors = {"latents": x, "log_q": log_q}
            ret = callback_on_step_end(self, k, sch.timestep(t_cur), {m: tensors[m] for m in tensor_inputs or []})
            ret = ret or {}
            return ret.get("latents", x), ret.get("log_q", log_q)

        return callback

    def _output(self, images, tr, term_index, n, P, pick, hooks, single: bool, verdict=None) -> ComposePipelineOutput:
        kept = lambda v: v[:, pick.to(v.device)] if P > 1 else v  # noqa: E731 - the kept row of every image
        kappa = kept(tr.kappa)
        if single:  # one term: no operator to weigh (the guidance node's weights are in node_kappa)
            kappa = torch.ones(kappa.shape[0], n, 1, dtype=torch.float64)
        node_kappa = {p: kept(v) for p, v in tr.node_kappa.items()}
        rows = pick.to(tr.log_q.device)
        out = ComposePipelineOutput(
            images=images,
            kappa=kappa,
            log_q=tr.log_q[rows][:, term_index],
            log_q_trace=tr.log_q_trace[:, rows][:, :, term_index],
            timesteps=tr.timesteps,
            node_kappa=node_kappa,
        )
        if hooks is not None:
            res = torch.stack(hooks.resampled) if hooks.resampled else torch.zeros(0, n, dtype=torch.bool)
            out.ess = torch.stack(hooks.ess) if hooks.ess else torch.zeros(0, n, dtype=torch.float64)
            out.num_resamples = res.sum(0)
            out.log_weights = hooks.log_w - torch.logsumexp(hooks.log_w, -1, keepdim=True)
            out.evaluations = hooks.evaluations
        if verdict is not None:
            out.lift, out.lift_scores, out.candidate, out.verification_rows = verdict
        return out

    @staticmethod
    def _guidance(first: ComposeModel, terms, guidance_scale, true_cfg_scale) -> tuple[float, float | None]:
        """(CFG scale, embedded guidance or None): what the first checkpoint's family makes of the arguments."""
        O.check_float(true_cfg_scale, "true_cfg_scale", 0.0, 100.0)
        text = any(m.is_text for m, _ in terms)
        return first.family.guidance(guidance_scale, true_cfg_scale, text)

    def _sizes(self, first: ComposeModel, rows: int, height, width) -> tuple[int, int, tuple]:
        """(height, width, the shape of `rows` states): the family's native size where not given."""
        family, f = first.family, self.vae_scale_factor
        height = family.native_size(first, f) if height is None else height
        width = family.native_size(first, f) if width is None else width
        return height, width, family.latent_shape(first, rows, height, width, f)

    @staticmethod
    def _schedule_name(grid, schedule, family) -> str:
        """The grid's name; flow-matching checkpoints default to "scheduler" (their scheduler's own sigmas)."""
        if grid is not None and schedule is not None and grid != schedule:
            raise ValueError(f"grid={grid!r} and schedule={schedule!r} disagree; give one (grid is an alias).")
        own = family.scheduler_grid
        names = (*O.GRIDS, O.SCHEDULER_GRID) if own else O.GRIDS
        name = schedule or grid or (O.SCHEDULER_GRID if own else "log_snr")
        if name == O.SCHEDULER_GRID and not own:
            raise ValueError(
                "schedule='scheduler' (a flow-matching checkpoint's own sigmas) applies to SD3 / Flux checkpoints; "
                f"for a UNet checkpoint give one of {O.GRIDS}, the path of a schedule file, or timesteps=."
            )
        if not isinstance(name, (str, os.PathLike)) or (not is_schedule_file(name) and name not in names):
            raise ValueError(f"schedule={name!r} is not known; use one of {names} or the path of a schedule file.")
        return name

    @staticmethod
    def _num_images(num_images_per_prompt, batch_size, latents, P, generator) -> int:
        if num_images_per_prompt is not None and batch_size is not None and num_images_per_prompt != batch_size:
            raise ValueError(
                f"num_images_per_prompt={num_images_per_prompt} and batch_size={batch_size} disagree; give one."
            )
        n = num_images_per_prompt or batch_size or (latents.shape[0] // P if latents is not None else 1)
        O.check_int(n, "num_images_per_prompt", 1, MAX_IMAGES // P, " (images per call)")
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(f"generator is a list of {len(generator)} generators for {n} images; give one per image.")
        return n

    @staticmethod
    def _check_latents(latents, shape, smc, P) -> None:
        if latents is None:
            return
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
            what = f" (images x num_particles={P} rows, image-major)" if smc else ""
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be a tensor of shape {shape}{what}; got {got}.")
        if not bool(torch.isfinite(latents).all()):
            raise ValueError("latents must be finite (standard normal noise); got NaN or inf.")

    @staticmethod
    def _expression(operator, leaves: list[Leaf], weights, temperature) -> Any:
        if operator is None:
            return leaves[0]
        if callable(operator) and not isinstance(operator, str):
            expr = operator(*leaves)
            if not isinstance(expr, Expr) and not any(expr is lf for lf in leaves):
                raise ValueError(
                    "operator (a callable) must return a compose expression over the terms; "
                    f"got {type(expr).__name__}."
                )
            if isinstance(expr, Expr):
                unknown = [lf for lf in expr.leaves() if not any(lf is t for t in leaves)]
                if unknown:
                    raise ValueError("operator (a callable) used leaves that are not the pipeline's terms.")
            return expr
        return named_operator(operator, leaves, weights=weights, temperature=temperature)


def _rademacher(shape: tuple, generator, device) -> torch.Tensor:
    """Rademacher probes (K, n, ...) in float32; one generator per image when given a list."""
    if isinstance(generator, list):
        cols = [_rademacher((shape[0], 1, *shape[2:]), g, device) for g in generator]
        return torch.cat(cols, dim=1)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    z = torch.randint(0, 2, shape, generator=generator, device=gen_device)
    return (2 * z - 1).to(device=device, dtype=torch.float32)


def _randn_rows(shape: tuple, generator, device) -> torch.Tensor:
    """Standard normal (R, ...) float32; with a list of n generators, R / n consecutive rows from each (by image)."""
    if isinstance(generator, list):
        per = shape[0] // len(generator)
        return torch.cat([randn_tensor((per, *shape[1:]), generator=g, device=device) for g in generator])
    return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)


def _uniform_rows(rows: int, generator) -> torch.Tensor:
    """(rows,) float64 uniforms on the CPU; with a list of n generators, rows / n consecutive ones from each."""
    if isinstance(generator, list):
        per = rows // len(generator)
        return torch.cat([torch.rand(per, generator=g, device=g.device).cpu() for g in generator]).double()
    device = generator.device if generator is not None else "cpu"
    return torch.rand(rows, generator=generator, device=device).cpu().double()


def _unique(items: list) -> list:
    out: list = []
    for it in items:
        if not any(it is o for o in out):
            out.append(it)
    return out


def _term_name(model: ComposeModel, prompt: str | None, num_models: int) -> str:
    if prompt is None:
        return model.name
    return prompt if num_models == 1 else f"{prompt}@{model.name}"


__all__ = ["OPERATORS", "ComposeModel", "ComposePipeline", "ComposePipelineOutput", "forward_ad_ready"]
