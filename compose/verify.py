"""Density-verified composition: per-sample concept scores from the tracked log-densities, and the samplers that use
them (best-of-K selection, Feynman-Kac steering). docs/MATH.md section 9.

The lift of a term c for a sample x is the difference of the two tracked log-densities at the end of sampling,

    lift_c(x) = log q_c(x) - log q_ref(x),

with ref the term's unconditional model (its "" prompt, or the base network of a LoRA term). For a conditional model
trained with caption dropout, q_c = p(x | c) and q_ref = p(x), so lift_c = log p(c | x) - log p(c): the implicit
classifier's log-likelihood ratio, in nats, no larger than -log p(c) (log 4 = 1.39 nats for one of four equally
likely colours). A sample that shows the concept has a lift near that bound; one that misses it, a lift well below 0.
Every term and its reference start from the same prior, so the lift is 0 at the first grid time; it is the sum of the
differences of the tracked increments along the trajectory (no extra network call). Its noise is the Ito estimator's:
the terms <z, eps_c - eps_ref> of every SDE step (docs/MATH.md section 9 has the variance); by ODE, the Hutchinson
probes' divergence estimates.

An image's score combines its terms' lifts by a rule: "min" (every concept present: AND, product, average), "max"
(any of them: OR) or "mean". Selection and steering maximise the score:
  - best-of-K (`best_of`): K candidates per image, independent, the one with the highest score kept;
  - steering (`LiftSteering`): the K candidates are particles with Feynman-Kac potentials exp(lam (s_k - s_{k-1}))
    on the score s_k of the tracked lifts at each grid time (the intrinsic-reward form of FK steering, Singhal et
    al. 2025); groups whose effective sample size falls below a threshold are resampled, and at the end the particle
    with the highest score is kept. The potentials telescope: without resampling a particle's final log-weight is
    lam s_N.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .loop import Draws, Hooks, StepInfo
from .smc import reweight_and_resample

RULES = ("min", "max", "mean", "zmin")
GROUP_RULES = ("zmin",)  # rules that compare an image's K candidates with each other: selection only
SELECTIONS = ("lift", "random")
MAX_CANDIDATES = 64


def check_rule(rule: str, steer: float = 0.0, arg: str = "rule") -> str:
    """`rule`, or ValueError naming `arg`: an unknown rule, or a rule that compares candidates with steering."""
    if rule not in RULES:
        raise ValueError(f"score rule {rule!r} is not known; use one of {RULES}.")
    if steer and rule in GROUP_RULES:
        raise ValueError(
            f"{arg}={rule!r} compares an image's candidates with each other, which steering cannot: it weighs each "
            f"particle by its own score. Use {arg}='min' with steer, or steer=0."
        )
    return rule


def lifts(log_q: torch.Tensor, terms: Sequence[int], refs: Sequence[int]) -> torch.Tensor:
    """(..., T) float64 lift of every term: log_q[..., terms[i]] - log_q[..., refs[i]]. log_q: (..., L)."""
    if len(terms) != len(refs):
        raise ValueError(f"terms ({len(terms)}) and refs ({len(refs)}) must pair up.")
    lq = log_q.to(torch.float64)
    return lq[..., list(terms)] - lq[..., list(refs)]


def score(lift: torch.Tensor, rule: str = "min", K: int | None = None) -> torch.Tensor:
    """(...,) an image's score from its terms' lifts (..., T) by `rule` ("min", "max" or "mean"); "zmin" (with K,
    lift (n K, T) group-major) standardises each term's lift across an image's K candidates (mean 0, standard
    deviation 1; a term equal on all K counts 0) and takes the smallest: the min rule made blind to each term's scale,
    for terms whose lifts are on different scales (a LoRA merge's colour and outline lifts)."""
    check_rule(rule)
    if rule == "zmin":
        if K is None:
            raise ValueError("score rule 'zmin' compares an image's K candidates; give K.")
        T = lift.shape[-1]
        g = lift.to(torch.float64).reshape(-1, K, T)
        sd = g.std(1, unbiased=False, keepdim=True)
        z = torch.where(sd > 0, (g - g.mean(1, keepdim=True)) / sd.clamp_min(1e-300), torch.zeros_like(g))
        return z.amin(-1).reshape(-1)
    if rule == "min":
        return lift.amin(-1)
    if rule == "max":
        return lift.amax(-1)
    return lift.mean(-1)


def best_of(scores: torch.Tensor, K: int) -> torch.Tensor:
    """(n,) flat row index of the best of every group of K consecutive rows (scores: (n K,); ties: the first)."""
    n = scores.numel() // K
    if n * K != scores.numel():
        raise ValueError(f"{scores.numel()} scores do not split into groups of K = {K}.")
    return scores.reshape(n, K).argmax(-1) + K * torch.arange(n, device=scores.device)


def random_of(u: torch.Tensor, K: int) -> torch.Tensor:
    """(n,) flat row index of one row per group of K drawn uniformly (u: (n,) in [0, 1)): the plain method at the
    same cost, the baseline every selection is compared with."""
    n = u.numel()
    pick = (u.to(torch.float64) * K).floor().long().clamp_max(K - 1)
    return pick + K * torch.arange(n, device=pick.device)


class LiftSteering(Hooks):
    """Feynman-Kac steering of K particles per image by the tracked lifts (module docstring), as hooks of
    `compose.loop.run`. x in the loop holds the n K particles group-major (the K of image i: rows i K .. i K + K-1).

    Args:
        n, K: images and particles per image.
        terms, refs: leaf indices (into the composer's leaves) of every term and of its reference.
        rule: how an image's score combines its terms' lifts ("min", "max", "mean"; not "zmin").
        strength: lam, the potentials' inverse temperature (0: no reweighting, best-of-K).
        ess_threshold: resample a group when its ESS falls below ess_threshold K.
        window: (t_lo, t_hi): resample only where t_next lies inside it.
    """

    def __init__(
        self,
        n: int,
        K: int,
        terms: Sequence[int],
        refs: Sequence[int],
        *,
        rule: str = "min",
        strength: float = 1.0,
        ess_threshold: float = 0.5,
        window: tuple[float, float] = (0.0, 1.0),
        device: Any = None,
    ) -> None:
        self.n, self.K, self.terms, self.refs = n, K, list(terms), list(refs)
        self.rule, self.strength = check_rule(rule), float(strength)
        self.ess_threshold, self.window = ess_threshold, window
        self.log_w = torch.zeros(n, K, dtype=torch.float64, device=device)
        self.prev: torch.Tensor | None = None  # (n K,) score at t_cur
        self.ess: list[torch.Tensor] = []
        self.resampled: list[torch.Tensor] = []
        self.u: torch.Tensor | None = None

    def scores(self, log_q: torch.Tensor) -> torch.Tensor:
        return score(lifts(log_q, self.terms, self.refs), self.rule)

    def draw(self, k: int, draws: Draws, final: bool) -> None:
        self.u = None if final else draws.uniforms(self.n)

    def state_replaced(self) -> None:
        self.prev = None  # a callback replaced the states: measure the next increment from there

    def after_step(self, k: int, step: StepInfo) -> tuple[torch.Tensor, torch.Tensor]:
        prev = self.scores(step.log_q_prev) if self.prev is None else self.prev
        now = self.scores(step.log_q)
        if step.final or not self.strength:
            self.prev = now
            return step.x, step.log_q
        dl = self.strength * (now - prev)
        st = reweight_and_resample(
            step.x,
            step.log_q,
            self.log_w,
            dl,
            self.u,
            step.t_next,
            ess_threshold=self.ess_threshold,
            resample_window=self.window,
        )
        self.log_w = st.log_w
        flat = (st.ancestors + self.K * torch.arange(self.n, device=st.ancestors.device)[:, None]).reshape(-1)
        self.prev = now[flat.to(now.device)]
        self.ess.append(st.ess)
        self.resampled.append(st.resampled)
        return st.x, st.log_q

    def pick(self, log_q: torch.Tensor) -> torch.Tensor:
        """(n,) flat row index of the particle with the highest final score in every group."""
        return best_of(self.scores(log_q), self.K)


@dataclass
class Verify:
    """What `compose.sample(..., verify=Verify(...))` scores, and how it selects (module docstring).

    terms: the models whose lift is reported, in order (leaves of the expression).
    refs: each term's reference model (one model for all, or one per term), a leaf of the expression too (e.g. the
        unconditional model of a `Guided`).
    rule: an image's score from its lifts: "min" (every concept), "max" (any: OR), "mean", or "zmin" (every concept,
        each term's lift standardised across the image's K candidates; selection only).
    candidates: K samples drawn per image (K times the network rows); the one kept is chosen by `select`.
    select: "lift" (the highest score) or "random" (uniform: the plain method at the same cost).
    steer: lam of the Feynman-Kac steering potentials exp(lam (s_k - s_{k-1})) between the K candidates (0: none;
        SDE only); ess_threshold and window: when a group is resampled.
    """

    terms: Sequence[Any]
    refs: Any
    rule: str = "min"
    candidates: int = 1
    select: str = "lift"
    steer: float = 0.0
    ess_threshold: float = 0.5
    window: tuple[float, float] = (0.0, 1.0)

    def check(self, method: str) -> None:
        """Refuse bad settings (ValueError naming the argument) before any network call."""
        check_rule(self.rule, self.steer)
        check_candidates(self.candidates)
        if self.select not in SELECTIONS:
            raise ValueError(f"select={self.select!r} is not known; use one of {SELECTIONS}.")
        check_steering(self.steer, self.candidates, method, self.ess_threshold, self.window)
        if not len(self.terms):
            raise ValueError("Verify: give at least one term.")

    def indices(self, leaves: Sequence[Any]) -> tuple[list[int], list[int]]:
        """(term indices, reference indices) into `leaves` (by identity); a model that is no leaf is refused."""
        refs = list(self.refs) if isinstance(self.refs, (list, tuple)) else [self.refs] * len(self.terms)
        if len(refs) != len(self.terms):
            raise ValueError(f"Verify: {len(refs)} refs for {len(self.terms)} terms; give one, or one per term.")

        def find(m: Any, what: str) -> int:
            for i, leaf in enumerate(leaves):
                if leaf is m:
                    return i
            raise ValueError(
                f"Verify: the {what} {m!r} is not a model of the expression; add it (e.g. as the "
                "unconditional model of compose.Guided) so that its density is tracked."
            )

        return [find(m, "term") for m in self.terms], [find(m, "reference") for m in refs]


def check_candidates(candidates: Any) -> int:
    if isinstance(candidates, bool) or not isinstance(candidates, int) or not 1 <= candidates <= MAX_CANDIDATES:
        raise ValueError(
            f"candidates must be an integer in [1, {MAX_CANDIDATES}] (samples drawn per image); got {candidates!r}."
        )
    return candidates


def check_steering(
    steer: Any, candidates: int, method: str, ess_threshold: Any = 0.5, window: Any = (0.0, 1.0)
) -> float:
    """Refuse a steering strength that is not a finite number >= 0, steering without candidates to steer between, or
    by ODE (resampled copies of a deterministic path stay identical)."""
    if isinstance(steer, bool) or not isinstance(steer, (int, float)) or not math.isfinite(steer) or steer < 0:
        raise ValueError(f"steer must be a finite number >= 0 (0: no steering); got {steer!r}.")
    if steer and candidates < 2:
        raise ValueError(f"steer={steer} resamples between candidates; give candidates >= 2 (got {candidates}).")
    if steer and method != "sde":
        raise ValueError(
            f"steer={steer} needs method='sde': resampled copies of a deterministic (ODE) path stay "
            "identical. Use method='sde', or best-of-K without steering (steer=0)."
        )
    if isinstance(ess_threshold, bool) or not isinstance(ess_threshold, (int, float)) or not 0 <= ess_threshold <= 1:
        raise ValueError(f"ess_threshold must be a number in [0, 1]; got {ess_threshold!r}.")
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ValueError(f"the steering window must be two times (t_lo, t_hi) in [0, 1]; got {window!r}.") from None
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"the steering window must satisfy 0 <= t_lo <= t_hi <= 1; got {window!r}.")
    return float(steer)


__all__ = [
    "MAX_CANDIDATES",
    "GROUP_RULES",
    "RULES",
    "SELECTIONS",
    "LiftSteering",
    "Verify",
    "best_of",
    "check_candidates",
    "check_rule",
    "check_steering",
    "lifts",
    "random_of",
    "score",
]
