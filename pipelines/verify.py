"""Density-verified composition in the pipeline: every image's concept scores (`out.lift`) and the candidates they
choose between (`candidates=`, `select=`, `steer=`). The maths is `compose.verify`'s (docs/MATH.md section 9).

Two estimators of a term's lift, log q_term(x) - log q_ref(x) at the sampled image x:

- "tracked": the difference of the log-densities the sampler tracks along the trajectory (the Ito estimator under
  method="sde"; no extra network row). Its reference is the composition's unconditional leaf, so it needs guidance
  (guidance_scale > 1). Its noise is the path's (docs/MATH.md section 9), and on pixel models the low-noise end of the
  path dominates it: read it as a diagnostic, not a verdict.
- "renoise" (default): the difference of the two models' denoising losses on the finished image, noised again at a
  few log-SNR levels `lift_levels` with one noise draw shared by the term and its reference,
      lift_c ~ (1/2) sum_j dlam_j ( ||eps_j - eps_ref(x_j)||^2 - ||eps_j - eps_c(x_j)||^2 ),
  the eps-form of the continuous-time ELBO, int (1/2) E||eps - eps_hat(x_lam)||^2 dlam (Kingma et al. 2021), read
  on the window of log-SNR where these models decide shape and colour; in nats over that window. Each level is ONE
  batched call of every verification row (each term, and each distinct reference) per candidate: with L levels and
  V distinct rows, L V extra rows per candidate (12 for two prompts on one model with the default 4 levels, against
  150 for 50 sampling steps with guidance). `lift_draws` D > 1 averages each level's loss difference over D
  independent noise draws: the lift's noise variance falls by 1/D, for D L V rows.

The reference of a term: its checkpoint's unconditional branch ("" or the negative prompt) for a prompt term; the
base network on the same prompt for a LoRA term (what the LoRA adds); for unconditional checkpoints, the mean over
the terms (lift_i = score_i - mean_j score_j: which model explains the image best, the OR reading).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from compose.loop import Hooks, StepInfo
from compose.options import LIFT_ESTIMATORS
from compose.smc import reweight_and_resample
from compose.verify import (
    MAX_CANDIDATES,
    best_of,
    check_candidates,
    check_rule,
    check_steering,
    random_of,
    score,
)

from .batching import UNCOND, Leaf, NetworkGroups
from .lora import BASE, Merged

STEER_AT = (0.3, 0.5, 0.7)  # the fractions of the steps after which "renoise" steering weighs the candidates
DEFAULT_LEVELS = (-1.0, -2.0, -3.0, -4.0)  # log-SNR where the 24-px shapes models decide: guides/verification.md
MAX_LEVELS = 16
MAX_DRAWS = 16  # noise draws per level (lift_draws)


@dataclass(frozen=True)
class Verification:
    """A call's verification options (`ComposePipeline.__call__`'s lift, lift_levels, candidates, select, steer,
    score_rule, lift_draws), checked by `check` before any network call."""

    lift: str | None
    levels: tuple
    candidates: int
    select: str
    steer: float
    rule: str | None
    draws: int = 1

    @property
    def rows_per_check(self) -> int:
        """Network calls' worth of rows per verification row and candidate: levels x noise draws."""
        return len(self.levels) * self.draws

    @property
    def estimator(self) -> str | None:
        """The lift actually computed: "auto" is the free "tracked" lift for one sample per image and the
        "renoise" lift to choose between candidates."""
        if self.lift != "auto":
            return self.lift
        return "tracked" if self.candidates == 1 else "renoise"

    def check(self, smc: bool, method: str, operator: Any) -> int:
        """ValueError naming the argument for a bad option; the candidates per image."""
        if self.lift is not None and self.lift != "auto" and self.lift not in LIFT_ESTIMATORS:
            raise ValueError(
                f"lift={self.lift!r} is not known; use 'auto', one of {LIFT_ESTIMATORS} or None (no lift)."
            )
        K = check_candidates(self.candidates)
        if self.select not in ("lift", "random"):
            raise ValueError(f"select={self.select!r} is not known; use 'lift' (the best score) or 'random'.")
        check_steering(self.steer, K, method)
        if self.rule is not None:
            check_rule(self.rule, self.steer, arg="score_rule")
        levels = self.levels
        if (
            not isinstance(levels, (list, tuple))
            or not 1 <= len(levels) <= MAX_LEVELS
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in levels)
            or not all(-20 <= v <= 20 for v in levels)
        ):
            raise ValueError(
                f"lift_levels must be 1 to {MAX_LEVELS} log-SNR values from -20 to 20 (e.g. {DEFAULT_LEVELS}); got "
                f"{levels!r}."
            )
        if isinstance(self.draws, bool) or not isinstance(self.draws, int) or not 1 <= self.draws <= MAX_DRAWS:
            raise ValueError(
                f"lift_draws must be an integer from 1 to {MAX_DRAWS} (noise draws per lift level); got "
                f"{self.draws!r}."
            )
        if smc and (K > 1 or self.steer):
            raise ValueError(
                "candidates and steer choose between independent samples; operator='product_smc' has particles of "
                "its own (num_particles). Drop candidates / steer, or use operator='product'."
            )
        if self.estimator is None and K > 1 and self.select == "lift":
            raise ValueError(f"candidates={K} with select='lift' needs a lift; give lift='renoise' or 'tracked'.")
        if self.steer and self.estimator is None:
            raise ValueError("steer weighs the candidates by their lift; give lift='renoise' or 'tracked' with it.")
        return K

    def check_reference(self, use_cfg: bool) -> None:
        """The tracked lift is read against the unconditional branch: refuse choosing or steering by it without one
        (guidance off, unconditional checkpoints, a guidance-distilled family)."""
        if use_cfg or self.estimator != "tracked":
            return
        if self.steer or (self.candidates > 1 and self.select == "lift"):
            raise ValueError(
                "lift='tracked' is read against the unconditional branch, which this call has none of (guidance "
                "off, unconditional checkpoints or an embedded guidance); choose with lift='renoise' (it evaluates "
                "its own references) or give guidance_scale > 1."
            )

    def default_rule(self, operator: Any) -> str:
        """ "max" (any concept) for OR, else "min" (every concept)."""
        if self.rule is not None:
            return self.rule
        return "max" if isinstance(operator, str) and operator.lower() == "or" else "min"


