"""Schedule files: a learned grid stored as JSON with the set-up it belongs to (docs/MATH.md section 6).

A file holds the keys of `REQUIRED_KEYS`; `load_schedule` checks the grid and, given `expect`, that the file was
learned for the same model, operator, solver, NFE, guidance and noise schedule (`CHECKED_KEYS`).

Format 2 (`compose-schedule/2`): `grid` is N + 1 strictly decreasing times ending at 0 (the data), `nfe` = N is the
number of network evaluations (at every time but the last; the last step is x0_hat of the last evaluation),
`network_times` (optional) has N entries, `solver_offsets` (optional) is an (N, 3) table. Format 1 files (a grid
ending at t_min > 0, followed by one more evaluation at t_min for the final denoising) are read as their format-2
equivalent: 0 appended to the grid, nfe + 1, the last network time t_min and a zero row of solver offsets (the step
to the data is first order, it has no coefficient to offset).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from typing import Any

import torch

from .composer import common_schedule
from .models import model_name
from .operators import Expr, Guided
from .options import SOLVER_TABLE, check_grid, solver_record

FORMAT = "compose-schedule/2"
FORMATS = ("compose-schedule/1", FORMAT)
REQUIRED_KEYS = (
    "format",
    "model",
    "operator",
    "solver",
    "nfe",
    "guidance",
    "schedule",
    "grid",
    "train_size",
    "teacher",
    "loss",
    "date",
)
CHECKED_KEYS = ("model", "operator", "solver", "nfe", "guidance", "schedule")
SOURCE_ONLY_KEYS = (
    "val_distance",
    "val_distance_init",
    "val_distance_named",
    "test_size",
    "test_distance",
    "test_distance_named",
    "probes",
    "teacher_probes",
    "command",
)


def expression_keys(expr: Any) -> dict[str, Any]:
    """The identity a schedule file is checked against: model names, operator expression and guidance scale."""
    if isinstance(expr, Expr):
        leaves = expr.leaves()
        guidance = next((n.scale for n in expr.nodes() if isinstance(n, Guided)), 1.0)
        return {"model": ",".join(model_name(m) for m in leaves), "operator": repr(expr), "guidance": guidance}
    return {"model": model_name(expr), "operator": "none", "guidance": 1.0}


def utc_now() -> str:
    """The `date` of a schedule file: UTC, to the second."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def save_schedule(path: str | os.PathLike, info: dict[str, Any]) -> None:
    """Write a schedule file (keys `REQUIRED_KEYS`, plus anything else in `info`) after checking it."""
    info = dict(info)
    check_schedule(info, str(path))
    with open(path, "w") as fh:
        json.dump(info, fh, indent=2)
        fh.write("\n")


