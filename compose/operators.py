"""Composition operators as small expression trees over models (docs/MATH.md section 5).

Every node reduces, at one (x, t), to coefficients c (n, L) over the L leaf predictions: the composed prediction
is eps_bar = sum_l c_l eps_l. Each leaf's log-density increment over the step is affine in c,
    dlogq = Q c + r        (Q: (n, L, L), r: (n, L); see `compose.composer`),
so every operator is a cheap function of (Q, r, log q) and never touches the big tensors.

Tracked log-density of an inner node (what a parent sees when operators nest):
  - OR:       log sum_j w_j q_j        the mixture density (exact when its children are exact and T = 1);
  - AND:      mean_j log q_j           the children are equal by construction, this is their common value;
  - Average:  mean_j log q_j           the (unnormalised) geometric mean, whose score is the average score;
  - Product:  sum_j w_j log q_j        the (unnormalised) product prod_j q_j^{w_j}, whose score is sum_j w_j s_j;
  - Guided:   log q of its conditional expression (densities are tracked for the un-guided conditionals).

An AND node chooses kappa so that its children's density increments are equal along the step that is actually
taken: at the root, or below a `Guided` node, this is exact (SuperDiff Prop. 6). Below an OR / Average / Product
node it is exact given the siblings' coefficients, which for siblings that are themselves AND nodes are their
own stand-alone solutions (a documented approximation; siblings are not solved jointly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .models import model_name
from .options import operator_record


@dataclass
class StepContext:
    """What the operators see at one step. All float64, on the predictions' device."""

    Q: torch.Tensor  # (n, L, L): dlogq_leaf = Q @ c + r
    r: torch.Tensor  # (n, L)
    log_q: torch.Tensor  # (n, L) leaf log-densities at the start of the step
    bias_scale: float = 0.0  # h / (t_first - t_last): AND biases are spread over the trajectory
    kappa: dict[str, torch.Tensor] = field(default_factory=dict)  # filled in: node path -> (n, K)


Outer = tuple[torch.Tensor, torch.Tensor] | None  # (offset (n, L), scale (n,)): root c = offset + scale * c_node


