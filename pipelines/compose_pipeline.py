"""`ComposePipeline`: compose prompts and checkpoints at sampling time inside diffusers.

The pipeline is thin (house style 6): it maps prompts / checkpoints to the leaves of a `compose` expression, runs
every UNet once per step on all of its rows (the terms that use it, the unconditional branch of classifier-free
guidance and, for `divergence="hutchinson_fd"`, the probe points), converts each model's prediction to eps_hat on
the shared noise schedule, and hands the rest to `compose.Composer.step` (MATH.md sections 3-5).

Terms. `prompt` is the list of things to compose, not a batch: one checkpoint and several prompts gives one term per
prompt; several checkpoints and one prompt (or none) gives one term per checkpoint; as many prompts as checkpoints
pairs them. Prompts are never parsed: "a cat and a dog" is one term. The number of images is
`num_images_per_prompt` (alias `batch_size`); every image is one sample of the composition.

Shared trajectory. The first checkpoint's scheduler defines the schedule of the trajectory x_t. A checkpoint m with
another schedule is evaluated at the time t_m with the same log-SNR, on x_m = x alpha_m(t_m) / alpha(t) (the
change of variables of `compose.OnSchedule`); its eps_hat is the same noise in both. Predictions of every type
(epsilon, sample, v_prediction, flow) go through `compose.to_eps`.

Guidance. With guidance_scale > 1 every text checkpoint adds an unconditional row (negative_prompt, or SDXL's zeros)
to its own UNet call; the expression's single unconditional leaf is the mean of those rows, and `compose.Guided` puts
CFG around the composed prediction. Its divergence is not computed (no operator reads its log q).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

import compose
from compose.engine import Composer, check_grid
from compose.grids import is_schedule_file, resolve_grid
from compose.ld3 import expression_keys
from compose.operators import Expr, operator_root
from compose.sampling import SOLVER_ORDER, check_solver, multistep_composed
from compose.smc import (
    check_langevin_options,
    check_smc_options,
    choose_one,
    langevin_groups,
    particle_step,
    rejuvenate,
)

OPERATORS = ("or", "and", "average", "product", "product_smc")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
DIVERGENCES = ("hutchinson", "hutchinson_fd")
MODELS_FILE = "compose_models.json"  # written by save_pretrained when a pipeline holds several checkpoints
_COMPONENTS = ("unet", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


@dataclass
class ComposePipelineOutput(BaseOutput):
    """What `ComposePipeline.__call__` returns.

    images: PIL images, a (n, H, W, C) numpy array, a (n, C, H, W) tensor in [0, 1], or latents ("latent").
    kappa: (steps, n, K) float64 weights of the outermost operator (below the guidance) at every step; ones (K = 1)
        for a single term.
    log_q: (n, T) float64 tracked log-density of every term (un-guided conditionals) at the last grid time.
    log_q_trace: (steps, n, T) float64 the same after every step (its last row is `log_q`); for "product_smc", the
        trace of the particle slot each image was drawn from (resampling may have replaced that slot's particle).
    timesteps: (steps + 1,) the grid in t (t in [0, 1], data at 0) of the shared schedule.
    node_kappa: operator path ("root", "root.0", ...) -> (steps, n, K) weights of every operator node.
    ess, num_resamples, log_weights (operator="product_smc" only): (steps, n) effective sample size of every image's
        particles at every step (in particles, before resampling), (n,) resampling events per image, and (n, P)
        float64 final normalised log-weights of the P particles (the image is one particle drawn by them).
    evaluations (operator="product_smc" only): (n,) UNet evaluations per particle of every image (per term; the final
        denoising included): steps + 1, plus langevin_steps for every Langevin rejuvenation.
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


@dataclass(eq=False)
class ComposeModel:
    """One checkpoint of a composition: its UNet, scheduler (read, never stepped) and text / latent components."""

    name: str
    unet: Any
    scheduler: Any
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    text_encoder_2: Any = None
    tokenizer_2: Any = None

    @property
    def schedule(self) -> compose.NoiseSchedule:
        return compose.NoiseSchedule.from_scheduler(self.scheduler)

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
        return getattr(self.unet.config, "addition_embed_type", None) == "text_time"

    def components(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _COMPONENTS}


class _Leaf:
    """A leaf of the compose expression: the pipeline evaluates it itself, the core only needs `schedule`."""

    def __init__(self, schedule: compose.NoiseSchedule, name: str, model: ComposeModel | None, prompt: str | None):
        self.schedule = schedule
        self.name = name
        self.model = model
        self.prompt = prompt
        self.model_schedule = model.schedule if model is not None else None

    def __repr__(self) -> str:
        return f"<term {self.name}>"


class ComposePipeline(DiffusionPipeline):
    """Compose prompts and checkpoints with the operators of `compose` (OR / AND / average / product), CFG around them.

    `from_pretrained` takes one id / path or a list of them; identical components are loaded once and checkpoints
    must share one latent space. The first checkpoint's components are the pipeline's registered components
    (`save_pretrained` / `from_pretrained` round trip as usual); further checkpoints live in `self.models`.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
    _callback_tensor_inputs = ["latents", "log_q"]

    def __init__(
        self,
        unet,
        scheduler,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
    ) -> None:
        super().__init__()
        self.register_modules(
            unet=unet,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
        self._extra_models: list[ComposeModel] = []
        self._first_name: str | None = None

    # ------------------------------------------------------------------ models
    @property
    def models(self) -> list[ComposeModel]:
        """The composed checkpoints, first the pipeline's own registered components."""
        first = ComposeModel(
            name=self._first_name or _short_name(getattr(self, "name_or_path", None), 0),
            **{k: getattr(self, k, None) for k in _COMPONENTS},
        )
        return [first, *self._extra_models]

    @property
    def vae_scale_factor(self) -> int:
        vae = getattr(self, "vae", None)
        return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> ComposePipeline:
        """Load one checkpoint (id or folder) or a list of them; shared components are loaded once.

        Raises ValueError when the checkpoints do not share a latent space (VAE family, latent channels, scaling
        factor, sample size).
        """
        paths = pretrained_model_name_or_path
        if isinstance(paths, (list, tuple)):
            if len(paths) == 0:
                raise ValueError("pretrained_model_name_or_path is an empty list; give at least one id or path.")
            pipes = [cls.from_pretrained(p, **kwargs) for p in paths]
            models = [m for p in pipes for m in p.models]
            return cls._from_models(models)
        if isinstance(paths, (str, os.PathLike)) and os.path.isfile(os.path.join(paths, MODELS_FILE)):
            with open(os.path.join(paths, MODELS_FILE)) as fh:
                subs = json.load(fh)["models"]
            return cls.from_pretrained([os.path.join(paths, s) for s in subs], **kwargs)
        pipe = super().from_pretrained(paths, **kwargs)
        pipe._first_name = _short_name(str(paths), 0)
        return pipe

    @classmethod
    def from_models(cls, models: list[ComposeModel]) -> ComposePipeline:
        """A pipeline over already loaded checkpoints (see `ComposeModel`)."""
        return cls._from_models(list(models))

    @classmethod
    def _from_models(cls, models: list[ComposeModel]) -> ComposePipeline:
        pool: list[Any] = []
        for m in models:
            for key in _COMPONENTS:
                comp = getattr(m, key)
                if comp is None:
                    continue
                same = next((c for c in pool if _same_component(c, comp)), None)
                if same is None:
                    pool.append(comp)
                else:
                    setattr(m, key, same)
        _check_latent_spaces(models)
        names = [m.name for m in models]
        for i, m in enumerate(models):
            if names.count(m.name) > 1:
                m.name = f"{m.name}#{i}"
        first = models[0]
        pipe = cls(**{k: getattr(first, k) for k in _COMPONENTS})
        pipe._first_name = first.name
        pipe._extra_models = list(models[1:])
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save as a diffusers folder; several checkpoints go to model_0/, model_1/, ... plus compose_models.json."""
        if not self._extra_models:
            super().save_pretrained(save_directory, **kwargs)
            return
        os.makedirs(save_directory, exist_ok=True)
        subs = []
        for i, m in enumerate(self.models):
            sub = f"model_{i}"
            single = type(self)(**m.components())
            single.save_pretrained(os.path.join(save_directory, sub), **kwargs)
            subs.append(sub)
        with open(os.path.join(save_directory, MODELS_FILE), "w") as fh:
            json.dump({"models": subs, "names": [m.name for m in self.models]}, fh, indent=2)

    def to(self, *args, **kwargs) -> ComposePipeline:
        """Move / cast every checkpoint's modules (diffusers `to` only knows the registered ones)."""
        super().to(*args, **kwargs)
        device = kwargs.get("device")
        dtype = kwargs.get("dtype")
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            elif isinstance(a, (str, torch.device)):
                device = a
        seen: set[int] = set()
        for m in self._extra_models:
            for comp in m.components().values():
                if isinstance(comp, torch.nn.Module) and id(comp) not in seen:
                    seen.add(id(comp))
                    comp.to(device=device, dtype=dtype)
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """diffusers' model offload for the registered components, plus a hook on every further checkpoint's modules.

        The further checkpoints' modules move to the accelerator when first called and back to the CPU when the call
        ends (`maybe_free_model_hooks`), so they are all resident during a call.
        """
        super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        from accelerate import cpu_offload_with_hook

        seen = {id(c) for c in self.components.values() if c is not None}
        for m in self._extra_models:
            for comp in m.components().values():
                if isinstance(comp, torch.nn.Module) and id(comp) not in seen:
                    seen.add(id(comp))
                    _, hook = cpu_offload_with_hook(comp, self._offload_device)
                    self._all_hooks.append(hook)

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
        return out

    def check_inputs(
        self,
        operator,
        n_terms,
        weights,
        method,
        divergence,
        probes,
        output_type,
        height,
        width,
        num_inference_steps,
        timesteps,
        sigmas,
        negative_prompt,
        callback_on_step_end_tensor_inputs,
    ) -> None:
        if operator is not None and not callable(operator):
            if not isinstance(operator, str) or operator.lower() not in OPERATORS:
                raise ValueError(
                    f"operator={operator!r} is not known; use one of {OPERATORS}, or a callable that builds a compose "
                    "expression from the terms, e.g. lambda a, b, c: compose.OR(compose.AND(a, b), c)."
                )
            if n_terms < 2 and operator.lower() != "product_smc":
                raise ValueError(
                    f"operator={operator!r} needs at least two terms (prompts or checkpoints); got {n_terms}. "
                    "Give more prompts / checkpoints, or operator=None for a single term."
                )
        if operator is None and n_terms > 1:
            raise ValueError(
                f"operator is None but there are {n_terms} terms; choose how to compose them: one of {OPERATORS}."
            )
        if weights is not None:
            if not (isinstance(operator, str) and operator.lower() in ("or", "product", "product_smc")):
                raise ValueError(
                    f"weights are used by operator='or' (mixture weights) and 'product' (signed); got operator="
                    f"{operator!r}. For AND biases build the expression yourself (operator=callable)."
                )
            k = torch.as_tensor(weights).numel()
            if k != n_terms:
                raise ValueError(f"weights has {k} entries but there are {n_terms} terms; give one weight per term.")
        if method not in ("sde", "ode"):
            raise ValueError(f"method={method!r} is not known; use 'sde' (Ito density estimator) or 'ode'.")
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence={divergence!r} is not known; use one of {DIVERGENCES}.")
        if not isinstance(probes, int) or probes < 1:
            raise ValueError(f"probes must be a positive integer; got {probes!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not known; use one of {OUTPUT_TYPES}.")
        f = self.vae_scale_factor
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % f:
                raise ValueError(f"{name} must be a positive integer divisible by {f}; got {v!r}.")
        if timesteps is not None and sigmas is not None:
            raise ValueError("give timesteps= or sigmas=, not both.")
        if timesteps is None and sigmas is None:
            if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be a positive integer; got {num_inference_steps!r}.")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string or None; got {type(negative_prompt).__name__}.")
        bad = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs has {bad}; allowed are {self._callback_tensor_inputs}."
            )

    def _grid(self, schedule, num_inference_steps, timesteps, sigmas, grid) -> torch.Tensor:
        """The decreasing grid in t of the shared schedule (diffusers timesteps / sigmas converted)."""
        if timesteps is not None:
            ts = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
            n = schedule.num_train_timesteps
            if schedule.kind == "discrete":
                t = (ts + 1.0) / n
            elif schedule.kind == "ot":
                t = ts / n
            else:
                t = ts / (n - 1)
            name = "timesteps"
        elif sigmas is not None:
            s = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
            if s.numel() and float(s[-1]) == 0.0:
                s = s[:-1]  # diffusers' trailing 0 means "denoise to the data": the final denoising step does that
            if not bool(torch.all(s > 0)):
                raise ValueError(f"sigmas must be positive (a trailing 0 is allowed); got {s.tolist()[:8]}...")
            # diffusers sigmas are sigma / alpha (k-diffusion VE scale); flow-matching sigmas are t itself.
            t = s.clone() if schedule.kind == "ot" else schedule.t_from_log_snr(-2.0 * s.log())
            name = "sigmas"
        else:
            return compose.make_grid(schedule, num_inference_steps, kind=grid)
        if t.numel() and float(t[-1]) > schedule.t_min * (1 + 1e-9):
            t = torch.cat([t, torch.tensor([schedule.t_min], dtype=torch.float64)])
        try:
            return check_grid(t, name)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None

    # ------------------------------------------------------------------ text encoding
    @torch.no_grad()
    def _encode(self, model: ComposeModel, prompt: str | None, device, zero: bool = False) -> dict[str, torch.Tensor]:
        """Conditioning of one prompt: {"encoder_hidden_states": (1, S, D)} (+ "text_embeds" (1, P) for SDXL)."""
        encoders = [(model.tokenizer, model.text_encoder), (model.tokenizer_2, model.text_encoder_2)]
        encoders = [(tok, enc) for tok, enc in encoders if enc is not None]
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

    # ------------------------------------------------------------------ the batched network evaluation
    def _plan(self, leaves: list[_Leaf], uncond: list[_Leaf], conds: dict) -> list[dict]:
        """Group the rows of every step by UNet: one call per distinct UNet."""
        groups: list[dict] = []
        for leaf in [*leaves, *uncond]:
            g = next((g for g in groups if g["unet"] is leaf.model.unet), None)
            if g is None:
                g = {"unet": leaf.model.unet, "parts": []}
                groups.append(g)
            g["parts"].append(leaf)
        for g in groups:
            g["conds"] = [conds.get(id(leaf)) for leaf in g["parts"]]
        return groups

    def _predict(
        self,
        groups: list[dict],
        leaves: list[_Leaf],
        x: torch.Tensor,
        t: float,
        schedule: compose.NoiseSchedule,
        *,
        zeta: torch.Tensor | None = None,
        divergence: str | None = None,
        fd_e: float = 0.0,
        time_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """eps_hat (L, n, ...) of every leaf at (x, t) and, with probes zeta (K, n, ...), div_x eps_hat (L, n).

        One UNet call per group (per probe for forward-mode JVPs). The unconditional leaf (the last one when CFG is
        on) is the mean over its rows; its divergence is left at 0 since no operator reads its log q.
        """
        L, n = len(leaves), x.shape[0]
        index = {id(leaf): i for i, leaf in enumerate(leaves)}
        eps = torch.zeros((L, *x.shape), dtype=torch.float32, device=x.device)
        counts = torch.zeros(L, dtype=torch.float32)
        div = torch.zeros(L, n, dtype=torch.float64, device=x.device) if zeta is not None else None
        t64 = torch.tensor(t, dtype=torch.float64)
        K = 0 if zeta is None else zeta.shape[0]
        for g in groups:
            unet = g["unet"]
            xs, tins, chunks = [], [], []
            ehs, pooled = [], []
            for leaf, cond in zip(g["parts"], g["conds"], strict=True):
                sch = leaf.model_schedule
                t_m = sch.t_from_log_snr(schedule.log_snr(t64)) if sch != schedule else t64
                scale = float((sch.log_alpha(t_m) - schedule.log_alpha(t64)).exp())
                probe = divergence == "hutchinson_fd" and leaf.prompt is not _UNCOND and zeta is not None
                copies = [x] + ([x + fd_e * z for z in zeta] if probe else [])
                for j, xc in enumerate(copies):
                    xs.append(xc * scale)
                    chunks.append((index[id(leaf)], j, leaf, t_m, scale, leaf.prompt is _UNCOND))
                    tins.append(sch.timestep(t_m))
                    if cond is not None:
                        ehs.append(cond["encoder_hidden_states"].expand(n, -1, -1))
                        if "text_embeds" in cond:
                            pooled.append(cond["text_embeds"].expand(n, -1))
            X = torch.cat(xs)
            T = torch.cat([tt.reshape(1).expand(n) for tt in tins]).to(device=x.device, dtype=torch.float32)
            kw: dict[str, Any] = {}
            if ehs:
                kw["encoder_hidden_states"] = torch.cat(ehs).to(unet.dtype)
            if pooled:
                kw["added_cond_kwargs"] = {
                    "text_embeds": torch.cat(pooled).to(unet.dtype),
                    "time_ids": time_ids.to(device=x.device, dtype=unet.dtype).expand(X.shape[0], -1),
                }

            def fn(Xin: torch.Tensor, unet=unet, T=T, kw=kw, chunks=chunks) -> torch.Tensor:
                pred = unet(Xin.to(unet.dtype), T, **kw, return_dict=False)[0].to(torch.float32)
                out = []
                for c, (_, _, leaf, t_m, _, _) in enumerate(chunks):
                    rows = slice(c * n, (c + 1) * n)
                    out.append(
                        compose.to_eps(pred[rows], Xin[rows], t_m, leaf.model_schedule, leaf.model.prediction_type)
                    )
                return torch.cat(out)

            if divergence == "hutchinson" and zeta is not None:
                E = None
                with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), forward_ad_ready(unet):
                    for k in range(K):
                        tangent = torch.cat(
                            [torch.zeros_like(x) if un else zeta[k] * s for (_, _, _, _, s, un) in chunks]
                        )
                        out, jv = torch.func.jvp(fn, (X,), (tangent,))
                        E = out if E is None else E
                        for c, (li, _, _, _, _, un) in enumerate(chunks):
                            if not un:
                                jvc = jv[c * n : (c + 1) * n]
                                div[li] += (zeta[k] * jvc).reshape(n, -1).sum(-1).to(torch.float64) / K
            else:
                E = fn(X)
            for c, (li, j, _, _, _, _) in enumerate(chunks):
                Ec = E[c * n : (c + 1) * n]
                if j == 0:
                    eps[li] += Ec
                    counts[li] += 1
                    base = Ec
                else:
                    diff = (zeta[j - 1] * (Ec - base)).reshape(n, -1).sum(-1)
                    div[li] += diff.to(torch.float64) / (fd_e * K)
        eps = eps / counts.clamp_min(1).to(eps.device).reshape(L, *([1] * x.ndim))
        return eps, div

    # ------------------------------------------------------------------ decoding
    def _decode(self, x0: torch.Tensor, output_type: str):
        if output_type == "latent":
            return x0
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
        divergence: str = "hutchinson",
        probes: int = 1,
        fd_eps: float = 1e-3,
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
            guidance_scale: classifier-free guidance around the composed prediction; 1 disables the unconditional
                branch. Default 7.5 when a checkpoint has a text encoder, else 1.
            negative_prompt: the unconditional branch's prompt.
            num_inference_steps, timesteps, sigmas, grid: the time grid; `timesteps` are the first checkpoint's
                network timesteps (e.g. 999, 979, ...), `sigmas` its diffusers sigmas (sigma / alpha, or t for flow
                matching); otherwise `num_inference_steps` steps of a named grid. The output is the final denoised
                estimate at the last grid time (one more network call per checkpoint).
            schedule: the grid by name ("log_snr" (default), "uniform", "karras", "ays_sd15", "ays_sdxl"; see
                `compose.grids`) or the path of a learned JSON schedule file (`python -m compose.learn_schedule`),
                refused unless it was learned for these checkpoints, operator, solver, guidance and NFE (the
                message names the keys that differ); its network times and learned solver coefficients, where it
                has them, are used as learned. `grid` is an alias.
            solver: "euler", "dpm2m" (DPM-Solver++(2M) on the composed eps) or "unipc" (UniPC: the 2M predictor and
                the UniC corrector, no extra network call; it rebuilds each state from the previous one, so latents
                changed by `callback_on_step_end` move only the point where the UNets are called); method="ode"
                only; see `compose.sample` for which operators stay exact.
            method: "sde" (Euler-Maruyama, Ito density estimator) or "ode" (probability-flow Euler, divergence).
            divergence: for "ode": "hutchinson" (forward-mode JVPs, math attention) or "hutchinson_fd" (finite
                differences with step fd_eps * sigma_t, probe points batched into the main UNet call).
            probes: Hutchinson probes per step (shared across terms).
            num_images_per_prompt / batch_size: number of images (aliases).
            generator: one generator or one per image (initial noise, SDE noise, probes).
            latents: (n, C, h, w) standard normal initial noise (scaled by sigma at the first grid time).
            output_type: "pil", "np", "pt" or "latent".
            callback_on_step_end: callback(pipe, step, timestep, tensors) -> dict; may replace "latents" / "log_q".
            num_particles, ess_threshold, resample_window: for operator="product_smc" (the product of the terms,
                prod_i q_i^{w_i}, sampled with Feynman-Kac weights; `compose.PoE`): P particles per image, resampled
                (systematic) when their ESS drops below ess_threshold * P at a t_next inside resample_window. Particles
                of one image share prompts and go through the UNet in the same batched call, so a step costs P times
                the rows of one image. With guidance the exponents are guidance_scale * weights around the
                unconditional branch (eps_u + w sum_i w_i (eps_i - eps_u), as "product", plus the weights).
            langevin_steps, langevin_step, langevin_after: for operator="product_smc": Metropolis-adjusted Langevin
                moves that leave the current product target invariant (`compose.sample_smc`, resample-move), after
                every step ("every") or after a resampling ("resample"); each move is one more batched UNet call on
                the moved particles. 0 (default): none.
        """
        models = self.models
        first = models[0]
        steps_given = num_inference_steps is not None
        num_inference_steps = 50 if num_inference_steps is None else num_inference_steps
        terms = self._terms(prompt, models)
        if guidance_scale is None:
            guidance_scale = 7.5 if any(m.is_text for m, _ in terms) else 1.0
        height = height or first.unet.config.sample_size * self.vae_scale_factor
        width = width or first.unet.config.sample_size * self.vae_scale_factor
        self.check_inputs(
            operator,
            len(terms),
            weights,
            method,
            divergence,
            probes,
            output_type,
            height,
            width,
            num_inference_steps,
            timesteps,
            sigmas,
            negative_prompt,
            callback_on_step_end_tensor_inputs,
        )
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be finite; got {guidance_scale}.")
        smc = isinstance(operator, str) and operator.lower() == "product_smc"
        if smc:
            resample_window = check_smc_options(num_particles, ess_threshold, resample_window, method)
            check_langevin_options(langevin_steps, langevin_step, langevin_after)
        elif num_particles is not None:
            raise ValueError(f"num_particles is used by operator='product_smc'; got operator={operator!r}.")
        elif langevin_steps != 0:
            raise ValueError(
                f"langevin_steps is used by operator='product_smc' (Langevin moves of the particles); got "
                f"operator={operator!r}. Drop langevin_steps or use operator='product_smc' with num_particles."
            )
        P = num_particles if smc else 1
        if grid is not None and schedule is not None and grid != schedule:
            raise ValueError(f"grid={grid!r} and schedule={schedule!r} disagree; give one (grid is an alias).")
        schedule_name = schedule or grid or "log_snr"
        check_solver(solver, method)
        use_cfg = guidance_scale > 1.0
        text_models = _unique([m for m, _ in terms if m.is_text])
        if use_cfg and not text_models:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs a text encoder (classifier-free guidance), but no checkpoint "
                "has one; use guidance_scale=1."
            )
        if num_images_per_prompt is not None and batch_size is not None and num_images_per_prompt != batch_size:
            raise ValueError(
                f"num_images_per_prompt={num_images_per_prompt} and batch_size={batch_size} disagree; give one."
            )
        n = num_images_per_prompt or batch_size or (latents.shape[0] // P if latents is not None else 1)
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer; got {n!r}.")
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(f"generator is a list of {len(generator)} generators for {n} images; give one per image.")
        device = self._execution_device
        f = self.vae_scale_factor
        shape = (n * P, first.unet.config.in_channels, height // f, width // f)
        if latents is not None and tuple(latents.shape) != shape:
            what = f" (images x num_particles={P} rows, image-major)" if smc else ""
            raise ValueError(f"latents must have shape {shape}{what}; got {tuple(latents.shape)}.")

        # 1. terms -> leaves on the shared schedule, and their text conditioning
        noise_schedule = schedule = first.schedule
        leaves = [_Leaf(schedule, _term_name(m, p, len(models)), m, p) for m, p in terms]
        uncond = [_Leaf(schedule, f"uncond@{m.name}", m, _UNCOND) for m in text_models] if use_cfg else []
        conds: dict[int, Any] = {}
        cache: dict[tuple, Any] = {}
        for leaf in [*leaves, *uncond]:
            m = leaf.model
            if not m.is_text:
                continue
            zero = leaf.prompt is _UNCOND and negative_prompt is None and m.is_xl
            text = negative_prompt if leaf.prompt is _UNCOND else leaf.prompt
            key = (id(m.text_encoder), id(m.text_encoder_2), text, zero)
            if key not in cache:
                cache[key] = self._encode(m, text, device, zero=zero)
            conds[id(leaf)] = cache[key]
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)

        # 2. the expression: operator over the terms, CFG around it
        u_leaf = _Leaf(schedule, "uncond", first, _UNCOND) if use_cfg else None
        poe = None
        if smc:  # the move of the particles is the Product of the factors; PoE adds their weights
            a = torch.ones(len(leaves)) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
            poe = compose.PoE(*leaves, exponents=a * guidance_scale if use_cfg else a, unconditional=u_leaf)
            expr = poe.product
        else:
            expr = self._expression(operator, leaves, weights, temperature)
            if use_cfg:
                expr = compose.Guided(expr, u_leaf, guidance_scale)
        composer = Composer(expr, schedule=schedule, method=method)
        order = composer.leaves  # the core's leaf order; the unconditional leaf stands for all uncond rows
        # The per-model unconditional rows are evaluated as extra leaves and averaged into the expression's one.
        eval_leaves = list(order)
        groups = self._plan(leaves, uncond, conds)
        if u_leaf is not None:
            u_index = next(i for i, lf in enumerate(order) if lf is u_leaf)
            eval_leaves.extend(uncond)
        term_index = [next(i for i, lf in enumerate(order) if lf is leaf) for leaf in leaves]

        # 3. grid, initial state and its log q
        t_net = offsets = None
        if timesteps is None and sigmas is None:
            expect = {**expression_keys(expr), "solver": solver if method == "ode" else "sde"}
            expect["schedule"] = repr(noise_schedule)
            explicit = is_schedule_file(schedule_name)
            hutch = probes if method == "ode" else None
            ts, t_net, offsets = resolve_grid(
                noise_schedule, schedule_name, None if explicit else num_inference_steps, expect=expect, probes=hutch
            )
            if explicit and steps_given and len(ts) - 1 != num_inference_steps:
                raise ValueError(
                    f"num_inference_steps={num_inference_steps} does not match the schedule file {schedule_name} "
                    f"({len(ts) - 1} steps); drop num_inference_steps or learn a schedule for that NFE."
                )
        else:
            ts = self._grid(schedule, num_inference_steps, timesteps, sigmas, "log_snr")
        if len(ts) - 1 < SOLVER_ORDER[solver]:
            raise ValueError(f"solver={solver!r} needs at least {SOLVER_ORDER[solver]} steps; got {len(ts) - 1}.")
        t0 = float(ts[0])
        if latents is None:
            latents = _randn_rows(shape, generator, device)  # randn_tensor's draws (by image with a list)
        x = latents.to(device=device, dtype=torch.float32) * float(schedule.sigma(t0))
        if smc:
            x = x / math.sqrt(poe.total_exponent)  # the product of M priors N(0, sigma^2) is N(0, sigma^2 / A)
        log_q = composer.initial_log_q(x, t0)
        span = t0 - float(ts[-1])
        root = operator_root(expr) if isinstance(expr, Expr) and len(leaves) > 1 else None

        def evaluate(x_in: torch.Tensor, t: float, zeta=None):
            eps_all, div_all = self._predict(
                groups,
                eval_leaves,
                x_in,
                t,
                schedule,
                zeta=zeta,
                divergence=divergence if zeta is not None else None,
                fd_e=fd_eps * float(schedule.sigma(t)),
                time_ids=time_ids,
            )
            L = len(order)
            eps_l = eps_all[:L].clone()
            div_l = None if div_all is None else div_all[:L].clone()
            if u_leaf is not None:
                eps_l[u_index] = eps_all[L:].mean(0)
                if div_l is not None:
                    div_l[u_index] = 0.0
            return eps_l, div_l

        if smc:
            if t_net is not None:
                raise ValueError(
                    f"schedule={schedule_name!r} carries learned network times, which operator='product_smc' does not "
                    "use; give a named grid or a schedule file without a time shift."
                )
            args = (composer, poe, evaluate, x, log_q, ts, n, P, expr, generator, device)  # kappa: the exponents
            kw = dict(ess_threshold=ess_threshold, resample_window=resample_window, output_type=output_type,
                      langevin=(langevin_steps, langevin_step, langevin_after))  # fmt: skip
            out = self._sample_particles(*args, **kw, callback=callback_on_step_end,
                                         callback_inputs=callback_on_step_end_tensor_inputs)  # fmt: skip
            out.log_q = out.log_q[:, term_index]
            out.log_q_trace = out.log_q_trace[:, :, term_index]
            return out if return_dict else (out.images, out.kappa, out.log_q)

        # 4. the loop: one batched call per UNet, then the core's step
        kappas, node_kappa, coeffs, trace = [], {}, None, []
        steps = len(ts) - 1
        multistep = None  # the multistep solvers' history (multistep_composed)
        with self.progress_bar(total=steps) as bar:
            for k in range(steps):
                t_cur, t_next = float(ts[k]), float(ts[k + 1])
                noise = zeta = None
                if method == "sde":
                    noise = randn_tensor(x.shape, generator=generator, device=device, dtype=torch.float32)
                else:
                    zeta = _rademacher((probes, *x.shape), generator, device)
                eps, div = evaluate(x, t_cur if t_net is None else float(t_net[k]), zeta)
                out = composer.step(
                    x, t_cur, t_next, eps, log_q, noise=noise, div_eps=div, bias_scale=(t_cur - t_next) / span
                )
                x_start = x
                x, log_q, coeffs = out.x, out.log_q, out.coeffs
                if solver != "euler":
                    x, log_q, multistep = multistep_composed(
                        solver, x_start, out, eps, multistep, ts, k, schedule, offsets
                    )
                kappas.append(out.kappa[root.path] if root is not None else torch.ones(n, 1, dtype=torch.float64))
                for path, kap in out.kappa.items():
                    node_kappa.setdefault(path, []).append(kap)
                if callback_on_step_end is not None:
                    tensors = {"latents": x, "log_q": log_q}
                    kwargs = {name: tensors[name] for name in callback_on_step_end_tensor_inputs or []}
                    ret = callback_on_step_end(self, k, schedule.timestep(t_cur), kwargs) or {}
                    x = ret.get("latents", x)
                    log_q = ret.get("log_q", log_q)
                trace.append(log_q[:, term_index])
                bar.update()

        # 5. final denoising at the last grid time with the last step's coefficients, decoding
        t_last = float(ts[-1])
        eps, _ = evaluate(x, t_last)
        eps_bar = torch.einsum("nl,ln...->n...", coeffs.to(eps.dtype), eps)
        x0 = compose.eps_to_x0(eps_bar, x, t_last, schedule)
        images = self._decode(x0, output_type)
        self.maybe_free_model_hooks()
        kappa = torch.stack(kappas)
        term_log_q = log_q[:, term_index]
        if not return_dict:
            return images, kappa, term_log_q
        return ComposePipelineOutput(
            images=images,
            kappa=kappa,
            log_q=term_log_q,
            log_q_trace=torch.stack(trace),
            timesteps=ts,
            node_kappa={p: torch.stack(v) for p, v in node_kappa.items()},
        )

    def _sample_particles(
        self, composer, poe, evaluate, x, log_q, ts, n, P, root, generator, device, *, ess_threshold, resample_window,
        output_type, callback, callback_inputs, langevin=(0, 0.5, "every"),
    ) -> ComposePipelineOutput:  # fmt: skip
        """Steps 4-5 of operator="product_smc": x (n P, ...) particles, image-major; `compose.smc` does the maths."""
        log_w = torch.zeros(n, P, dtype=torch.float64, device=x.device)
        kappas, ess, resampled, node_kappa, trace = [], [], [], {}, []
        steps = len(ts) - 1
        L, step, after = langevin
        evaluations = torch.zeros(n, dtype=torch.float64)
        pending = None  # UNet predictions the Langevin moves left at (x, t_next), reused by the next step

        def eps_fn(x_in: torch.Tensor, t: float) -> torch.Tensor:
            return evaluate(x_in, t)[0]

        with self.progress_bar(total=steps) as bar:
            for k in range(steps):
                t_cur, t_next = float(ts[k]), float(ts[k + 1])
                noise = _randn_rows(x.shape, generator, device)
                u = _uniforms(n, generator)
                # one batched call per UNet: every particle of every image (the rows the moves left unevaluated)
                eps = eps_fn(x, t_cur) if pending is None else pending.complete(eps_fn, x, t_cur)
                st = particle_step(composer, poe, x, t_cur, t_next, eps, log_q, log_w, noise, u,
                                   ess_threshold=ess_threshold, resample_window=resample_window)  # fmt: skip
                x, log_q, log_w, coeffs = st.x, st.log_q, st.log_w, st.coeffs
                ess.append(st.ess)
                resampled.append(st.resampled)
                evaluations += 1
                pending = None
                groups = langevin_groups(after, st.resampled, t_next, resample_window) if L else None
                if groups is not None and bool(groups.any()):
                    noises = [_randn_rows(x.shape, generator, device) for _ in range(L)]
                    us = [_uniform_rows(n * P, generator) for _ in range(L)]
                    sigma = float(composer.schedule.sigma(t_next))
                    rj = rejuvenate(poe, eps_fn, x, t_next, sigma, log_q, groups, noises, us, step)
                    x, log_q, pending = rj.x, rj.log_q, rj.eps
                    evaluations += groups.cpu().double() * L
                kap = st.kappa[root.path] if root is not None else torch.ones(n * P, 1, dtype=torch.float64)
                kappas.append(kap.reshape(n, P, -1)[:, 0])
                for path, kp in st.kappa.items():
                    node_kappa.setdefault(path, []).append(kp.reshape(n, P, -1)[:, 0])
                if callback is not None:
                    tensors = {"latents": x, "log_q": log_q}
                    chosen = {m: tensors[m] for m in callback_inputs or []}
                    ret = callback(self, k, composer.schedule.timestep(t_cur), chosen) or {}
                    x, log_q = ret.get("latents", x), ret.get("log_q", log_q)
                    pending = None if "latents" in ret else pending  # new latents: evaluate them afresh
                trace.append(log_q)
                bar.update()
        t_last = float(ts[-1])
        eps = eps_fn(x, t_last) if pending is None else pending.complete(eps_fn, x, t_last)
        evaluations += 1
        eps_bar = torch.einsum("nl,ln...->n...", coeffs.to(eps.dtype), eps)
        x0 = compose.eps_to_x0(eps_bar, x, t_last, composer.schedule)
        log_w = log_w - torch.logsumexp(log_w, -1, keepdim=True)
        pick = choose_one(log_w, _uniforms(n, generator)) + P * torch.arange(n, device=log_w.device)  # by weight
        images = self._decode(x0[pick.to(x0.device)], output_type)
        self.maybe_free_model_hooks()
        res = torch.stack(resampled)
        return ComposePipelineOutput(
            images=images,
            kappa=torch.stack(kappas),
            log_q=log_q[pick.to(log_q.device)],
            log_q_trace=torch.stack(trace)[:, pick.to(log_q.device)],
            timesteps=ts,
            node_kappa={p: torch.stack(v) for p, v in node_kappa.items()},
            ess=torch.stack(ess),
            num_resamples=res.sum(0),
            log_weights=log_w,
            evaluations=evaluations,
        )

    @staticmethod
    def _expression(operator, leaves: list[_Leaf], weights, temperature) -> Any:
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
        name = operator.lower()
        if name == "or":
            return compose.OR(*leaves, weights=weights, temperature=temperature)
        if name == "and":
            return compose.AND(*leaves)
        if name == "average":
            return compose.Average(*leaves)
        return compose.Product(*leaves, weights=weights)


class _UncondMarker(str):
    """The prompt of the unconditional branch (a distinct object, so no user prompt is mistaken for it)."""


_UNCOND = _UncondMarker("")


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


def _uniforms(n: int, generator) -> torch.Tensor:
    """(n,) float64 uniforms on the CPU, one per image (from its own generator when given a list)."""
    if isinstance(generator, list):
        return torch.cat([torch.rand(1, generator=g, device=g.device).cpu() for g in generator]).double()
    device = generator.device if generator is not None else "cpu"
    return torch.rand(n, generator=generator, device=device).cpu().double()


def _unique(items: list) -> list:
    out: list = []
    for it in items:
        if not any(it is o for o in out):
            out.append(it)
    return out


def _short_name(path: str | None, i: int) -> str:
    if not path:
        return f"model{i}"
    return os.path.basename(os.path.normpath(str(path))) or str(path)


def _term_name(model: ComposeModel, prompt: str | None, num_models: int) -> str:
    if prompt is None:
        return model.name
    return prompt if num_models == 1 else f"{prompt}@{model.name}"


def _same_component(a: Any, b: Any) -> bool:
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


def _latent_signature(m: ComposeModel) -> dict[str, Any]:
    sig: dict[str, Any] = {
        "space": "pixel (no vae)" if m.vae is None else "latent",
        "unet.in_channels": m.unet.config.in_channels,
        "unet.sample_size": m.unet.config.sample_size,
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


def _check_latent_spaces(models: list[ComposeModel]) -> None:
    ref = _latent_signature(models[0])
    for m in models[1:]:
        sig = _latent_signature(m)
        keys = sorted(set(ref) | set(sig))
        bad = [f"{k}: {ref.get(k)!r} vs {sig.get(k)!r}" for k in keys if ref.get(k) != sig.get(k)]
        if bad:
            raise ValueError(
                f"pretrained_model_name_or_path: checkpoints {models[0].name!r} and {m.name!r} do not share a latent "
                f"space ({'; '.join(bad)}); compose only checkpoints of one family (same VAE, channels, size)."
            )


__all__ = ["ComposeModel", "ComposePipeline", "ComposePipelineOutput"]
