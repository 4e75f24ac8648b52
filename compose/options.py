"""Every user-facing option of the sampler, named and checked once (one message per mistake).

`compose.sample`, `compose.sample_smc`, `compose.ld3`, `ComposePipeline` and the batch / Space jobs all validate
through these functions, so an option has one spelling, one range and one error message everywhere. Each check
raises `ValueError` naming the argument and the fix, before any network is called. A choice is a table here (a
solver is one `Solver` record, an operator one `Operator` record) that the code asks, never a string test scattered
through files. This module is the bottom of the `compose` dependency order: it imports nothing from the package,
and it imports torch only inside the checks that take tensors, so its names load without torch (`pipelines.jobs`
reads them to check a job file).
"""

from __future__ import annotations

import math
import numbers
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

METHODS = ("sde", "ode")


@dataclass(frozen=True)
class Solver:
    """What the sampler, LD3 and the schedule files ask of a solver (`compose.solvers` holds the steps).

    order: the steps it needs at least (a shorter grid is refused).
    sde: it has an SDE form (method="sde"); the others are ODE-only.
    multistep: it keeps a history of composed data predictions (`compose.solvers.Multistep`).
    corrector: the history also recomputes the current state (UniPC's UniC corrector).
    learnable_offsets: its coefficients take learned offsets (`compose.ld3`, a schedule file's `solver_offsets`).
    density_step: the first-order step whose rate the density bookkeeping uses ("euler" or "ddim").
    """

    name: str
    order: int
    sde: bool
    multistep: bool = False
    corrector: bool = False
    learnable_offsets: bool = False
    density_step: str = "euler"


# First-order steps: "euler" in the time t of the shared schedule (VP Euler / Euler-Maruyama), "ddim" in the
# variance-exploding variable s = sigma / alpha (DDIM with eta = 0, EulerDiscreteScheduler; under method="sde" the
# Euler-Maruyama step in s, SuperDiff's reference update). Multistep ODE solvers: "dpm2m" (DPM-Solver++(2M)) and
# "unipc" (the 2M predictor and the UniC corrector).
SOLVER_TABLE = {
    s.name: s
    for s in (
        Solver("euler", order=1, sde=True, density_step="euler"),
        Solver("ddim", order=1, sde=True, density_step="ddim"),
        Solver("dpm2m", order=2, sde=False, multistep=True, learnable_offsets=True),
        Solver("unipc", order=3, sde=False, multistep=True, corrector=True, learnable_offsets=True),
    )
}
SOLVERS = tuple(SOLVER_TABLE)


@dataclass(frozen=True)
class Operator:
    """What the pipeline and the job files ask of an operator used by name (`compose.operators` builds it).

    weights: it takes per-term weights ("or": mixture weights, "product": signed, "product_smc": exponents).
    temperature: it takes an OR temperature.
    min_terms: the terms it needs at least.
    particles: it is sampled with particles (`compose.smc.PoE`).
    """

    name: str
    weights: bool = False
    temperature: bool = False
    min_terms: int = 2
    particles: bool = False


OPERATOR_TABLE = {
    o.name: o
    for o in (
        Operator("or", weights=True, temperature=True),
        Operator("and"),
        Operator("average"),
        Operator("product", weights=True),
        Operator("product_smc", weights=True, min_terms=1, particles=True),
    )
}
OPERATORS = tuple(OPERATOR_TABLE)
# Divergence estimates for the ODE's density tracking. The Hutchinson ones cost a fixed number of network calls
# whatever the dimension (what a pipeline or a job affords); "exact" costs d calls per model (small d only).
DIVERGENCES = ("hutchinson", "hutchinson_fd", "exact")
HUTCHINSON = ("hutchinson", "hutchinson_fd")
GRIDS = ("uniform", "log_snr", "karras", "ays_sd15", "ays_sdxl")
SCHEDULER_GRID = "scheduler"  # the grid of a family's own scheduler (flow matching: its sigmas with their shift)
SMC_FINALS = ("resample", "weights")
LANGEVIN_AFTER = ("resample", "every")
# LoRA experts (`pipelines.lora`): the baselines of `lora_mode`, the unconditional rows of `lora_uncond`, and how the
# rows of several adapters are evaluated (`lora_calls`).
LORA_MODES = ("merge", "switch", "composite")
LORA_UNCOND = ("lora", "base")
# lora_calls: "batched" (one call per base network, each row's update added by two stacked products per layer),
# "batched_loop" (the same call, the updates added one adapter's rows at a time), "batched_peft" (the same call through
# PEFT's mixed adapter batch) and "separate" (one call per network and adapter): the same numbers up to rounding.
LORA_CALLS = ("batched", "batched_loop", "batched_peft", "separate")
# Per-image concept scores (`pipelines.verify`, docs/MATH.md section 9): "renoise" (the finished image's denoising
# losses, noised again at a few log-SNR levels: a few extra rows) or "tracked" (the sampler's tracked log-densities:
# free).
LIFT_ESTIMATORS = ("renoise", "tracked")

