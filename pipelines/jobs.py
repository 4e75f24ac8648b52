"""One composition request ("job"), shared by the Space demo and the batch command line.

A job is a flat record: the checkpoints, the prompts, the operator, weights, seed, steps, schedule, guidance and
number of images, and the per-image concept scores (`lift`: "auto", "renoise", "tracked" or "none"; `candidates`:
samples per image, the best by its lift kept; `select`: "lift" or "random"; `lift_levels`, `lift_draws`: the
"renoise" lift's log-SNR levels and noise draws per level; see `pipelines.verify`). `parse_job`
checks a raw record (a JSONL / CSV row, or the Space's form) against `Limits` and raises `ValueError` naming the field
and the fix; `pipeline_kwargs` is the ONE place where a job's fields become `ComposePipeline.__call__` keyword
arguments (add a new pipeline option there and in `Job`); `run_job` runs one job on a loaded pipeline and returns the
images, kappa and log-density traces, every image's lift and the candidate it kept, and timings. A job's `lora` names
shipped LoRAs (`model_cards/shapes-lora-*`) or folders with LoRA safetensors; `run_job` attaches them to the (cached)
pipeline as LoRA experts (`load_job_loras`) under their folder names.

Seeds: image i of a job uses its own generator seeded `seed + i` (initial noise, SDE noise, probes), so an image
depends only on (job, i) and not on the number of processes; with another number of images per call it is the same
up to rounding (CPU kernels round differently for different batch sizes: a level or two out of 255 in a few pixels).

Everything here is hostile input (a job file, the Space's form): `parse_job` bounds every field, including the prompt
length in characters (and, with `Limits.max_prompt_tokens`, in tokens), the id length and the steps a schedule file
brings, before anything is loaded. This module imports neither torch nor diffusers at import time (the command line
parses its arguments without them); they are imported by the functions that run a job.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and diffusers are imported where a job runs, not to parse a command line
    import torch

from . import shipped
from .shipped import resolve_model as _resolve_model
from .shipped import shipped_models

ROOT = Path(__file__).resolve().parents[1]
FIELDS = (
    "id",
    "models",
    "prompts",
    "operator",
    "weights",
    "temperature",
    "seed",
    "steps",
    "schedule",
    "guidance",
    "negative_prompt",
    "method",
    "divergence",
    "solver",
    "num_particles",
    "langevin_steps",
    "images",
    "height",
    "width",
    "lora",
    "lora_mode",
    "lora_uncond",
    "lora_switch_steps",
    "lora_scale",
    "lift",
    "candidates",
    "select",
    "lift_levels",
    "lift_draws",
)
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
STEPS_CAP = (
    " (this runner's cap per job, Limits.max_steps: the batch runner's --max-steps, the Space's "
    "COMPOSE_MAX_STEPS; the Python API's own bound, 10000, only catches typos)"
)
CANDIDATES_CAP = (
    " (samples drawn per image, the best kept; this runner's cap, Limits.max_candidates: the batch runner's "
    "--max-candidates, the Space's COMPOSE_MAX_CANDIDATES)"
)
VERIFY_FIELDS = ("lift", "candidates", "select", "lift_levels", "lift_draws")  # concept scores, what they choose
NO_LIFT = "none"  # a job's lift value for the pipeline's lift=None (JSON null and "" mean the default, "auto")


@dataclass(frozen=True)
class Limits:
    """Bounds on one job, so one request cannot exhaust the machine (the Space uses tight ones).

    These are resource caps, set by whoever runs the runner (batch: --max-steps ...; the Space: COMPOSE_MAX_*), and
    lower than the Python API's bounds, which only catch typos (`compose.options`: 10000 steps). Guidance is no
    resource: jobs and the pipeline share one range (`compose.options.check_guidance`, 0 to 100).

    max_prompt_chars: per prompt (and negative prompt), checked before anything else is done with the text.
    max_prompt_tokens: per prompt, in the checkpoint's tokenizer (`check_prompt_tokens`, once the model is loaded;
        `parse_job` refuses earlier a prompt with more words than that, as every word is at least one token).
        None: no limit here (the pipeline's tokenizer truncates at its own maximum, as diffusers does).
    max_id_chars: a row's id names its image files.  max_seconds: the wall time of one job (None: none), checked
        after every step (`Deadline`).  max_weight: the largest |weight| and temperature.
    max_candidates: candidates per image (`candidates`). Every candidate is sampled in full, so candidates count as
        images: images x candidates (the images sampled) must stay within max_images too, and a row's rows per
        network call are images x candidates x (terms + 1), as for that many images.
    """

    max_steps: int = 1000
    max_images: int = 64
    max_terms: int = 8
    max_side: int = 1024
    max_particles: int = 64
    max_langevin_steps: int = 8
    max_prompt_chars: int = 1000
    max_prompt_tokens: int | None = None
    max_id_chars: int = 100
    max_seconds: float | None = None
    max_weight: float = 1000.0
    max_candidates: int = 8


@dataclass
class Job:
    """A checked composition request. `models` are shipped names, folders or hub ids; `prompts` may be empty."""

    models: list[str]
    prompts: list[str]
    operator: str | None = None
    weights: list[float] | None = None
    temperature: float = 1.0
    seed: int = 0
    steps: int = 50
    schedule: str | None = None  # None: the checkpoint's default (log_snr; "scheduler" for flow-matching models)
    guidance: float | None = None
    negative_prompt: str | None = None
    method: str = "sde"
    divergence: str | None = None
    solver: str | None = None
    num_particles: int | None = None
    langevin_steps: int | None = None
    images: int = 1
    height: int | None = None
    width: int | None = None
    id: str | None = None
    lora: list[str | None] | None = None
    lora_mode: str | None = None
    lora_uncond: str | None = None
    lora_switch_steps: int | None = None
    lora_scale: float | None = None
    lift: str | None = None  # None: the pipeline's "auto"; "none" (NO_LIFT): no lift; "renoise" / "tracked"
    candidates: int | None = None  # None: 1
    select: str | None = None  # None: "lift"
    lift_levels: list[float] | None = None  # None: the pipeline's DEFAULT_LEVELS ("renoise" only)
    lift_draws: int | None = None  # None: 1 noise draw per level ("renoise" only)

    def params(self) -> dict[str, Any]:
        """Every parameter as plain JSON values (what the manifest and the PNG metadata record)."""
        return asdict(self)

    def key(self) -> str:
        """A short hash of the parameters that define the images (not the id). Unset (None) fields are left out, so
        a new optional field does not invalidate the manifests of earlier runs. The lift only scores the images of
        one candidate each (`lift`, `select` are left out then); with candidates > 1 it chooses them, and the key
        holds the candidates, the selection and the estimator that ran ("auto" and "renoise" are one)."""
        p = {k: v for k, v in self.params().items() if v is not None and k not in ("id", *VERIFY_FIELDS)}
        if (self.candidates or 1) > 1:
            v = self.verification()
            p.update(candidates=self.candidates, select=v.select, lift=v.estimator or NO_LIFT)
            if v.select == "lift" and v.estimator == "renoise":  # the levels and draws choose too
                from .verify import DEFAULT_LEVELS

                if tuple(v.levels) != DEFAULT_LEVELS:
                    p["lift_levels"] = list(v.levels)
                if v.draws != 1:
                    p["lift_draws"] = v.draws
        return hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:16]

    def verification(self):
        """The pipeline's view of the job's verification options (`pipelines.verify.Verification`): the estimator
        that runs ("auto": "tracked" for one candidate, "renoise" to choose) and the score rule (min over the terms;
        max for operator "or")."""
        from .verify import DEFAULT_LEVELS, Verification

        levels = DEFAULT_LEVELS if self.lift_levels is None else tuple(self.lift_levels)
        K, select = self.candidates or 1, self.select or "lift"
        return Verification(_lift_arg(self), levels, K, select, 0.0, None, self.lift_draws or 1)


def _lift_arg(job: Job) -> str | None:
    """A job's lift -> the pipeline's `lift=` value."""
    if job.lift is None:
        return "auto"
    return None if job.lift == NO_LIFT else job.lift


@dataclass
class JobResult:
    """What `run_job` returns.

    images: list of `images` PIL images.  kappa: (steps, images, K) float64 weights of the outer operator.
    log_q: (steps, images, T) float64 tracked log-density of every term after every step (the last row is the
    pipeline's `log_q`).  timesteps: (steps + 1,) the grid in t.  terms: the term names.  seconds: sampling time.

    The per-image concept scores (`pipelines.verify`), as the pipeline returned them:
    lift: (images, L) float64 lift of every lift term (log q_term - log q_ref, nats) of each kept image, or None
        (lift "none", operator product_smc, or "tracked" without guidance); lift_terms: their names (the terms; with
        lora_mode "merge" and the "renoise" estimator, one per merged LoRA).  estimator: the one that ran, or None.
    lift_scores: (images, K) float64 every candidate's score (score_rule over the lift terms: "min", or "max" for
        operator "or"), or None.  candidate: (images,) the candidate each image kept, or None for one candidate.
    candidates: K.  verification_rows: network rows per image the lift cost beyond sampling (every candidate's).
    """

    images: list
    kappa: torch.Tensor
    log_q: torch.Tensor
    timesteps: torch.Tensor
    terms: list[str]
    seconds: float
    extra: dict = field(default_factory=dict)
    lift: torch.Tensor | None = None
    lift_terms: list[str] = field(default_factory=list)
    estimator: str | None = None
    score_rule: str = "min"
    lift_scores: torch.Tensor | None = None
    candidate: torch.Tensor | None = None
    candidates: int = 1
    verification_rows: int = 0

    @classmethod
    def join(cls, parts: list[JobResult]) -> JobResult:
        """The results of consecutive chunks of one job's images as one result (image-major everywhere)."""
        import torch

        def cat(name: str, dim: int = 0):
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else torch.cat(values, dim=dim)

        first = parts[0]
        return cls(
            images=[im for p in parts for im in p.images],
            kappa=cat("kappa", 1),
            log_q=cat("log_q", 1),
            timesteps=first.timesteps,
            terms=first.terms,
            seconds=sum(p.seconds for p in parts),
            lift=cat("lift"),
            lift_terms=first.lift_terms,
            estimator=first.estimator,
            score_rule=first.score_rule,
            lift_scores=cat("lift_scores"),
            candidate=cat("candidate"),
            candidates=first.candidates,
            verification_rows=first.verification_rows,
        )

    def scores(self) -> torch.Tensor | None:
        """(images,) float64 the score of every kept image (its candidate's), or None without a lift."""
        if self.lift_scores is None:
            return None
        if self.candidate is None:
            return self.lift_scores[:, 0]
        return self.lift_scores.gather(1, self.candidate.long()[:, None])[:, 0]

    def summary(self) -> dict[str, Any]:
        """Per term: mean kappa over steps and images, kappa at the last step, final log q (mean over images), and
        how many images each term "won" (largest final log q); with a lift, its mean per lift term over the images."""
        k = self.kappa
        out: dict[str, Any] = {
            "terms": self.terms,
            "kappa_mean": [round(float(v), 5) for v in k.mean((0, 1))],
            "kappa_min": [round(float(v), 5) for v in k.amin((0, 1))],
            "kappa_max": [round(float(v), 5) for v in k.amax((0, 1))],
            "kappa_last": [round(float(v), 5) for v in k[-1].mean(0)],
            "log_q_final": [round(float(v), 3) for v in self.log_q[-1].mean(0)],
        }
        if self.log_q.shape[-1] > 1:
            import torch

            won = torch.bincount(self.log_q[-1].argmax(-1), minlength=self.log_q.shape[-1])
            out["images_won"] = [int(v) for v in won]
        if self.lift is not None:
            out["lift_terms"] = self.lift_terms
            out["lift_mean"] = [round(float(v), 3) for v in self.lift.mean(0)]
        return out

    def lift_record(self) -> dict[str, Any]:
        """The manifest's per-image concept scores: for image i (file i of the record), `per_image[i]` its lift per
        lift term and `score[i]` its score (nats, 3 decimals), `kept[i]` the candidate it kept (with candidates > 1)
        and `candidate_scores[i]` every candidate's score; the estimator, the score rule, the candidates and the
        verification rows per image."""
        scores = self.scores()
        rec: dict[str, Any] = {
            "estimator": self.estimator if self.lift is not None else None,
            "rule": self.score_rule,
            "terms": self.lift_terms,
            "per_image": None if self.lift is None else [[round(float(v), 3) for v in row] for row in self.lift],
            "score": None if scores is None else [round(float(v), 3) for v in scores],
            "candidates": self.candidates,
            "kept": None if self.candidate is None else [int(v) for v in self.candidate],
            "candidate_scores": None,
            "rows_per_image": int(self.verification_rows),
        }
        if self.candidates > 1 and self.lift_scores is not None:
            rec["candidate_scores"] = [[round(float(v), 3) for v in row] for row in self.lift_scores]
        return rec


# ---------------------------------------------------------------------- parsing
def show(value: Any, limit: int = 60) -> str:
    """repr(value) cut to about `limit` characters: error messages never echo a whole hostile input."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else type(value).__name__
    return f"{text[: limit - 3]}... ({size})"


def _as_list(value: Any, name: str) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split("|")] if "|" in value else [value.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError(f"{name} must be a string, a list or '|'-separated text; got {type(value).__name__}.")


def _int(raw: dict, name: str, default: int | None, lo: int, hi: int, why: str = "") -> int | None:
    v = raw.get(name)
    if v is None or v == "":
        return default
    try:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise ValueError
        iv = int(v)
        if iv != float(v):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be an integer; got {show(v)}.") from None
    if not lo <= iv <= hi:
        raise ValueError(f"{name}={show(iv)} is out of range; give an integer from {lo} to {hi}{why}.")
    return iv


def _float(raw: dict, name: str, default: float | None) -> float | None:
    v = raw.get(name)
    if v is None or v == "":
        return default
    try:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise ValueError
        fv = float(v)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a number; got {show(v)}.") from None
    if not math.isfinite(fv):
        raise ValueError(f"{name} must be finite; got {show(v)}.")
    return fv


def _choice(raw: dict, name: str, choices, default: str | None, hint: str = "") -> str | None:
    """A text field that must be one of `choices` (None / "" -> default)."""
    v = raw.get(name)
    if v is None or v == "":
        return default
    if not isinstance(v, str) or v not in choices:
        raise ValueError(f"{name}={show(v)} is not known; use one of {list(choices)}{hint}.")
    return v


def count_terms(num_models: int, num_prompts: int) -> int:
    """The number of composed terms for M checkpoints and P prompts (the pipeline's rule)."""
    if num_models == 1:
        return max(num_prompts, 1)
    return num_models


def check_prompt_length(name: str, text: str, limits: Limits) -> None:
    """Characters, then (a lower bound on) tokens: every word is at least one token. Cheap: nothing is loaded."""
    if len(text) > limits.max_prompt_chars:
        raise ValueError(f"{name} is {len(text)} characters long; the limit is {limits.max_prompt_chars}. Shorten it.")
    words = len(text.split())
    if limits.max_prompt_tokens is not None and words > limits.max_prompt_tokens:
        raise ValueError(
            f"{name} has {words} words, so at least {words} tokens; the limit is {limits.max_prompt_tokens} tokens. "
            "Shorten it."
        )


def _job_id(raw: dict, limits: Limits) -> str | None:
    job_id = raw.get("id")
    if job_id in (None, ""):
        return None
    if not isinstance(job_id, (str, int)) or isinstance(job_id, bool):
        raise ValueError(f"id must be text; got {type(job_id).__name__}.")
    job_id = str(job_id)
    if len(job_id) > limits.max_id_chars:
        raise ValueError(
            f"id is {len(job_id)} characters long; the limit is {limits.max_id_chars} (it names the image files). "
            "Give a shorter id."
        )
    if not job_id.replace("-", "").replace("_", "").replace(".", "").isalnum() or job_id.startswith("."):
        raise ValueError(f"id={show(job_id)} must use only letters, digits, '-', '_' and '.' (it names files).")
    if not job_id.isascii():
        raise ValueError(f"id={show(job_id)} must use only ASCII letters, digits, '-', '_' and '.' (it names files).")
    return job_id


def _schedule_file(schedule: str, limits: Limits) -> dict[str, Any]:
    """Read a learned-schedule file for a job: any failure is a ValueError naming the file and the fix, and the
    keys the job and the pipeline rely on are checked here (their types, and the NFE against max_steps)."""
    from compose.ld3 import load_schedule

    try:
        learned = load_schedule(schedule)
    except ValueError as err:
        raise ValueError(f"schedule: {err}") from None
    except Exception as err:  # noqa: BLE001 -- a hostile file can break the reader in any way; name it
        raise ValueError(
            f"schedule: the file {show(schedule, 200)} cannot be read ({type(err).__name__}: {show(str(err), 200)}); "
            "regenerate it with `compose learn-schedule`."
        ) from None
    nfe = learned.get("nfe")
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(
            f"schedule: the file {show(schedule, 200)} has nfe={show(nfe)}; it must be a positive integer. "
            "Regenerate the file."
        )
    if nfe > limits.max_steps:
        raise ValueError(
            f"schedule: the file {show(schedule, 200)} has {nfe} steps (nfe); the limit is {limits.max_steps}. "
            "Use a schedule with fewer steps."
        )
    guidance = learned.get("guidance")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise ValueError(
            f"schedule: the file {show(schedule, 200)} has guidance={show(guidance)}; it must be a number. "
            "Regenerate the file."
        )
    for key in ("model", "operator", "solver", "schedule"):
        if not isinstance(learned.get(key), str):
            raise ValueError(
                f"schedule: the file {show(schedule, 200)} has {key}={show(learned.get(key))}; it must be text. "
                "Regenerate the file."
            )
    return learned


def parse_job(raw: dict[str, Any], limits: Limits | None = None) -> Job:
    """Check one raw request against `limits` (default `Limits()`); raise ValueError naming the field and the fix.

    Only ValueError comes out, whatever the input (tests/test_hostile_inputs.py holds a table of bad rows). The
    option names (operators, methods, solvers, divergences, grids) are `compose.options`', as the pipeline's."""
    limits = limits or Limits()
    if not isinstance(raw, dict):
        raise ValueError(f"a job must be a JSON object (one per line); got {type(raw).__name__}.")
    unknown = sorted(str(k) for k in set(raw) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {show(unknown, 120)}; the fields are {list(FIELDS)}.")
    job_id = _job_id(raw, limits)
    models, prompts, terms = _models_and_prompts(raw, limits)
    lora, terms = _loras(raw, terms, limits)
    lora_kw = _lora_options(raw, lora)
    operator, weights, temperature = _operator(raw, terms, limits, lora_mode=lora_kw["lora_mode"])
    schedule, learned = _schedule(raw, limits)
    method, divergence, solver = _sampler(raw, schedule, learned)
    num_particles, langevin_steps = _particles(raw, operator, limits)
    guidance = _float(raw, "guidance", None)
    if guidance is not None:
        from compose.options import check_guidance

        check_guidance(guidance, "guidance")  # the pipeline's range: guidance is no resource
    negative = raw.get("negative_prompt") or None
    if negative is not None and not isinstance(negative, str):
        raise ValueError(f"negative_prompt must be a string; got {type(negative).__name__}.")
    if negative is not None:
        check_prompt_length("negative_prompt", negative, limits)
    images = _int(raw, "images", 1, 1, limits.max_images)
    lift, candidates, select = _verification(raw, operator, guidance, images, limits)
    lift_levels, lift_draws = _lift_levels(raw, lift, candidates, limits)
    return Job(
        models=models,
        prompts=prompts,
        operator=operator,
        weights=weights,
        temperature=temperature,
        seed=_int(raw, "seed", 0, 0, 2**63 - 1 - limits.max_images),
        steps=_int(raw, "steps", int(learned["nfe"]) if learned is not None else 50, 1, limits.max_steps, STEPS_CAP),
        schedule=schedule,
        guidance=guidance,
        negative_prompt=negative,
        method=method,
        divergence=divergence,
        solver=solver,
        num_particles=num_particles,
        langevin_steps=langevin_steps,
        images=images,
        height=_int(raw, "height", None, 8, limits.max_side),
        width=_int(raw, "width", None, 8, limits.max_side),
        id=job_id,
        lora=lora,
        **lora_kw,
        lift=lift,
        candidates=candidates,
        select=select,
        lift_levels=lift_levels,
        lift_draws=lift_draws,
    )


def _models_and_prompts(raw: dict, limits: Limits) -> tuple[list[str], list[str], int]:
    """The models, the prompts and the number of terms they make, bounded."""
    models = _as_list(raw.get("models"), "models")
    if not all(isinstance(m, str) for m in models):
        raise ValueError(f"models must be names, folders or hub ids (text); got {show(models)}.")
    models = [m.strip() for m in models if m.strip()]
    if not models:
        raise ValueError("models is missing; give a shipped model name (e.g. 'shapes-text'), a folder or a hub id.")
    if len(models) > limits.max_terms:
        raise ValueError(f"too many models: {len(models)}; the limit is {limits.max_terms}. Give fewer models.")
    for m in models:
        if len(m) > 500 or "\0" in m:
            raise ValueError(f"models: {show(m)} is not a model name, folder or hub id (too long).")
    if "prompts" not in raw or raw["prompts"] == "":
        raise ValueError(
            "prompts is missing; give a prompt, a list of prompts ('|'-separated in CSV), or [] for unconditional "
            "models."
        )
    if isinstance(raw["prompts"], str):
        # a cheap bound before splitting: every prompt at most max_prompt_chars, one separator between them
        cap = (limits.max_prompt_chars + 1) * limits.max_terms
        if len(raw["prompts"]) > cap:
            raise ValueError(
                f"prompts is {len(raw['prompts'])} characters long; the limit is {limits.max_prompt_chars} per "
                f"prompt and {limits.max_terms} prompts. Shorten it."
            )
    prompts = _as_list(raw["prompts"], "prompts")
    if len(prompts) > limits.max_terms:
        raise ValueError(
            f"too many terms: {len(prompts)} prompts; the limit is {limits.max_terms}. Give fewer prompts."
        )
    if not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"prompts must be non-empty strings; got {show(prompts)}.")
    prompts = [p.strip() for p in prompts]
    for i, p in enumerate(prompts):
        check_prompt_length(f"prompts: prompt {i + 1}", p, limits)
    terms = count_terms(len(models), len(prompts))
    if terms > limits.max_terms:
        raise ValueError(
            f"too many terms: {terms} (from {len(models)} models and {len(prompts)} prompts); the limit is "
            f"{limits.max_terms}. Give fewer prompts or models."
        )
    return models, prompts, terms


def _operator(
    raw: dict, terms: int, limits: Limits, lora_mode: str | None = None
) -> tuple[str | None, list[float] | None, float]:
    """The operator (a name of `compose.options.OPERATORS`), its weights and temperature. With a lora_mode (a LoRA
    baseline: the mode is the combination) the operator must be left out; weights are then the merge weights."""
    from compose.options import OPERATORS

    operator = raw.get("operator")
    if operator in ("", None, "none"):
        operator = None
    elif not isinstance(operator, str) or operator.lower() not in OPERATORS:
        raise ValueError(f"operator={show(operator)} is not known; use one of {list(OPERATORS)}.")
    else:
        operator = operator.lower()
    if lora_mode is not None and operator is not None:
        raise ValueError(f"lora_mode {lora_mode!r} is itself the combination of the LoRAs; drop operator.")
    if operator is None and terms > 1 and lora_mode is None:
        raise ValueError(f"operator is missing but there are {terms} terms; choose one of {list(OPERATORS)}.")
    weights = raw.get("weights")
    if weights in (None, "", []):
        weights = None
    else:
        items = _as_list(weights, "weights")
        if len(items) != terms:
            raise ValueError(f"weights has {len(items)} entries for {terms} terms; give one weight per term.")
        weights = [_float({"weights": w}, "weights", None) for w in items]
        if any(w is None or abs(w) > limits.max_weight for w in weights):
            raise ValueError(
                f"weights={show(raw.get('weights'))}: give one number per term, each from -{limits.max_weight:g} to "
                f"{limits.max_weight:g}."
            )
    temperature = _float(raw, "temperature", 1.0)
    if not 0 < temperature <= limits.max_weight:
        raise ValueError(
            f"temperature={temperature:g} is out of range; give a number above 0 and at most {limits.max_weight:g} "
            "(1 samples the mixture)."
        )
    return operator, weights, temperature


def _schedule(raw: dict, limits: Limits) -> tuple[str | None, dict | None]:
    """The grid name or schedule file (None: the checkpoint's default), and the file's keys (None for a name)."""
    from compose.grids import is_schedule_file
    from compose.options import GRIDS, SCHEDULER_GRID

    names = (*GRIDS, SCHEDULER_GRID)  # a flow-matching checkpoint's own sigmas
    schedule = raw.get("schedule")
    if schedule is None:
        return None, None
    if not isinstance(schedule, str):
        raise ValueError(
            f"schedule must be a grid name ({list(names)}) or the path of a learned-schedule JSON; got "
            f"{type(schedule).__name__}."
        )
    if is_schedule_file(schedule):
        if len(schedule) > 4096 or "\0" in schedule:
            raise ValueError(f"schedule={show(schedule)} is not a usable path; give a grid name or a JSON path.")
        return schedule, _schedule_file(schedule, limits)
    if schedule not in names:
        raise ValueError(
            f"schedule={show(schedule)} is not known; use one of {list(names)} or the path of a learned-schedule JSON."
        )
    return schedule, None


def _sampler(raw: dict, schedule: str, learned: dict | None) -> tuple[str, str | None, str | None]:
    """method, divergence and solver; a schedule file brings its ODE method and solver as defaults."""
    from compose.options import HUTCHINSON, METHODS, SOLVERS

    method = _choice(raw, "method", METHODS, "ode" if learned is not None else "sde")
    divergence = _choice(raw, "divergence", HUTCHINSON, None, " (method 'ode')")
    default = learned["solver"] if learned is not None else None
    solver = _choice(raw, "solver", SOLVERS, default, " ('dpm2m' and 'unipc' need method 'ode')")
    if learned is not None and (method != "ode" or solver != learned["solver"]):
        raise ValueError(
            f"schedule: the file {schedule} was learned for method 'ode' with solver {learned['solver']!r}; this job "
            f"asks for method {method!r}, solver {solver!r}. Leave method and solver out (the file's are used) or "
            "set them to the file's."
        )
    return method, divergence, solver


def _particles(raw: dict, operator: str | None, limits: Limits) -> tuple[int | None, int | None]:
    """num_particles and langevin_steps, which only operator 'product_smc' takes."""
    from compose.options import operator_record

    num_particles = _int(raw, "num_particles", None, 2, limits.max_particles)
    if num_particles is not None and not (operator is not None and operator_record(operator).particles):
        raise ValueError(
            f"num_particles is used by operator 'product_smc' only; got operator={operator!r}. Drop num_particles or "
            "use operator 'product_smc'."
        )
    langevin_steps = _int(raw, "langevin_steps", None, 0, limits.max_langevin_steps)
    if langevin_steps is not None and num_particles is None:
        raise ValueError(
            f"langevin_steps (Langevin moves of the particles) needs operator 'product_smc' with num_particles; got "
            f"operator={operator!r}, num_particles=None. Drop langevin_steps or give both."
        )
    return num_particles, langevin_steps


def _verification(
    raw: dict, operator: str | None, guidance: float | None, images: int, limits: Limits
) -> tuple[str | None, int | None, str | None]:
    """lift, candidates and select (None when not given), the per-image concept scores and the candidates they
    choose between (`pipelines.verify`). Candidates are sampled in full: images x candidates counts against
    max_images. The combinations the pipeline refuses are refused here, before any model is loaded."""
    from compose.options import LIFT_ESTIMATORS, operator_record
    from compose.verify import MAX_CANDIDATES

    lift = _choice(raw, "lift", ("auto", *LIFT_ESTIMATORS, NO_LIFT), None, f" ({NO_LIFT!r}: no lift)")
    candidates = _int(raw, "candidates", None, 1, min(limits.max_candidates, MAX_CANDIDATES), CANDIDATES_CAP)
    select = _choice(raw, "select", ("lift", "random"), None, " (the best score, or a random candidate)")
    K = candidates or 1
    if images * K > limits.max_images:
        raise ValueError(
            f"images x candidates = {images} x {K} = {images * K} images to sample; the limit is {limits.max_images} "
            "(max_images: every candidate is sampled in full). Give fewer images or candidates."
        )
    if select is not None and K == 1:
        raise ValueError("select chooses between candidates; give candidates >= 2 or drop select.")
    if K > 1 and operator is not None and operator_record(operator).particles:
        raise ValueError(
            f"candidates chooses between independent samples; operator {operator!r} has particles of its own "
            "(num_particles). Drop candidates, or use operator 'product'."
        )
    if K > 1 and select != "random" and lift == NO_LIFT:
        raise ValueError(
            f"candidates={K} keeps the candidate with the best lift, but lift is {NO_LIFT!r}; drop lift (the default "
            "'auto' computes one), or give select 'random'."
        )
    if K > 1 and select != "random" and lift == "tracked" and guidance is not None and guidance <= 1:
        raise ValueError(
            f"lift 'tracked' reads every term against the unconditional branch, which guidance={guidance:g} turns "
            "off, so it cannot choose between candidates; give guidance > 1, or drop lift (with candidates the "
            "default is 'renoise')."
        )
    return lift, candidates, select


def _lift_levels(
    raw: dict, lift: str | None, candidates: int | None, limits: Limits
) -> tuple[list[float] | None, int | None]:
    """lift_levels (a list of log-SNR values, or a CSV cell "3,2,1,0") and lift_draws (noise draws per level), the
    "renoise" lift's options (None when not given). Refused where no "renoise" lift runs (they would be ignored),
    and beyond max_steps evaluations (levels x draws) per candidate: each is a batched network call, like a step."""
    from .verify import MAX_DRAWS, MAX_LEVELS

    value = raw.get("lift_levels")
    levels = None
    if value not in (None, "", []):
        if isinstance(value, str) and len(value) > 40 * MAX_LEVELS:
            raise ValueError(f"lift_levels is {len(value)} characters long; give at most {MAX_LEVELS} numbers.")
        items = [v.strip() for v in value.split(",")] if isinstance(value, str) else _as_list(value, "lift_levels")
        if not 1 <= len(items) <= MAX_LEVELS:
            raise ValueError(f"lift_levels has {len(items)} entries; give 1 to {MAX_LEVELS} log-SNR values.")
        levels = [_float({"lift_levels": v}, "lift_levels", None) for v in items]
        if any(v is None or not -20 <= v <= 20 for v in levels):  # "" parses to None
            raise ValueError(
                f"lift_levels must be log-SNR values from -20 to 20 (e.g. [3, 2, 1, 0]); got {show(value)}."
            )
        if len(set(levels)) != len(levels):
            raise ValueError(f"lift_levels repeats a level ({show(value)}); use lift_draws for more draws per level.")
    draws = _int(raw, "lift_draws", None, 1, MAX_DRAWS, " (noise draws per lift level)")
    if levels is None and draws is None:
        return None, None
    estimator = ("tracked" if (candidates or 1) == 1 else "renoise") if lift in (None, "auto") else lift
    if estimator != "renoise":
        given = " and ".join(k for k, v in (("lift_levels", levels), ("lift_draws", draws)) if v is not None)
        raise ValueError(
            f"{given} set(s) the 'renoise' lift, but this job's lift is {estimator!r}; give lift 'renoise' (or "
            "candidates >= 2 with the default lift), or drop it."
        )
    evaluations = len(levels or (0,) * 4) * (draws or 1)
    if evaluations > limits.max_steps:
        raise ValueError(
            f"lift_levels x lift_draws = {evaluations} network evaluations per candidate; the limit is "
            f"{limits.max_steps}{STEPS_CAP}. Give fewer levels or draws."
        )
    return levels, draws


def _loras(raw: dict, terms: int, limits: Limits) -> tuple[list[str | None] | None, int]:
    """The LoRA of every term (shipped LoRA names or folders; "none" / "" for the base) and the number of terms they
    make: one entry per term, or several LoRAs for a single term (one term each). Each is resolved here, so a name
    that is not a shipped LoRA nor a folder with LoRA weights is refused before anything is loaded."""
    value = raw.get("lora")
    if value in (None, "", []):
        return None, terms
    if isinstance(value, str) and len(value) > 600 * limits.max_terms:
        raise ValueError(f"lora is {len(value)} characters long; give at most {limits.max_terms} short names.")
    items = _as_list(value, "lora")
    if not all(v is None or isinstance(v, str) for v in items):
        raise ValueError(f"lora must be LoRA names or folders (text, 'none' for the base); got {show(items)}.")
    items = [None if v is None or v.strip().lower() in ("", "none") else v.strip() for v in items]
    if len(items) > limits.max_terms:
        raise ValueError(f"too many LoRAs: {len(items)}; the limit is {limits.max_terms}. Give fewer.")
    for v in items:
        if v is not None:
            resolve_lora(v)
    if terms == 1 and len(items) > 1:
        terms = len(items)
    elif len(items) != terms:
        raise ValueError(
            f"lora has {len(items)} entries for {terms} terms; give one per term ('none' for the base), or several "
            "LoRAs with one prompt on one model (one term each)."
        )
    return items, terms


def _lora_options(raw: dict, lora: list | None) -> dict[str, Any]:
    """lora_mode, lora_uncond, lora_switch_steps, lora_scale (None when not given)."""
    from compose.options import LORA_MODES, LORA_UNCOND

    mode = _choice(raw, "lora_mode", LORA_MODES, None, " (or leave it out to compose the LoRA terms with operator)")
    uncond = _choice(raw, "lora_uncond", LORA_UNCOND, None)
    steps = _int(raw, "lora_switch_steps", None, 1, 10_000)
    scale = _float(raw, "lora_scale", None)
    if scale is not None and not 0 <= scale <= 10:
        raise ValueError(f"lora_scale={scale:g} is out of range; give a number from 0 to 10 (1: as trained).")
    given = [
        k
        for k, v in (("lora_mode", mode), ("lora_uncond", uncond), ("lora_switch_steps", steps), ("lora_scale", scale))
        if v is not None
    ]
    if lora is None and given:
        raise ValueError(f"{given[0]} needs lora (the LoRA of every term); add lora or drop {given[0]}.")
    if mode is not None and (len(lora) < 2 or any(v is None for v in lora)):
        raise ValueError(f"lora_mode {mode!r} combines several LoRAs: give lora at least two LoRA names (no 'none').")
    if steps is not None and mode != "switch":
        raise ValueError(f"lora_switch_steps is used by lora_mode 'switch'; got lora_mode={mode!r}.")
    if uncond is not None and mode is not None:
        raise ValueError(
            f"lora_uncond is for LoRA terms composed by an operator; lora_mode {mode!r} uses each LoRA's own."
        )
    return {"lora_mode": mode, "lora_uncond": uncond, "lora_switch_steps": steps, "lora_scale": scale}


# ---------------------------------------------------------------------- models
def shipped_loras() -> list[str]:
    """Names of the shipped LoRAs (folders with pytorch_lora_weights.safetensors under model_cards/)."""
    names = set()
    for d in shipped.SHIPPED_DIRS:
        if d.is_dir():
            names.update(p.name for p in d.iterdir() if (p / LORA_WEIGHTS).is_file())
    return sorted(names)


def resolve_lora(name: str) -> str:
    """A shipped LoRA name -> its folder; otherwise a local folder holding a .safetensors file (the batch runner's
    folders; the Space passes shipped names only). Anything else (a pickle, a missing path, a hub id) is refused."""
    if not isinstance(name, str) or len(name) > 500 or "\0" in name:
        raise ValueError(f"lora: {show(name)} is not a LoRA name or folder.")
    for d in shipped.SHIPPED_DIRS:
        if "/" not in name and name not in (".", "..") and (d / name / LORA_WEIGHTS).is_file():
            return str(d / name)
    p = Path(name).expanduser()
    try:
        ok = p.is_dir() and any(f.suffix == ".safetensors" for f in p.iterdir())
    except OSError:
        ok = False
    if not ok:
        raise ValueError(
            f"lora: {show(name, 200)} is not a shipped LoRA ({', '.join(shipped_loras()) or 'none'}) nor a folder "
            "with LoRA weights (.safetensors); give one of those."
        )
    return str(p)


def lora_adapter_name(entry: str | None) -> str | None:
    """The adapter name a job's LoRA entry gets on the pipeline: the folder's name (letters, digits, . _ -)."""
    if entry is None:
        return None
    import re

    base = Path(entry.rstrip("/\\")).name or "lora"
    return re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip("._-")[:100] or "lora"


def load_job_loras(pipe, job: Job) -> None:
    """Attach the job's LoRAs to the pipeline (its first checkpoint), each under `lora_adapter_name`; loaded ones
    are kept (a cached pipeline serves many jobs)."""
    if not job.lora:
        return
    experts = {lora_adapter_name(v): resolve_lora(v) for v in job.lora if v is not None}
    pipe.load_lora_experts(experts)


def resolve_model(name: str) -> str:
    """A job's model name -> its folder or hub id: `pipelines.shipped.resolve_model`, the rule `from_pretrained`
    uses too (an existing folder, a bare shipped name, or a hub id owner/name)."""
    return _resolve_model(name, field="models")


class PipelineCache:
    """Loaded `ComposePipeline`s keyed by their checkpoints (the most recent `size` kept)."""

    def __init__(self, size: int = 2, device: str | torch.device | None = None) -> None:
        self.size = size
        self.device = device
        self._pipes: OrderedDict[tuple[str, ...], Any] = OrderedDict()

    def get(self, models: list[str]):
        """The pipeline over `models` (names / folders / hub ids); ValueError when one cannot be loaded."""
        from .compose_pipeline import ComposePipeline

        key = tuple(resolve_model(m) for m in models)
        if key in self._pipes:
            self._pipes.move_to_end(key)
            return self._pipes[key]
        try:
            pipe = ComposePipeline.from_pretrained(list(key) if len(key) > 1 else key[0])
        except ValueError:
            raise
        except Exception as err:  # OSError, EnvironmentError from the hub, missing components, bad configs
            raise ValueError(
                f"models: cannot load {show(list(models), 300)}: {type(err).__name__}: {show(str(err), 300)}"
            ) from None
        if self.device is not None:
            pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self._pipes[key] = pipe
        while len(self._pipes) > self.size:
            self._pipes.popitem(last=False)
        return pipe


# ---------------------------------------------------------------------- running
def generators(job: Job, device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per image: image i is seeded `seed + i`."""
    import torch

    return [torch.Generator(device=device).manual_seed(job.seed + i) for i in range(job.images)]


def pipeline_kwargs(job: Job) -> dict[str, Any]:
    """THE mapping from a job's fields to `ComposePipeline.__call__` keyword arguments (not the generator)."""
    kw = {
        "prompt": list(job.prompts) or None,
        "operator": job.operator,
        "weights": job.weights,
        "temperature": job.temperature,
        "guidance_scale": job.guidance,
        "negative_prompt": job.negative_prompt,
        "num_inference_steps": job.steps,
        "schedule": job.schedule,
        "method": job.method,
        "num_images_per_prompt": job.images,
        "height": job.height,
        "width": job.width,
    }
    if job.divergence is not None:
        kw["divergence"] = job.divergence
    if job.solver is not None:
        kw["solver"] = job.solver
    if job.num_particles is not None:
        kw["num_particles"] = job.num_particles
    if job.langevin_steps is not None:
        kw["langevin_steps"] = job.langevin_steps
    if job.lift is not None:
        kw["lift"] = _lift_arg(job)
    if job.candidates is not None:
        kw["candidates"] = job.candidates
    if job.select is not None:
        kw["select"] = job.select
    if job.lift_levels is not None:
        kw["lift_levels"] = tuple(job.lift_levels)
    if job.lift_draws is not None:
        kw["lift_draws"] = job.lift_draws
    if job.lora is not None:
        kw["lora"] = [lora_adapter_name(v) for v in job.lora]
        if job.lora_mode is not None:  # the mode is the combination: no operator (parse_job refused one)
            kw["lora_mode"] = job.lora_mode
        for key in ("lora_uncond", "lora_switch_steps", "lora_scale"):
            if getattr(job, key) is not None:
                kw[key] = getattr(job, key)
    return kw


class TimeLimitExceeded(ValueError):
    """A job ran past its time limit (`Deadline`); a ValueError, so it is reported like any bad request."""


class Deadline:
    """A wall-clock budget of `seconds` from `start` (default: now); `check` raises TimeLimitExceeded once spent."""

    def __init__(self, seconds: float, start: float | None = None) -> None:
        self.seconds = float(seconds)
        self.start = time.monotonic() if start is None else start

    def left(self) -> float:
        return self.start + self.seconds - time.monotonic()

    def check(self, step: int | None = None, steps: int | None = None) -> None:
        if self.left() < 0:
            where = f" (stopped after step {step} of {steps})" if step is not None else ""
            raise TimeLimitExceeded(
                f"time limit: this request ran longer than the limit of {self.seconds:g} s{where}; ask for fewer "
                "steps or images, or a smaller size."
            )


def check_prompt_tokens(pipe, job: Job, limits: Limits) -> None:
    """Count each prompt's tokens in every tokenizer of the loaded pipeline; ValueError over the limit (the job's
    `max_prompt_tokens`, and the tokenizer's own maximum less its two special tokens, past which it would cut)."""
    texts = [(f"prompts: prompt {i + 1}", p) for i, p in enumerate(job.prompts)]
    if job.negative_prompt:
        texts.append(("negative_prompt", job.negative_prompt))
    for model in getattr(pipe, "models", []):
        for tok in (getattr(model, "tokenizer", None), getattr(model, "tokenizer_2", None)):
            if tok is None:
                continue
            own = getattr(tok, "model_max_length", None)
            own = own - 2 if isinstance(own, int) and 2 < own < 10**6 else None
            caps = [c for c in (limits.max_prompt_tokens, own) if c is not None]
            if not caps:
                continue
            cap = min(caps)
            for name, text in texts:
                n = len(tok(text, add_special_tokens=False, truncation=False).input_ids)
                if n > cap:
                    raise ValueError(f"{name} is {n} tokens long; the limit is {cap} tokens. Shorten it.")


def run_job(pipe, job: Job, progress: Any = None, deadline: Deadline | None = None) -> JobResult:
    """Run one job on a loaded pipeline; `progress(step, steps)` is called after every step.

    The pipeline's ValueErrors (e.g. a prompt for a model without text encoder) pass through unchanged; other
    errors of the network call (e.g. a resolution the UNet cannot take) become ValueErrors naming the job.
    deadline: checked before sampling and after every step (TimeLimitExceeded, a ValueError, stops the job).
    """
    import torch

    def on_step(_pipe, k, _t, _tensors):
        if progress is not None:
            progress(k + 1, job.steps)
        if deadline is not None:
            deadline.check(k + 1, job.steps)
        return {}

    if deadline is not None:
        deadline.check()

    load_job_loras(pipe, job)
    kw = pipeline_kwargs(job)
    t0 = time.perf_counter()
    try:
        out = pipe(
            **kw,
            generator=generators(job),
            output_type="pil",
            callback_on_step_end=on_step,
        )
    except ValueError:
        raise
    except RuntimeError as err:
        raise ValueError(
            f"the pipeline failed on this job: RuntimeError: {str(err).splitlines()[0][:300]} (height / width the "
            "model cannot take, or an operator / method the model does not support)."
        ) from None
    seconds = time.perf_counter() - t0
    log_q = out.log_q_trace.detach().to(torch.float64).cpu()  # (steps, images, terms)
    terms = _term_names(job)
    verification = job.verification()
    lift = None if out.lift is None else out.lift.detach().to(torch.float64).cpu()
    return JobResult(
        images=list(out.images),
        kappa=out.kappa.detach().to(torch.float64).cpu(),
        log_q=log_q,
        timesteps=out.timesteps.detach().cpu(),
        terms=terms,
        seconds=seconds,
        lift=lift,
        lift_terms=[] if lift is None else _lift_term_names(job, terms, lift.shape[-1]),
        estimator=None if lift is None else verification.estimator,
        score_rule=verification.default_rule(job.operator),
        lift_scores=None if out.lift_scores is None else out.lift_scores.detach().to(torch.float64).cpu(),
        candidate=None if out.candidate is None else out.candidate.detach().cpu(),
        candidates=verification.candidates,
        verification_rows=int(out.verification_rows),
    )


def _term_names(job: Job) -> list[str]:
    names = _plain_term_names(job)
    if not job.lora:
        return names
    loras = [lora_adapter_name(v) for v in job.lora]
    if job.lora_mode == "merge":
        return [f"{names[0]} [merge: {' + '.join(loras)}]"]
    names = names * len(loras) if len(names) == 1 else names
    return [n if a is None else f"{n} [{a}]" for n, a in zip(names, loras, strict=True)]


def _lift_term_names(job: Job, terms: list[str], count: int) -> list[str]:
    """The names of the lift's columns: the terms, or with lora_mode "merge" read by "renoise", every merged LoRA on
    the prompt (`pipelines.verify.verification_rows`)."""
    if count == len(terms) or not job.lora:
        return terms
    base = _plain_term_names(job)[0]
    return [f"{base} [{lora_adapter_name(v)}]" for v in job.lora if v is not None][:count]


def _plain_term_names(job: Job) -> list[str]:
    models = [os.path.basename(os.path.normpath(m)) for m in job.models]
    n = count_terms(len(job.models), len(job.prompts))
    if len(models) == 1:
        return list(job.prompts) or models
    if len(job.prompts) == len(models):
        return [f"{p} @ {m}" for p, m in zip(job.prompts, models, strict=True)]
    if len(job.prompts) == 1:
        return [f"{job.prompts[0]} @ {m}" for m in models]
    return models[:n]


__all__ = [
    "FIELDS",
    "Deadline",
    "Job",
    "JobResult",
    "Limits",
    "PipelineCache",
    "count_terms",
    "generators",
    "parse_job",
    "pipeline_kwargs",
    "resolve_model",
    "resolve_lora",
    "run_job",
    "shipped_loras",
    "load_job_loras",
    "check_prompt_length",
    "check_prompt_tokens",
    "show",
    "shipped_models",
    "TimeLimitExceeded",
]
