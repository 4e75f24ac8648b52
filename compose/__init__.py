"""compose: the mathematics of composing diffusion models at sampling time (no diffusers import here).

Conventions (see MATH.md in the project docs): t in [0, 1] with data at t = 0; x_t = alpha_t x_0 + sigma_t eps;
score = -eps_hat / sigma_t.
"""

from . import ld3, thermo, toy
from .engine import Composer, StepOutput, divergence
from .grids import GRIDS, make_grid, resolve_grid
from .models import OnSchedule, model_eps, on_schedule
from .operators import AND, OR, Average, Expr, Guided, Product
from .predictions import (
    PREDICTION_TYPES,
    eps_to_score,
    eps_to_x0,
    from_eps,
    normalize_prediction_type,
    score_to_eps,
    to_eps,
)
from .sampling import SOLVERS, SampleResult, sample
from .schedule import NoiseSchedule
from .smc import PoE, SMCResult, effective_sample_size, sample_smc, systematic_resample

__all__ = [
    "AND",
    "GRIDS",
    "OR",
    "PREDICTION_TYPES",
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
    "StepOutput",
    "divergence",
    "effective_sample_size",
    "eps_to_score",
    "eps_to_x0",
    "from_eps",
    "ld3",
    "make_grid",
    "model_eps",
    "normalize_prediction_type",
    "resolve_grid",
    "on_schedule",
    "sample",
    "sample_smc",
    "score_to_eps",
    "systematic_resample",
    "thermo",
    "to_eps",
    "toy",
]