# The Python API's bounds: typo guards, not resource caps. A job runner (the batch command line, the Space) caps each
# request's steps lower for the machine's sake (`pipelines.jobs.Limits.max_steps`: batch --max-steps, default 1000;
# the Space's COMPOSE_MAX_STEPS, 100); guidance has one range everywhere (`check_guidance`).
MAX_STEPS = 10_000  # a grid longer than this is a typo (1e9 steps would allocate gigabytes before the first step)
MAX_GUIDANCE = 100.0  # a guidance scale above this is a typo; 1 or below is no guidance


def is_int(value: Any) -> bool:
    """True for Python / numpy integers (not bools, not floats that happen to be whole)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(value: Any, name: str, lo: int, hi: int | None = None, what: str = "") -> int:
    """`value` as an int in [lo, hi]; ValueError naming `name` otherwise."""
    if not is_int(value):
        raise ValueError(f"{name} must be an integer{what}; got {value!r}.")
    v = int(value)
    if v < lo or (hi is not None and v > hi):
        rng = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}={v} is out of range; give an integer {rng}{what}.")
    return v


def check_float(
    value: Any, name: str, lo: float | None = None, hi: float | None = None, *, open_lo: bool = False, what: str = ""
) -> float:
    """`value` as a finite float in [lo, hi] ((lo, hi] with open_lo); ValueError naming `name` otherwise."""
    torch = sys.modules.get("torch")  # a tensor argument means torch is loaded; this module never loads it
    one_element = torch is not None and isinstance(value, torch.Tensor) and value.numel() == 1
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not one_element:
        raise ValueError(f"{name} must be a number{what}; got {value!r}.")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite{what}; got {value!r}.")
    below = lo is not None and (v <= lo if open_lo else v < lo)
    if below or (hi is not None and v > hi):
        left = "(" if open_lo else "["
        rng = f"in {left}{lo}, {hi}]" if hi is not None else (f"> {lo}" if open_lo else f">= {lo}")
        raise ValueError(f"{name}={v} is out of range; give a number {rng}{what}.")
    return v


def check_method(method: Any) -> str:
    if method not in METHODS:
        raise ValueError(
            f"method={method!r} is not known; use 'sde' (Euler-Maruyama, Ito density estimator) or 'ode' "
            "(probability-flow ODE, divergence estimate)."
        )
    return method


def solver_record(solver: Any) -> Solver:
    """The `Solver` record of a solver name (ValueError for an unknown one)."""
    if not isinstance(solver, str) or solver not in SOLVER_TABLE:
        raise ValueError(f"solver={solver!r} is not known; use one of {SOLVERS}.")
    return SOLVER_TABLE[solver]


def check_solver(solver: Any, method: str) -> str:
    """`solver` must be known and fit `method` (the multistep solvers are ODE-only)."""
    if not solver_record(solver).sde and method == "sde":
        sde = " / ".join(repr(s.name) for s in SOLVER_TABLE.values() if s.sde)
        raise ValueError(f"solver={solver!r} is an ODE solver; use method='ode' with it, or solver={sde} with 'sde'.")
    return solver


def check_grid_length(ts: Any, solver: str) -> None:
    """A grid of N + 1 times must have at least the solver's order in steps."""
    order = solver_record(solver).order
    if len(ts) - 1 < order:
        raise ValueError(
            f"solver={solver!r} (order {order}) needs at least {order} steps; the grid has {len(ts) - 1}."
        )


def check_divergence(divergence: Any, allowed: tuple = DIVERGENCES) -> str:
    if divergence not in allowed:
        raise ValueError(f"divergence={divergence!r} is not known; use one of {allowed}.")
    return divergence


def check_probes(probes: Any, name: str = "probes") -> int:
    return check_int(probes, name, 1, 1024, " (Hutchinson probes per step)")


def check_fd_eps(fd_eps: Any) -> float:
    what = " (the finite-difference step of 'hutchinson_fd' relative to sigma_t; 1e-3 is usual)"
    return check_float(fd_eps, "fd_eps", 0.0, 1.0, open_lo=True, what=what)


def check_steps(steps: Any, name: str = "num_inference_steps", hi: int = MAX_STEPS) -> int:
    return check_int(steps, name, 1, hi, " (network evaluations per image)")


def check_guidance(value: Any, name: str = "guidance_scale") -> float:
    """The guidance scale, in [0, MAX_GUIDANCE] for the pipeline and for jobs alike (1 or below: no guidance)."""
    what = " (1 or below: no guidance; for negation use negative_prompt or negative weights)"
    return check_float(value, name, 0.0, MAX_GUIDANCE, what=what)


def check_operator(operator: Any) -> str:
    """A named operator (case-insensitive) -> its canonical lower-case name."""
    return operator_record(operator).name