def load_schedule(path: str | os.PathLike, expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read and check a schedule file; `expect` maps keys of `CHECKED_KEYS` to this call's values.

    Raises ValueError when the file is missing, not valid JSON, lacks a key, holds a grid that is not strictly
    decreasing in [0, 1] or whose length does not match its NFE, or was learned for another model / operator /
    solver / NFE / guidance / noise schedule than `expect` says (the message names every mismatching key).
    """
    path = str(path)
    if not os.path.isfile(path):
        raise ValueError(f"schedule file {path!r} does not exist; learn one with `compose learn-schedule`.")
    try:
        with open(path) as fh:
            info = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"schedule file {path!r} is not valid JSON ({err}); regenerate it.") from err
    if not isinstance(info, dict):
        raise ValueError(f"schedule file {path!r} must hold a JSON object; got {type(info).__name__}.")
    check_schedule(info, path)
    if expect:
        bad = []
        for key, want in expect.items():
            have = info.get(key)
            same = math.isclose(float(have), float(want)) if key == "guidance" else have == want
            if not same:
                bad.append(f"{key}={have!r} (this call: {want!r})")
        if bad:
            raise ValueError(
                f"schedule file {path!r} was learned for another set-up: " + ", ".join(bad) + ". Learn a schedule "
                "for this call (compose learn-schedule) or pass a matching file."
            )
    return info


def check_schedule(info: dict, path: str) -> None:
    """Check a schedule dict in place (ValueError naming the key); a format-1 dict is upgraded to format 2."""
    missing = [k for k in REQUIRED_KEYS if k not in info]
    if missing:
        raise ValueError(f"schedule file {path!r} lacks the keys {missing}; it was not written by compose.ld3.")
    if info["format"] not in FORMATS:
        raise ValueError(f"schedule file {path!r}: format={info['format']!r} is not known; use one of {FORMATS}.")
    for key in ("model", "operator", "solver", "schedule"):
        if not isinstance(info[key], str):
            raise ValueError(f"schedule file {path!r}: {key} must be a string; got {info[key]!r}.")
    if (
        isinstance(info["guidance"], bool)
        or not isinstance(info["guidance"], (int, float))
        or not math.isfinite(info["guidance"])
    ):
        raise ValueError(f"schedule file {path!r}: guidance must be a finite number; got {info['guidance']!r}.")
    if isinstance(info["nfe"], bool) or not isinstance(info["nfe"], int) or info["nfe"] < 1:
        raise ValueError(f"schedule file {path!r}: nfe must be a positive integer; got {info['nfe']!r}.")
    ts = check_grid(info["grid"], f"the grid of schedule file {path!r}")
    net, off = info.get("network_times"), info.get("solver_offsets")
    if net is not None and not isinstance(net, list):
        raise ValueError(f"schedule file {path!r}: network_times must be a list of times; got {net!r}.")
    if off is not None and not isinstance(off, list):
        raise ValueError(f"schedule file {path!r}: solver_offsets must be a table (list of rows); got {off!r}.")
    if info["format"] != FORMAT:  # format 1: the final denoising at t_min becomes the step to the data
        if float(ts[-1]) == 0.0:
            raise ValueError(f"schedule file {path!r}: a format-1 grid ends at t_min > 0; this one ends at 0.")
        if info["nfe"] != ts.numel() - 1:
            raise ValueError(f"schedule file {path!r}: nfe={info['nfe']} but the grid has {ts.numel() - 1} steps.")
        info["grid"] = [*info["grid"], 0.0]
        info["nfe"] += 1
        if net is not None:
            info["network_times"] = net = [*net, info["grid"][-2]]
        if off is not None:
            info["solver_offsets"] = off = [*off, [0.0, 0.0, 0.0]]
        info["format"] = FORMAT
        ts = torch.cat([ts, torch.zeros(1, dtype=torch.float64)])
    if float(ts[-1]) != 0.0:
        raise ValueError(f"schedule file {path!r}: the grid must end at 0 (the data); it ends at {float(ts[-1])}.")
    if info["nfe"] != ts.numel() - 1:
        raise ValueError(f"schedule file {path!r}: nfe={info['nfe']} but the grid has {ts.numel() - 1} steps.")
    if net is not None:
        net_t = _table(net, path, "network_times")
        if net_t.shape != (info["nfe"],):
            raise ValueError(
                f"schedule file {path!r}: network_times has {net_t.numel()} entries for nfe={info['nfe']}."
            )
        if not bool(torch.isfinite(net_t).all()) or bool((net_t <= 0).any()) or bool((net_t > 1).any()):
            raise ValueError(f"schedule file {path!r}: network_times must be finite times in (0, 1]; got {net}.")
    if off is not None:
        check_solver_offsets(
            _table(off, path, "solver_offsets"),
            info["solver"],
            info["nfe"],
            f"the solver_offsets of schedule file {path!r}",
        )


def _table(value: Any, path: str, key: str) -> torch.Tensor:
    try:
        return torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"schedule file {path!r}: {key} is not a table of numbers ({err}).") from None


def solver_offset_mask(solver: str, nfe: int) -> torch.Tensor:
    """(nfe, 3) 1 where a learned solver coefficient is used, 0 where the solver has nothing to offset.

    Row k: column 0 offsets the 2M step's rho (1/2) from ts[k], used from k = 1 (step 0 is first order); columns 1-2
    offset the UniC corrector's (rho_0, rho_1) that recomputes the state at ts[k] ("unipc" only): rho_1 from k = 1,
    rho_0 from k = 2 (the first corrector is of order 1). The last row (the first-order step to the data) is 0.
    """
    mask = torch.zeros(nfe, 3, dtype=torch.float64)
    mask[1 : nfe - 1, 0] = 1.0
    if solver_record(solver).corrector:
        mask[1 : nfe - 1, 2] = 1.0
        mask[2 : nfe - 1, 1] = 1.0
    return mask


def check_solver_offsets(off: Any, solver: str, nfe: int, name: str) -> None:
    """Learned solver coefficients must be a finite (nfe, 3) table, zero where the solver uses none."""
    if not solver_record(solver).learnable_offsets:
        names = " and ".join(repr(s.name) for s in SOLVER_TABLE.values() if s.learnable_offsets)
        raise ValueError(f"{name}: learned solver coefficients exist for {names}, not solver={solver!r}.")
    off = torch.as_tensor(off, dtype=torch.float64)
    if off.shape != (nfe, 3):
        raise ValueError(f"{name} must have shape ({nfe}, 3) (one row per step); got {tuple(off.shape)}.")
    if not bool(torch.isfinite(off).all()):
        raise ValueError(f"{name} must be finite; got {off.tolist()}.")
    unused = off.detach() * (1.0 - solver_offset_mask(solver, nfe))
    if bool((unused != 0).any()):
        raise ValueError(
            f"{name}: the entries the {solver} solver does not use must be 0 (row 0 and the last row; for unipc row 1 "
            f"column 1; for dpm2m columns 1-2); got {off.tolist()}."
        )


def transfer_schedule(source: str | os.PathLike | dict, expr: Any, **measured: Any) -> dict[str, Any]:
    """A schedule learned for one set-up, re-keyed for `expr` (e.g. one model's file used for OR / AND of it).

    The grid, network times, solver offsets, solver and NFE carry over unchanged, and the file's identity keys (model,
    operator, guidance) become `expr`'s, so `compose.sample` and the pipeline accept it for `expr`. The noise schedule
    must be the same: a grid is a list of times, and on another schedule they are other noise levels (ValueError).
    The keys that say how the grid was learned (train_size, teacher, loss, iters, ...) stay the source's; what was
    measured for the source (its distances, its Hutchinson probes, its command) moves under `transferred_from`,
    with the source's identity and file. `measured`: keys to add, e.g. distances measured for `expr`.
    """
    clash = sorted(set(measured) & {*CHECKED_KEYS, "grid", "network_times", "solver_offsets", "transferred_from"})
    if clash:
        raise ValueError(
            f"measured: {clash} are the schedule's own keys; pass measurements only (e.g. test_distance)."
        )
    if isinstance(source, dict):
        info = dict(source)
        path = info.pop("path", None)
        check_schedule(info, str(path or "source"))
    else:
        info, path = load_schedule(source), source
    target = expression_keys(expr)
    target_schedule = repr(common_schedule(expr.leaves() if isinstance(expr, Expr) else [expr]))
    if info["schedule"] != target_schedule:
        raise ValueError(
            f"source: the schedule was learned on the noise schedule {info['schedule']}, the expression's models use "
            f"{target_schedule}; its times would be other noise levels there. Learn a schedule for this expression."
        )
    origin = {k: info[k] for k in ("model", "operator", "guidance", "date")}
    origin.update({k: info.pop(k) for k in SOURCE_ONLY_KEYS if k in info})
    if path is not None:
        origin["file"] = os.path.basename(str(path))
    info.update(target)
    info["transferred_from"] = origin
    info["date"] = utc_now()
    info.update(measured)
    return info


__all__ = [
    "CHECKED_KEYS",
    "FORMAT",
    "REQUIRED_KEYS",
    "check_schedule",
    "check_solver_offsets",
    "expression_keys",
    "load_schedule",
    "save_schedule",
    "solver_offset_mask",
    "transfer_schedule",
]