class Expr:
    """Base class of composition operators. Children are models (leaves) or other expressions."""

    children: tuple
    path: str = "root"
    reads_log_q = False  # its coefficients depend on the tracked densities (OR, AND): samplers must track them
    has_density = True  # it has a density a product of experts can multiply (not AND, Guided, PoE)

    def __init__(self, *children: Any, name: str) -> None:
        if len(children) == 1 and isinstance(children[0], (list, tuple)):
            children = tuple(children[0])
        self.children = tuple(children)
        self.op_name = name

    # ---------------------------------------------------------------- public helpers
    def leaves(self) -> list:
        """The distinct models of the expression, in order of first appearance (a model used twice is one leaf)."""
        out: list = []
        for c in self.children:
            for leaf in c.leaves() if isinstance(c, Expr) else [c]:
                if not any(leaf is o for o in out):
                    out.append(leaf)
        return out

    def nodes(self) -> list[Expr]:
        """All operator nodes, depth first, root first."""
        out: list[Expr] = [self]
        for c in self.children:
            if isinstance(c, Expr):
                out.extend(c.nodes())
        return out

    def compile(self) -> list:
        """Number the leaves and name every node by its path ("root", "root.1", ...). Returns the leaves."""
        leaves = self.leaves()
        self._assign(leaves, "root")
        return leaves

    def _assign(self, leaves: list, path: str) -> None:
        self.path = path
        self._index = [_find(leaves, c) if not isinstance(c, Expr) else None for c in self.children]
        self._num_leaves = len(leaves)
        for j, c in enumerate(self.children):
            if isinstance(c, Expr):
                c._assign(leaves, f"{path}.{j}")

    def __repr__(self) -> str:
        """The expression with the parameters that change its target (the operator key of schedule files).

        Parameters at their defaults are left out, so `OR(a, b)` reads the same as before they existed. Numerical
        settings that leave the target alone (AND's rcond and clamp) are left out too.
        """
        parts = [repr(c) if isinstance(c, Expr) else model_name(c) for c in self.children]
        parts += [f"{k}={v}" for k, v in self._key_params().items()]
        return f"{self.op_name}({', '.join(parts)})"

    def _key_params(self) -> dict[str, str]:
        """Non-default parameters that change what the node samples, as text for `repr`."""
        return {}

    # ---------------------------------------------------------------- per-step quantities (internal)
    def contains_and(self) -> bool:
        return any(isinstance(n, AND) for n in self.nodes())

    def _child_logq(self, ctx: StepContext) -> torch.Tensor:
        """(n, K) tracked log-densities of the children."""
        pairs = zip(self.children, self._index, strict=True)
        cols = [c.node_log_q(ctx) if isinstance(c, Expr) else ctx.log_q[:, i] for c, i in pairs]
        return torch.stack(cols, dim=-1)

    def _child_sens(self, ctx: StepContext) -> torch.Tensor:
        """(n, K, L) d(child log q) / d(leaf log q)."""
        n, L = ctx.log_q.shape
        out = []
        for c, i in zip(self.children, self._index, strict=True):
            if isinstance(c, Expr):
                out.append(c.node_sens(ctx))
            else:
                e = torch.zeros(n, L, dtype=ctx.log_q.dtype, device=ctx.log_q.device)
                e[:, i] = 1.0
                out.append(e)
        return torch.stack(out, dim=1)

    def _child_coeffs(self, ctx: StepContext, outers: list[Outer] | None = None) -> torch.Tensor:
        """(n, K, L) leaf coefficients of each child."""
        n, L = ctx.log_q.shape
        out = []
        for j, (c, i) in enumerate(zip(self.children, self._index, strict=True)):
            if isinstance(c, Expr):
                out.append(c.coeffs(ctx, None if outers is None else outers[j]))
            else:
                e = torch.zeros(n, L, dtype=ctx.log_q.dtype, device=ctx.log_q.device)
                e[:, i] = 1.0
                out.append(e)
        return torch.stack(out, dim=1)

    def _mix(self, ctx: StepContext, outer: Outer, kappa: torch.Tensor) -> torch.Tensor:
        """sum_j kappa_j c_j, re-solving AND-containing children inside their actual surroundings."""
        ctx.kappa[self.path] = kappa
        C = self._child_coeffs(ctx)
        if any(isinstance(c, Expr) and c.contains_and() for c in self.children):
            o, s = _outer_or_identity(outer, C)
            weighted = kappa[..., None] * C
            total = weighted.sum(1)
            outers: list[Outer] = [
                (o + s[:, None] * (total - weighted[:, j]), s * kappa[:, j]) for j in range(len(self.children))
            ]
            C = self._child_coeffs(ctx, outers)
            ctx.kappa[self.path] = kappa
        return torch.einsum("nk,nkl->nl", kappa, C)

    def node_log_q(self, ctx: StepContext) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def node_sens(self, ctx: StepContext) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def coeffs(self, ctx: StepContext, outer: Outer = None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def _find(leaves: list, model: Any) -> int:
    for i, leaf in enumerate(leaves):
        if leaf is model:
            return i
    raise AssertionError("leaf not found")  # unreachable: leaves() collected every model


def _outer_or_identity(outer: Outer, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if outer is not None:
        return outer
    n, _, L = C.shape
    return torch.zeros(n, L, dtype=C.dtype, device=C.device), torch.ones(n, dtype=C.dtype, device=C.device)


def _check_count(children: tuple, op: str, minimum: int) -> None:
    if len(children) < minimum:
        raise ValueError(
            f"{op} needs at least {minimum} models or expressions; got {len(children)}. "
            + ("Sample a single model directly instead." if minimum == 2 else "")
        )


def _weights(weights: Any, k: int, op: str, *, positive: bool) -> torch.Tensor:
    if weights is None:
        return torch.ones(k, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != k:
        raise ValueError(f"{op}: weights has {w.numel()} entries but there are {k} terms; give one weight per term.")
    if not bool(torch.all(torch.isfinite(w))):
        raise ValueError(f"{op}: weights must be finite; got {w.tolist()}.")
    if positive and bool(torch.any(w <= 0)):
        raise ValueError(
            f"{op}: weights must be positive (they are mixture weights); got {w.tolist()}. "
            "Use Product with a negative weight for negation."
        )
    return w


class OR(Expr):
    """Mixture of the children: kappa = softmax(T log q + log w) (SuperDiff Prop. 3/4, Alg. 1).

    With temperature T = 1 this samples sum_i w_i q_i exactly (given exact scores and densities); T != 1
    sharpens (T > 1) or flattens the choice, a heuristic. The log-weights log w stay outside T.
    """

    reads_log_q = True

    def __init__(self, *models: Any, weights: Any = None, temperature: float = 1.0) -> None:
        super().__init__(*models, name="OR")
        _check_count(self.children, "OR", 2)
        w = _weights(weights, len(self.children), "OR", positive=True)
        self.log_weights = (w / w.sum()).log()
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"OR: temperature must be a positive finite number; got {temperature}.")
        self.temperature = float(temperature)

    def _log_w(self, ref: torch.Tensor) -> torch.Tensor:
        return self.log_weights.to(device=ref.device)

    def _key_params(self) -> dict[str, str]:
        out = {}
        w = self.log_weights.exp()
        if not torch.allclose(w, torch.full_like(w, 1.0 / len(w)), rtol=0.0, atol=1e-12):
            out["weights"] = _fmt(w)  # normalised: OR(a, b, weights=[2, 2]) is OR(a, b)
        if self.temperature != 1.0:
            out["temperature"] = f"{self.temperature:.6g}"
        return out

    def kappa(self, ctx: StepContext) -> torch.Tensor:
        lq = self._child_logq(ctx)
        z = self.temperature * lq + self._log_w(lq)
        return torch.softmax(z - z.amax(-1, keepdim=True), dim=-1)

    def coeffs(self, ctx: StepContext, outer: Outer = None) -> torch.Tensor:
        return self._mix(ctx, outer, self.kappa(ctx))

    def node_log_q(self, ctx: StepContext) -> torch.Tensor:
        lq = self._child_logq(ctx)
        return torch.logsumexp(lq + self._log_w(lq), dim=-1)

    def node_sens(self, ctx: StepContext) -> torch.Tensor:
        lq = self._child_logq(ctx)
        post = torch.softmax(lq + self._log_w(lq), dim=-1)
        return torch.einsum("nk,nkl->nl", post, self._child_sens(ctx))


class AND(Expr):
    """Equal densities: kappa such that every child's log-density moves by the same amount (SuperDiff Prop. 6).

    Solves A kappa - lambda 1 = -b + l, 1^T kappa = 1: on the subspace 1^T kappa = 1 this is B u = rhs with
    B = V^T A V ((M-1) x (M-1), V an orthonormal basis of 1^T v = 0) and kappa = 1/M + V u. kappa may leave [0, 1]
    (an affine combination).

    Regularisation rule (docs/MATH.md section 5): B is measured against the predictions' squared norm,
    B_n = B / mean_j |A_jj|; its singular values s_i are of order r_i^2 / 2 where r_i is the relative difference
    of the predictions along direction i (|eps_1 - eps_2| / |eps| for two). The solve is the pseudo-inverse with an
    absolute cut-off,
        u = sum_{i: s_i >= rcond} v_i (w_i^T rhs_n) / s_i,
    so every direction in which the predictions differ by r >~ sqrt(2 rcond) is solved exactly, and one in which they
    do not (coinciding predictions; collinear ones, where one combination of kappa does not move eps_bar; float32
    rounding) is left at its 1/M value: kappa = 1/M when all predictions coincide, the minimum-norm solution when
    some directions are degenerate, never NaN or inf. The default rcond = 1e-10 solves every direction with
    r >= 1.5e-5 exactly; the Gram matrix is formed in float64 from the predictions, so s is resolved to ~1e-15 even
    for float32 networks. Exact means unbounded: when the predictions differ by little, equal densities can need
    |kappa| in the hundreds (eps_bar stays finite: kappa multiplies their small difference); `clamp` bounds it.

    Args:
        bias: (M,) prescribed log-density offsets l. Sign convention: over the whole grid the step-wise targets
            add up to log q_i - log q_j = l_i - l_j (plus the difference at the start); a larger l_i favours
            samples more likely under model i. Spread evenly over the steps, so it does not depend on the step count.
        rcond: the cut-off of the rule above (>= 0; 0 drops only exactly singular directions).
        clamp: optional (lo, hi): clamp each kappa to [lo, hi], then renormalise to sum 1. Requires lo < 1/M < hi.
    """

    reads_log_q = True
    has_density = False  # its children are equal by construction; there is no density to multiply

    def __init__(self, *models: Any, bias: Any = None, rcond: float = 1e-10, clamp: tuple | None = None) -> None:
        super().__init__(*models, name="AND")
        k = len(self.children)
        _check_count(self.children, "AND", 2)
        self.bias = (
            torch.zeros(k, dtype=torch.float64) if bias is None else _weights(bias, k, "AND bias", positive=False)
        )
        if isinstance(rcond, bool) or not (isinstance(rcond, (int, float)) and math.isfinite(rcond) and rcond >= 0):
            raise ValueError(f"AND: rcond must be a finite number >= 0 (the cut-off of the solve); got {rcond!r}.")
        self.rcond = float(rcond)
        if clamp is not None:
            lo, hi = (float(v) for v in clamp)
            if not lo < 1.0 / k < hi:
                raise ValueError(f"AND: clamp=(lo, hi) must satisfy lo < 1/M < hi (M={k}); got {clamp}.")
            clamp = (lo, hi)
        self.clamp = clamp
        # Orthonormal basis V (M, M-1) of the directions with 1^T v = 0.
        q, _ = torch.linalg.qr(torch.cat([torch.ones(k, 1), torch.eye(k)[:, : k - 1]], dim=1).double())
        self._V = q[:, 1:]

    def _key_params(self) -> dict[str, str]:
        # Only differences of the bias matter (the targets are equal increments), so the key shifts it to mean 0.
        b = self.bias - self.bias.mean()
        return {"bias": _fmt(b)} if bool((b.abs() > 1e-12).any()) else {}

    def coeffs(self, ctx: StepContext, outer: Outer = None) -> torch.Tensor:
        C = self._child_coeffs(ctx)  # (n, K, L): children's own coefficients (stand-alone solves for inner ANDs)
        Msens = self._child_sens(ctx)  # (n, K, L)
        o, s = _outer_or_identity(outer, C)
        QC = torch.einsum("nab,nkb->nka", ctx.Q, C)
        A = s[:, None, None] * torch.einsum("nja,nka->njk", Msens, QC)  # A_jk = s m_j^T Q c_k
        b = torch.einsum("nja,na->nj", Msens, torch.einsum("nab,nb->na", ctx.Q, o) + ctx.r)
        k = C.shape[1]
        target = (self.bias.to(A) * ctx.bias_scale)[None].expand_as(b)
        V = self._V.to(A)
        kappa0 = torch.full((k,), 1.0 / k, dtype=A.dtype, device=A.device)
        B = V.T @ A @ V  # (n, K-1, K-1)
        rhs = torch.einsum("km,nk->nm", V, target - b - A @ kappa0)
        # Measure B against the predictions' squared norms (A's diagonal), then drop only the directions whose
        # singular value falls below rcond (class docstring): a well-posed solve is left exact.
        ref = torch.diagonal(A, dim1=-2, dim2=-1).abs().mean(-1).clamp_min(torch.finfo(A.dtype).tiny)
        Bn, rn = B / ref[:, None, None], rhs / ref[:, None]
        W, sv, Vh = torch.linalg.svd(Bn)
        keep = (sv >= self.rcond) & (sv > 0)
        inv = torch.where(keep, 1.0 / torch.where(keep, sv, torch.ones_like(sv)), torch.zeros_like(sv))
        u = torch.einsum("nji,ni,nik->nj", Vh.transpose(-1, -2), inv, torch.einsum("nki,nk->ni", W, rn)[..., None])
        kappa = kappa0 + u @ V.T
        if self.clamp is not None:
            kappa = kappa.clamp(*self.clamp)
            kappa = kappa / kappa.sum(-1, keepdim=True)
        ctx.kappa[self.path] = kappa
        return torch.einsum("nk,nkl->nl", kappa, C)

    def node_log_q(self, ctx: StepContext) -> torch.Tensor:
        return self._child_logq(ctx).mean(-1)

    def node_sens(self, ctx: StepContext) -> torch.Tensor:
        return self._child_sens(ctx).mean(1)


class Average(Expr):
    """Average of scores, kappa = 1/M fixed (a baseline): samples the normalised geometric mean of the children."""

    def __init__(self, *models: Any) -> None:
        super().__init__(*models, name="Average")
        _check_count(self.children, "Average", 1)

    def coeffs(self, ctx: StepContext, outer: Outer = None) -> torch.Tensor:
        n, k = ctx.log_q.shape[0], len(self.children)
        return self._mix(ctx, outer, torch.full((n, k), 1.0 / k, dtype=ctx.log_q.dtype, device=ctx.log_q.device))

    def node_log_q(self, ctx: StepContext) -> torch.Tensor:
        return self._child_logq(ctx).mean(-1)

    def node_sens(self, ctx: StepContext) -> torch.Tensor:
        return self._child_sens(ctx).mean(1)


class Product(Expr):
    """Sum of weighted scores, s = sum_i w_i s_i (Composable Diffusion style; a negative weight is negation).

    This is the score of prod_i q_i^{w_i} only at t = 0: at t > 0 it is a heuristic (use products of experts with
    Feynman-Kac reweighting for the product itself). Under `Guided` the weights apply to the differences from
    the unconditional prediction: eps_u + w sum_i w_i (eps_i - eps_u), exactly Composable Diffusion.
    """

    def __init__(self, *models: Any, weights: Any = None) -> None:
        super().__init__(*models, name="Product")
        _check_count(self.children, "Product", 1)
        self.weights = _weights(weights, len(self.children), "Product", positive=False)

    def _key_params(self) -> dict[str, str]:
        return {"weights": _fmt(self.weights)} if bool((self.weights != 1.0).any()) else {}

    def coeffs(self, ctx: StepContext, outer: Outer = None) -> torch.Tensor:
        n = ctx.log_q.shape[0]
        return self._mix(ctx, outer, self.weights.to(ctx.log_q)[None].expand(n, -1))

    def node_log_q(self, ctx: StepContext) -> torch.Tensor:
        return self._child_logq(ctx) @ self.weights.to(ctx.log_q)

    def node_sens(self, ctx: StepContext) -> torch.Tensor:
        return torch.einsum("k,nkl->nl", self.weights.to(ctx.log_q), self._child_sens(ctx))


class Guided(Expr):
    """Classifier-free guidance around a composed prediction (docs/MATH.md section 3):

        eps = eps_u + scale * (eps_cond - S eps_u),   S = sum of the condition's leaf coefficients

    (S = 1 for OR / AND / Average, so this is the usual eps_u + w (eps_bar - eps_u); for a Product it gives
    Composable Diffusion's eps_u + w sum_i w_i (eps_i - eps_u)). scale = 1 returns the condition unchanged.
    """

    has_density = False  # guidance is written PoE(..., unconditional=u)

    def __init__(self, cond: Any, unconditional: Any, scale: float) -> None:
        super().__init__(cond, unconditional, name="Guided")
        if not math.isfinite(scale):
            raise ValueError(f"Guided: scale must be finite; got {scale}.")
        if isinstance(unconditional, Expr):
            raise ValueError("Guided: the unconditional term must be a model, not an expression.")
        self.scale = float(scale)

    def coeffs(self, ctx: StepContext, outer: Outer = None) -> torch.Tensor:
        cond = self.children[0]
        n, L = ctx.log_q.shape
        e_u = torch.zeros(n, L, dtype=ctx.log_q.dtype, device=ctx.log_q.device)
        e_u[:, self._index[1]] = 1.0
        if isinstance(cond, Expr):
            c_cond = cond.coeffs(ctx, None)
            if cond.contains_and():
                o, s = _outer_or_identity(outer, c_cond[:, None])
                total = c_cond.sum(-1)
                inner: Outer = (o + s[:, None] * (1.0 - self.scale * total)[:, None] * e_u, s * self.scale)
                c_cond = cond.coeffs(ctx, inner)
        else:
            c_cond = torch.zeros_like(e_u)
            c_cond[:, self._index[0]] = 1.0
        total = c_cond.sum(-1, keepdim=True)
        ctx.kappa[self.path] = torch.stack(
            [torch.full_like(total[:, 0], self.scale), 1.0 - self.scale * total[:, 0]], -1
        )
        return e_u + self.scale * (c_cond - total * e_u)

    def node_log_q(self, ctx: StepContext) -> torch.Tensor:
        return self._child_logq(ctx)[:, 0]

    def node_sens(self, ctx: StepContext) -> torch.Tensor:
        return self._child_sens(ctx)[:, 0]


def _fmt(v: torch.Tensor) -> str:
    """A vector as short, stable text for `repr` keys: [0.7, 0.3]."""
    return "[" + ", ".join(f"{float(x):.6g}" for x in v) + "]"


def operator_root(expr: Expr) -> Expr:
    """The outermost operator that is not `Guided` (whose kappa users look at)."""
    while isinstance(expr, Guided) and isinstance(expr.children[0], Expr):
        expr = expr.children[0]
    return expr


def named_operator(name: str, leaves: list, *, weights: Any = None, temperature: float = 1.0) -> Expr:
    """The expression of an operator named in `compose.options.OPERATORS` over `leaves` (an operator sampled with
    particles, "product_smc", is a `compose.PoE`, built by its sampler)."""
    record = operator_record(name)
    if record.particles:
        raise ValueError(f"operator={name!r} is sampled with particles; build it as compose.PoE(...).")
    return _NAMED[record.name](leaves, weights, temperature)


# One constructor per named operator (`compose.options.OPERATOR_TABLE` says which arguments each takes).
_NAMED = {
    "or": lambda leaves, weights, temperature: OR(*leaves, weights=weights, temperature=temperature),
    "and": lambda leaves, weights, temperature: AND(*leaves),
    "average": lambda leaves, weights, temperature: Average(*leaves),
    "product": lambda leaves, weights, temperature: Product(*leaves, weights=weights),
}