def operator_record(operator: Any) -> Operator:
    """The `Operator` record of a named operator (case-insensitive; ValueError for an unknown one)."""
    if not isinstance(operator, str) or operator.lower() not in OPERATOR_TABLE:
        raise ValueError(
            f"operator={operator!r} is not known; use one of {OPERATORS}, or a callable that builds a compose "
            "expression from the terms, e.g. lambda a, b, c: compose.OR(compose.AND(a, b), c)."
        )
    return OPERATOR_TABLE[operator.lower()]


def check_grid(timesteps: Any, name: str = "timesteps") -> torch.Tensor:
    """A strictly decreasing grid as float64: the first time in (0, 1], the last in [0, 1) (0: the data).

    A grid of N + 1 times is N steps and N network evaluations (at every time but the last). Ending at 0 makes the
    last step land on the data: x0_hat of the last evaluation (DDIM's step to sigma = 0).
    """
    import torch

    try:
        ts = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be a sequence of numbers; got {timesteps!r} ({err}).") from None
    if ts.numel() < 2:
        raise ValueError(f"{name} needs at least two times (a start and an end); got {ts.numel()}.")
    if ts.numel() - 1 > MAX_STEPS:
        raise ValueError(f"{name} has {ts.numel() - 1} steps; at most {MAX_STEPS} are allowed.")
    if not bool(torch.all(torch.isfinite(ts))) or not bool(torch.all(ts[1:] < ts[:-1])):
        raise ValueError(
            f"{name} must be strictly decreasing and finite (noise at t = 1 to data at t = 0); got "
            f"{ts.tolist()[:8]}..."
        )
    if not (0.0 <= float(ts[-1]) and 0.0 < float(ts[0]) <= 1.0):
        raise ValueError(
            f"{name} must lie in [0, 1] with a positive first time; got [{float(ts[-1])}, {float(ts[0])}]."
        )
    return ts


def check_smc_options(num_particles: Any, ess_threshold: Any, resample_window: Any, method: str = "sde") -> tuple:
    """Particle options (`compose.sample_smc`, operator="product_smc"); returns the window (t_lo, t_hi)."""
    if method != "sde":
        raise ValueError(
            f"method={method!r} cannot be used with a particle product: the Feynman-Kac weights need the SDE. Use "
            "method='sde', or an ODE operator (compose.AND / compose.Product) without particles."
        )
    if not is_int(num_particles) or num_particles < 2:
        raise ValueError(
            f"num_particles must be an integer >= 2 (with one particle nothing is reweighted); got {num_particles!r}. "
            "Use compose.Product (operator='product') for a single trajectory."
        )
    check_int(num_particles, "num_particles", 2, 4096)
    if isinstance(ess_threshold, bool) or not (isinstance(ess_threshold, (int, float)) and 0 < ess_threshold <= 1):
        raise ValueError(
            f"ess_threshold must lie in (0, 1] (a fraction of num_particles; 0.5 is usual, 1 resamples every step); "
            f"got {ess_threshold!r}."
        )
    try:
        lo, hi = (float(v) for v in resample_window)
    except (TypeError, ValueError):
        raise ValueError(f"resample_window must be a pair (t_lo, t_hi); got {resample_window!r}.") from None
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"resample_window=(t_lo, t_hi) must satisfy 0 <= t_lo < t_hi <= 1; got {resample_window!r}.")
    return lo, hi


def check_langevin_options(langevin_steps: Any, langevin_step: Any, langevin_after: Any) -> None:
    """Rejuvenation options of the particle sampler."""
    if not is_int(langevin_steps) or langevin_steps < 0:
        raise ValueError(
            f"langevin_steps must be an integer >= 0 (Langevin moves per rejuvenation; 0 turns them off); got "
            f"{langevin_steps!r}."
        )
    check_int(langevin_steps, "langevin_steps", 0, 64)
    if isinstance(langevin_step, bool) or not isinstance(langevin_step, (int, float)) or not 0 < langevin_step <= 1:
        raise ValueError(
            f"langevin_step must lie in (0, 1] (the move's step in units of sigma_t^2 / A; 0.1-0.5 is usual, larger "
            f"steps are rejected more often); got {langevin_step!r}."
        )
    if langevin_after not in LANGEVIN_AFTER:
        raise ValueError(f"langevin_after={langevin_after!r} is not known; use one of {LANGEVIN_AFTER}.")


def check_x0_clip(
    clip_sample: Any, clip_sample_range: Any, thresholding: Any, dynamic_thresholding_ratio: Any, sample_max_value: Any
) -> None:
    """The x0 clipping options (diffusers' scheduler semantics, see `compose.solvers.X0Clip`)."""
    for name, v in (("clip_sample", clip_sample), ("thresholding", thresholding)):
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be True or False; got {v!r}.")
    check_float(clip_sample_range, "clip_sample_range", 0.0, None, open_lo=True)
    check_float(dynamic_thresholding_ratio, "dynamic_thresholding_ratio", 0.0, 1.0, open_lo=True)
    check_float(sample_max_value, "sample_max_value", 0.0, None, open_lo=True)