def verification_rows(leaves: list[Leaf], uncond: list[Leaf], conds: dict, lora_plan) -> tuple[list, list, list]:
    """(the rows to re-noise, each term's index among them, each term's reference index or None).

    Terms: the call's term leaves, or with lora_mode="merge" one leaf per merged LoRA on the prompt (the merged
    network is one term; its LoRAs' lifts say which of their concepts the image shows). References: see the module
    docstring; distinct (checkpoint, prompt, adapter) rows are evaluated once."""
    terms = list(leaves)
    if lora_plan.mode == "merge" and isinstance(leaves[0].adapter, Merged):
        base = leaves[0]
        terms = []
        for name in base.adapter.names:
            leaf = Leaf(base.schedule, f"{base.name} [{name}]", base.model, base.prompt, adapter=name)
            conds[id(leaf)] = conds[id(base)]
            terms.append(leaf)
    rows: list[Leaf] = []
    keys: dict[tuple, int] = {}

    def add(leaf: Leaf) -> int:
        key = (id(leaf.model), leaf.prompt is UNCOND, leaf.prompt, _adapter_key(leaf.adapter))
        if key not in keys:
            keys[key] = len(rows)
            rows.append(leaf)
        return keys[key]

    term_idx = [add(leaf) for leaf in terms]
    ref_idx: list[int | None] = []
    for leaf in terms:
        if leaf.adapter is not None and leaf.adapter != BASE:  # a LoRA term: the base network on its prompt
            spec = BASE if lora_plan.routing is not None else None
            ref = Leaf(leaf.schedule, f"{leaf.name} (base)", leaf.model, leaf.prompt, adapter=spec)
            conds[id(ref)] = conds[id(leaf)]
            ref_idx.append(add(ref))
        elif leaf.model.is_text:
            u = next((u for u in uncond if u.model is leaf.model and u.adapter in (None, BASE)), None)
            u = u or next((u for u in uncond if u.model is leaf.model), None)
            if u is None:
                ref_idx.append(None)  # no unconditional rows (guidance off): the caller encodes them
                continue
            ref = Leaf(u.schedule, u.name, u.model, UNCOND, adapter=u.adapter)
            conds[id(ref)] = conds[id(u)]
            ref_idx.append(add(ref))
        else:
            ref_idx.append(None)
    return rows, term_idx, ref_idx


def _adapter_key(adapter: Any) -> Any:
    return (adapter.names, adapter.weights) if isinstance(adapter, Merged) else adapter


@torch.no_grad()
def renoise_lifts(
    groups: NetworkGroups, x0: torch.Tensor, schedule, levels, draws, term_idx, ref_idx, repeats: int = 1
) -> torch.Tensor:
    """(rows, T) float64 lifts of the finished states x0 (rows, ...) by their re-noised denoising losses (module
    docstring): one batched call of every verification row per log-SNR level and noise draw, the draw shared by the
    rows; `repeats` draws per level, their loss differences averaged."""
    lams = sorted((float(v) for v in levels), reverse=True)
    widths = _widths(lams)
    err_sum = None
    for lam, w in zip(lams, widths, strict=True):
        t = schedule.t_from_log_snr(torch.tensor(lam, dtype=torch.float64))
        for _ in range(repeats):
            eps = draws.noise(x0)
            xt = float(schedule.alpha(t)) * x0 + float(schedule.sigma(t)) * eps
            pred = groups.predict(xt, t, schedule)[0]  # (V, rows, ...)
            err = (pred.double() - eps.double()).flatten(2).pow(2).sum(-1) * (0.5 * w / repeats)  # (V, rows)
            err_sum = err if err_sum is None else err_sum + err
    cols = []
    T = len(term_idx)
    for i, r in zip(term_idx, ref_idx, strict=True):
        if r is None:  # unconditional checkpoints: against the mean over the terms
            mean = torch.stack([err_sum[j] for j in term_idx]).mean(0) if T > 1 else err_sum[i]
            cols.append(mean - err_sum[i])
        else:
            cols.append(err_sum[r] - err_sum[i])
    return torch.stack(cols, -1)


