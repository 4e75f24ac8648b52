"""The rows of every sampling step, batched into one call per network (the pipeline's side of `compose.loop.run`).

A `Leaf` is one term of the compose expression (checkpoint, prompt, LoRA adapter); `NetworkGroups` gathers the rows of
every leaf that shares a network (the terms, the unconditional branch, the probe points of the divergence) into one
call of its family's `forward` per step and converts the outputs to eps_hat on the shared schedule.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

import compose
from compose.composer import fd_divergence, jvp_divergence, probe_points
from compose.models import schedule_change
from compose.predictions import to_x0
from compose.schedule import NoiseSchedule

from .families import ComposeModel


class _UncondMarker(str):
    """The prompt of the unconditional branch (a distinct object, so no user prompt is mistaken for it)."""


UNCOND = _UncondMarker("")


class Leaf:
    """A leaf of the compose expression: one term (checkpoint, prompt); the core only needs `schedule` and `name`."""

    def __init__(
        self, schedule: NoiseSchedule, name: str, model: ComposeModel | None, prompt: str | None, adapter: Any = None
    ):
        self.schedule = schedule
        self.name = name
        self.model = model
        self.prompt = prompt
        self.adapter = adapter  # its LoRA on the model's network (pipelines.lora; None: the network as it is)
        self.model_schedule = model.schedule if model is not None else None

    @property
    def unconditional(self) -> bool:
        return self.prompt is UNCOND

    def __repr__(self) -> str:
        return f"<term {self.name}>"


@dataclass
class _Rows:
    """The rows of one network call: X (C n, ...) and their timesteps T (C n,), made of C chunks of n rows; chunk c is
    (leaf index, copy j: 0 the leaf's state, k >= 1 its k-th probe point, leaf, its time t_m, its state scale), with
    the conditioning conds[c]."""

    X: torch.Tensor
    T: torch.Tensor
    chunks: list
    conds: list


class NetworkGroups:
    """The rows of every step, grouped by network: one batched call per distinct network.

    core: the expression's leaves in the core's order; their predictions are returned in that order. terms: the term
    leaves in the order the rows are batched. extra: the per-checkpoint unconditional rows, averaged into the
    expression's one unconditional leaf (index `u_index` of core; its `model` is None). conds: id(leaf) ->
    conditioning; call_extra: what every network call of the family gets (`Family.call_inputs`). routing
    (`pipelines.lora.Routing`, or None): the LoRA adapter of every row (`Leaf.adapter`) is set for each call by
    `routing.context`, so the terms of one base network stay in one call whatever their LoRA (`routing.split`: one
    call per network and adapter instead).
    """

    def __init__(
        self,
        core: list[Leaf],
        terms: list[Leaf],
        extra: list[Leaf],
        conds: dict,
        u_index: int | None,
        call_extra: dict | None = None,
        routing: Any = None,
    ) -> None:
        self.leaves = [*core, *extra]
        self.num_core = len(core)
        self.u_index = u_index
        self.call_extra = call_extra
        self.routing = routing
        self.groups: list[dict] = []
        for leaf in terms + extra:
            key = leaf.adapter if routing is not None and routing.split else None
            g = next((g for g in self.groups if g["net"] is leaf.model.network and g["key"] == key), None)
            if g is None:
                g = {"net": leaf.model.network, "model": leaf.model, "parts": [], "key": key}
                self.groups.append(g)
            g["parts"].append(leaf)
        for g in self.groups:
            g["conds"] = [conds.get(id(leaf)) for leaf in g["parts"]]

    def predict(
        self,
        x: torch.Tensor,
        t: Any,
        schedule: NoiseSchedule,
        *,
        zeta: torch.Tensor | None = None,
        divergence: str | None = None,
        fd_e: float = 0.0,
    ) -> tuple[torch.Tensor, Any]:
        """eps_hat (L, n, ...) of the core's leaves at (x, t) and, with probes zeta (K, n, ...), div_x eps_hat (L, n).

        One network call per group (per probe for forward-mode JVPs); the estimators are `compose.composer`'s. The
        unconditional leaf is the mean over its rows; its divergence is left at 0 since no operator reads its log q.
        At alpha = 0 (t = 1 of a flow path) a third element, the data predictions x0_hat (L, n, ...), which the step
        from there needs; no divergence is computed there (the step moves every log q alike).
        """
        L, n = len(self.leaves), x.shape[0]
        t64 = torch.as_tensor(t, dtype=torch.float64).detach().cpu()
        need_x0 = float(schedule.alpha(t64)) == 0.0
        if need_x0 or zeta is None:
            zeta = divergence = None
        eps = torch.zeros((L, *x.shape), dtype=torch.float32, device=x.device)
        x0 = torch.zeros_like(eps) if need_x0 else None
        counts = torch.zeros(L, dtype=torch.float32)
        div = torch.zeros(L, n, dtype=torch.float64, device=x.device) if zeta is not None else None
        for g in self.groups:
            rows = self._rows(g, x, t64, schedule, zeta if divergence == "hutchinson_fd" else None, fd_e)
            E, jvp_div = self._call(g, rows, n, x0, divergence == "hutchinson" and zeta is not None, zeta)
            for c, (li, j, _, _, _) in enumerate(rows.chunks):
                if j == 0:
                    eps[li] += E[c * n : (c + 1) * n]
                    counts[li] += 1
                if jvp_div is not None:
                    div[li] += jvp_div[c]
            for c, (li, j, leaf, _, _) in enumerate(rows.chunks):
                if j == 0 and divergence == "hutchinson_fd" and not leaf.unconditional:
                    probes = [E[(c + k) * n : (c + k + 1) * n] for k in range(1, zeta.shape[0] + 1)]
                    div[li] += fd_divergence(E[c * n : (c + 1) * n], probes, zeta, fd_e)
        return self._core(eps, div, x0, counts)

    def _rows(
        self,
        g: dict,
        x: torch.Tensor,
        t64: torch.Tensor,
        schedule: NoiseSchedule,
        fd_zeta: torch.Tensor | None,
        fd_e: float,
    ) -> _Rows:
        """The rows of one group's call: every leaf's state on its own schedule (`compose.models.schedule_change`),
        followed, for "hutchinson_fd", by its probe points (`compose.composer.probe_points`)."""
        index = {id(leaf): i for i, leaf in enumerate(self.leaves)}
        family = g["model"].family
        xs, tins, chunks, conds = [], [], [], []
        for leaf, cond in zip(g["parts"], g["conds"], strict=True):
            t_m, log_scale = schedule_change(leaf.model_schedule, schedule, t64)
            scale = float(log_scale.exp())
            probe = fd_zeta is not None and not leaf.unconditional
            copies = [x] + (probe_points(x, fd_zeta, fd_e) if probe else [])
            for j, xc in enumerate(copies):
                xs.append(xc * scale)
                chunks.append((index[id(leaf)], j, leaf, t_m, scale))
                tins.append(family.timestep(leaf.model_schedule, t_m))
                conds.append(cond)
        n = x.shape[0]
        T = torch.cat([tt.reshape(1).expand(n) for tt in tins]).to(device=x.device, dtype=torch.float32)
        return _Rows(torch.cat(xs), T, chunks, conds)

    def _call(self, g: dict, rows: _Rows, n: int, x0: torch.Tensor | None, jvp: bool, zeta: torch.Tensor | None):
        """One network call on the group's rows: (eps_hat of every row, (C, n) JVP divergences or None); the data
        predictions of the leaves' own rows are added to x0 where it is given."""
        model, family = g["model"], g["model"].family

        def fn(X: torch.Tensor) -> torch.Tensor:
            pred = family.forward(model, X, rows.T, rows.conds, n, self.call_extra)
            out = []
            for c, (li, j, leaf, t_m, _) in enumerate(rows.chunks):
                part, kind = slice(c * n, (c + 1) * n), leaf.model.prediction_type
                out.append(compose.to_eps(pred[part], X[part], t_m, leaf.model_schedule, kind))
                if x0 is not None and j == 0:  # x0 is the same data in every parametrisation (equal SNR)
                    x0[li] += to_x0(pred[part], X[part], t_m, leaf.model_schedule, kind)
            return torch.cat(out)

        with self._adapters(g["net"], [c[2].adapter for c in rows.chunks], n):  # set outside the JVP's transform
            if not jvp:
                return fn(rows.X), None
            scales = [0.0 if leaf.unconditional else s for (_, _, leaf, _, s) in rows.chunks]
            math_attention = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)
            with math_attention, forward_ad_ready(g["net"]):
                return jvp_divergence(fn, rows.X, zeta, scales)

    def _core(self, eps: torch.Tensor, div: torch.Tensor | None, x0: torch.Tensor | None, counts: torch.Tensor):
        """The core leaves' predictions: each leaf's mean over its rows, the unconditional leaf the mean of the
        per-checkpoint unconditional rows."""
        scale = counts.clamp_min(1).to(eps.device).reshape(eps.shape[0], *([1] * (eps.ndim - 1)))
        eps = eps / scale
        M = self.num_core
        eps_l, div_l = eps[:M].clone(), None if div is None else div[:M].clone()
        if self.u_index is not None:
            eps_l[self.u_index] = eps[M:].mean(0)
            if div_l is not None:
                div_l[self.u_index] = 0.0
        if x0 is None:
            return eps_l, div_l
        x0 = x0 / scale
        x0_l = x0[:M].clone()
        if self.u_index is not None:
            x0_l[self.u_index] = x0[M:].mean(0)
        return eps_l, div_l, x0_l

    def _adapters(self, net: Any, specs: list, n: int):
        """The LoRA adapter state of one call (chunk c of n rows under specs[c]); nothing without routing."""
        if self.routing is None:
            return contextlib.nullcontext()
        return self.routing.context(net, specs, n)


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


__all__ = ["Leaf", "NetworkGroups", "UNCOND", "forward_ad_ready"]
