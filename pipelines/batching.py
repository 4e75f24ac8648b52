"""The rows of every sampling step, batched into one call per network (the pipeline's side of `compose.loop.run`).

A `Leaf` is one term of the compose expression (checkpoint, prompt, LoRA adapter); `NetworkGroups` gathers the rows of
every leaf that shares a network (the terms, the unconditional branch, the probe points of the divergence) into one
call of its family's `forward` per step and converts the outputs to eps_hat on the shared schedule.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

import compose
from compose.predictions import to_x0
from compose.schedule import NoiseSchedule

from .families import ComposeModel


class _UncondMarker(str):
    """The prompt of the unconditional branch (a distinct object, so no user prompt is mistaken for it)."""


UNCOND = _UncondMarker("")


class Leaf:
    """A leaf of the compose expression: one term (checkpoint, prompt); the core only needs `schedule` and `name`."""

    def __init__(self, schedule: NoiseSchedule, name: str, model: ComposeModel | None, prompt: str | None,
                 adapter: Any = None):  # fmt: skip
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


class NetworkGroups:
    """The rows of every step, grouped by network: one batched call per distinct network.

    core: the expression's leaves in the core's order; their predictions are returned in that order. terms: the term
    leaves in the order the rows are batched. extra: the per-checkpoint unconditional rows, averaged into the
    expression's one unconditional leaf (index `u_index` of core; its `model` is None). conds: id(leaf) ->
    conditioning; call_extra: keyword arguments every network call of the family gets (SDXL's time ids). routing
    (`pipelines.lora.Routing`, or None): the LoRA adapter of every row (`Leaf.adapter`) is set for each call by
    `routing.context`, so the terms of one base network stay in one call whatever their LoRA (`routing.split`: one
    call per network and adapter instead).
    """

    def __init__(self, core: list[Leaf], terms: list[Leaf], extra: list[Leaf], conds: dict, u_index: int | None,
                 call_extra: dict | None = None, routing: Any = None) -> None:  # fmt: skip
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

    def predict(self, x: torch.Tensor, t: Any, schedule: NoiseSchedule, *, zeta: torch.Tensor | None = None,
                divergence: str | None = None, fd_e: float = 0.0) -> tuple[torch.Tensor, Any]:  # fmt: skip
        """eps_hat (L, n, ...) of the core's leaves at (x, t) and, with probes zeta (K, n, ...), div_x eps_hat (L, n).

        One network call per group (per probe for forward-mode JVPs). The unconditional leaf is the mean over its
        rows; its divergence is left at 0 since no operator reads its log q. At alpha = 0 (t = 1 of a flow path) a
        third element, the data predictions x0_hat (L, n, ...), which the step from there needs; no divergence is
        computed there (the step moves every log q alike).
        """
        L, n = len(self.leaves), x.shape[0]
        index = {id(leaf): i for i, leaf in enumerate(self.leaves)}
        t64 = torch.as_tensor(t, dtype=torch.float64).detach().cpu()
        need_x0 = float(schedule.alpha(t64)) == 0.0
        if need_x0:
            zeta = divergence = None
        eps = torch.zeros((L, *x.shape), dtype=torch.float32, device=x.device)
        x0 = torch.zeros_like(eps) if need_x0 else None
        counts = torch.zeros(L, dtype=torch.float32)
        div = torch.zeros(L, n, dtype=torch.float64, device=x.device) if zeta is not None else None
        K = 0 if zeta is None else zeta.shape[0]
        for g in self.groups:
            model, family = g["model"], g["model"].family
            xs, tins, chunks, conds = [], [], [], []
            for leaf, cond in zip(g["parts"], g["conds"], strict=True):
                sch = leaf.model_schedule
                same = sch == schedule
                t_m = t64 if same else sch.t_from_log_snr(schedule.log_snr(t64))
                scale = 1.0 if same else float((sch.log_alpha(t_m) - schedule.log_alpha(t64)).exp())
                probe = divergence == "hutchinson_fd" and not leaf.unconditional and zeta is not None
                copies = [x] + ([x + fd_e * z for z in zeta] if probe else [])
                for j, xc in enumerate(copies):
                    xs.append(xc * scale)
                    chunks.append((index[id(leaf)], j, leaf, t_m, scale))
                    tins.append(family.timestep(sch, t_m))
                    conds.append(cond)
            X = torch.cat(xs)
            T = torch.cat([tt.reshape(1).expand(n) for tt in tins]).to(device=x.device, dtype=torch.float32)

            def fn(Xin: torch.Tensor, model=model, family=family, T=T, conds=conds, chunks=chunks) -> torch.Tensor:
                pred = family.forward(model, Xin, T, conds, n, self.call_extra)
                out = []
                for c, (li, j, leaf, t_m, _) in enumerate(chunks):
                    rows, kind = slice(c * n, (c + 1) * n), leaf.model.prediction_type
                    out.append(compose.to_eps(pred[rows], Xin[rows], t_m, leaf.model_schedule, kind))
                    if need_x0 and j == 0:  # x0 is the same data in every parametrisation (equal SNR)
                        x0[li] += to_x0(pred[rows], Xin[rows], t_m, leaf.model_schedule, kind)
                return torch.cat(out)

            with self._adapters(g["net"], [c[2].adapter for c in chunks], n):  # set outside the JVP's transform
                if divergence == "hutchinson" and zeta is not None:
                    E = None
                    math_attention = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)
                    with math_attention, forward_ad_ready(g["net"]):
                        for k in range(K):
                            tangent = torch.cat(
                                [torch.zeros_like(x) if lf.unconditional else zeta[k] * s for (_, _, lf, _, s) in
                                 chunks]
                            )  # fmt: skip
                            out, jv = torch.func.jvp(fn, (X,), (tangent,))
                            E = out if E is None else E
                            for c, (li, _, lf, _, _) in enumerate(chunks):
                                if not lf.unconditional:
                                    jvc = jv[c * n : (c + 1) * n]
                                    div[li] += (zeta[k] * jvc).reshape(n, -1).sum(-1).to(torch.float64) / K
                else:
                    E = fn(X)
            for c, (li, j, _, _, _) in enumerate(chunks):
                Ec = E[c * n : (c + 1) * n]
                if j == 0:
                    eps[li] += Ec
                    counts[li] += 1
                    base = Ec
                else:
                    diff = (zeta[j - 1] * (Ec - base)).reshape(n, -1).sum(-1)
                    div[li] += diff.to(torch.float64) / (fd_e * K)
        scale = counts.clamp_min(1).to(eps.device).reshape(L, *([1] * x.ndim))
        eps = eps / scale
        M = self.num_core
        eps_l, div_l = eps[:M].clone(), None if div is None else div[:M].clone()
        if self.u_index is not None:
            eps_l[self.u_index] = eps[M:].mean(0)
            if div_l is not None:
                div_l[self.u_index] = 0.0
        if not need_x0:
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