def _widths(lams: list[float]) -> list[float]:
    """Quadrature widths of log-SNR points (decreasing): the midpoint rule's cells; one point: width 1."""
    if len(lams) == 1:
        return [1.0]
    edges = [lams[0] + (lams[0] - lams[1]) / 2]
    edges += [(a + b) / 2 for a, b in zip(lams, lams[1:], strict=False)]
    edges.append(lams[-1] - (lams[-2] - lams[-1]) / 2)
    return [a - b for a, b in zip(edges, edges[1:], strict=False)]


class RenoiseSteering(Hooks):
    """Feynman-Kac steering of the K candidates of every image by their "renoise" lift (docs/MATH.md section 9): after
    the steps `at` (indices), every candidate's composed data prediction x0_hat is scored by `renoise_lifts`, its
    log-weight gains strength x (score - its score at the previous check), and the groups whose ESS fell below
    ess_threshold K are resampled (systematic). SDE samplers only (first-order steps keep no history to resample).
    Each check costs len(levels) x repeats x the verification rows per candidate (`rows`)."""

    def __init__(
        self,
        n: int,
        K: int,
        groups,
        schedule,
        levels,
        term_idx,
        ref_idx,
        *,
        rule: str,
        repeats: int = 1,
        strength: float,
        at: set[int],
        ess_threshold: float = 0.5,
        device: Any = None,
    ) -> None:
        self.n, self.K, self.groups, self.schedule, self.levels = n, K, groups, schedule, levels
        self.repeats = repeats
        self.term_idx, self.ref_idx, self.rule, self.strength, self.at = term_idx, ref_idx, rule, strength, at
        self.ess_threshold = ess_threshold
        self.log_w = torch.zeros(n, K, dtype=torch.float64, device=device)
        self.prev = torch.zeros(n * K, dtype=torch.float64, device=device)
        self.ess: list[torch.Tensor] = []
        self.resampled: list[torch.Tensor] = []
        self.rows = 0  # verification rows per candidate spent on the checks
        self.u: torch.Tensor | None = None

    def draw(self, k: int, draws, final: bool) -> None:
        self.u = None if final else draws.uniforms(self.n)

    def after_step(self, k: int, step: StepInfo) -> tuple[torch.Tensor, torch.Tensor]:
        if step.final or k not in self.at or step.coeffs is None:
            return step.x, step.log_q
        c = step.coeffs.to(step.eps.dtype)
        eps_bar = torch.einsum("nl,ln...->n...", c, step.eps)
        a, sig = float(self.schedule.alpha(step.t_cur)), float(self.schedule.sigma(step.t_cur))
        x0 = (step.x_prev - sig * eps_bar) / a
        lifts = renoise_lifts(
            self.groups, x0, self.schedule, self.levels, step.draws, self.term_idx, self.ref_idx, self.repeats
        )
        self.rows += len(self.levels) * self.repeats * len(self.groups.leaves)
        now = score(lifts, self.rule).to(self.log_w.device)
        dl = self.strength * (now - self.prev)
        st = reweight_and_resample(
            step.x, step.log_q, self.log_w, dl, self.u, step.t_next, ess_threshold=self.ess_threshold
        )
        self.log_w = st.log_w
        flat = (st.ancestors + self.K * torch.arange(self.n, device=st.ancestors.device)[:, None]).reshape(-1)
        self.prev = now[flat.to(now.device)]
        self.ess.append(st.ess)
        self.resampled.append(st.resampled)
        return st.x, st.log_q


def steering_steps(num_steps: int, at=STEER_AT) -> set[int]:
    """The step indices after which the candidates are weighed: fractions `at` of the grid."""
    return {min(num_steps - 2, max(0, round(f * num_steps) - 1)) for f in at}


def tracked_lifts(log_q: torch.Tensor, term_index: list[int], u_index: int | None) -> torch.Tensor | None:
    """(rows, T) float64 tracked lifts against the composition's unconditional leaf; None without one."""
    if u_index is None:
        return None
    lq = log_q.to(torch.float64)
    return lq[:, term_index] - lq[:, [u_index]]


def choose(lifts: torch.Tensor | None, n: int, K: int, select: str, rule: str, draws) -> tuple[Any, Any]:
    """(flat row index (n,) of every image's kept candidate, every candidate's score (n, K) or None)."""
    scores = None if lifts is None else score(lifts, rule, K=K)
    if K == 1:
        return torch.arange(n), None if scores is None else scores.reshape(n, 1)
    if select == "lift":
        return best_of(scores, K), scores.reshape(n, K)
    return random_of(draws.uniforms(n), K), None if scores is None else scores.reshape(n, K)


__all__ = [
    "DEFAULT_LEVELS",
    "MAX_CANDIDATES",
    "MAX_DRAWS",
    "RenoiseSteering",
    "STEER_AT",
    "Verification",
    "choose",
    "renoise_lifts",
    "steering_steps",
    "tracked_lifts",
    "verification_rows",
]
