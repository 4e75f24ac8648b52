"""compose: the mathematics of composing diffusion models at sampling time (no diffusers import here).

Conventions (docs/MATH.md): t in [0, 1] with data at t = 0; x_t = alpha_t x_0 + sigma_t eps;
score = -eps_hat / sigma_t.

Modules, in dependency order (each imports only those before it; tests/test_structure.py checks it):
  options -> schedule -> predictions -> models -> operators -> solvers -> composer -> schedule_files -> grids
  -> loop (the one sampling loop) -> smc -> sampling -> ld3 -> toy (exact Gaussian mixtures)
  -> learn_schedule (command line) -> thermo (schedule diagnostics).
"""

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

__all__ = [
    "AND",
    "GRIDS",
    "OR",
    "SOLVERS",
    "Average",
    "Composer",
    "Expr",
    "Guided",
    "NoiseSchedule",
    "OnSchedule",
    "PoE",
    "Product",
    "SMCResult",
    "SampleResult",
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
