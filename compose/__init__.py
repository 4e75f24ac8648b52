"""compose: the mathematics of composing diffusion models at sampling time (no diffusers import here).

Conventions (docs/MATH.md): t in [0, 1] with data at t = 0; x_t = alpha_t x_0 + sigma_t eps;
score = -eps_hat / sigma_t.

Modules, in dependency order (each imports only those before it; tests/test_structure.py checks it):
  options -> schedule -> predictions -> models -> operators -> solvers -> composer -> schedule_files -> grids
  -> loop (the one sampling loop) -> smc -> verify (lifts, best-of-K, steering) -> sampling -> ld3
  -> toy (exact Gaussian mixtures)
  -> learn_schedule (points to the command line) -> thermo (schedule diagnostics).

The names below are loaded on first use (PEP 562), so `compose.options` (the option names and their checks) loads
without torch; `import compose` and `from compose import OR` work as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import ld3, thermo, toy
    from .composer import Composer
    from .grids import make_grid, resolve_grid
    from .models import OnSchedule, on_schedule
    from .operators import AND, OR, Average, Expr, Guided, Product
    from .options import GRIDS, SOLVERS
    from .predictions import from_eps, normalize_prediction_type, to_eps
    from .sampling import SampleResult, sample
    from .schedule import NoiseSchedule
    from .smc import PoE, SMCResult, sample_smc
    from .solvers import X0Clip
    from .verify import LiftSteering, Verify

# name -> the module that defines it
_EXPORTS = {
    "AND": "operators",
    "GRIDS": "options",
    "LiftSteering": "verify",
    "OR": "operators",
    "SOLVERS": "options",
    "Average": "operators",
    "Composer": "composer",
    "Expr": "operators",
    "Guided": "operators",
    "NoiseSchedule": "schedule",
    "OnSchedule": "models",
    "PoE": "smc",
    "Product": "operators",
    "SMCResult": "smc",
    "SampleResult": "sampling",
    "Verify": "verify",
    "X0Clip": "solvers",
    "from_eps": "predictions",
    "make_grid": "grids",
    "normalize_prediction_type": "predictions",
    "on_schedule": "models",
    "resolve_grid": "grids",
    "sample": "sampling",
    "sample_smc": "smc",
    "to_eps": "predictions",
}
_MODULES = (
    "composer",
    "grids",
    "ld3",
    "learn_schedule",
    "loop",
    "models",
    "operators",
    "options",
    "predictions",
    "sampling",
    "schedule",
    "schedule_files",
    "smc",
    "solvers",
    "thermo",
    "toy",
    "verify",
)

__all__ = [
    "AND",
    "GRIDS",
    "OR",
    "SOLVERS",
    "Average",
    "Composer",
    "Expr",
    "Guided",
    "LiftSteering",
    "NoiseSchedule",
    "OnSchedule",
    "PoE",
    "Product",
    "SMCResult",
    "SampleResult",
    "Verify",
    "X0Clip",
    "from_eps",
    "ld3",
    "make_grid",
    "normalize_prediction_type",
    "on_schedule",
    "resolve_grid",
    "sample",
    "sample_smc",
    "thermo",
    "to_eps",
    "toy",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_MODULES})
