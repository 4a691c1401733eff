"""`delta`: one shared FF for the window (from a base method) plus, for each layer, a rank-r
correction of each projection: W_l ~ W_shared + U_l D_l, and (FFs with biases) b_l ~ b_shared + c_l.

Initialisation (`init`):
- `fit` (default): reduced-rank least squares on calibration activations. An input projection's
  correction reproduces the layer's own pre-activations on its own inputs: the rank-r D minimising
  E|(W_l - W_shared - D)(x - mean x)|^2 is the projection of W_l - W_shared onto the top-r
  eigenvectors of (W_l - W_shared) Cov(x) (W_l - W_shared)^T, an activation-weighted SVD. The output
  projection's correction is then fitted to what is left of the layer's original FF output, given
  the hidden activations the corrected input projections produce (reduced-rank regression).
  Then `rounds` times (default 0: on all-MiniLM-L6-v2 it did not help), as the `sequential` method does: every layer's inputs are taken
  from the window computing with the shared FF and the corrections so far, and the corrections are
  refitted so that, from those drifted inputs, each layer reproduces its original pre-activations
  and its original FF output.
- `svd`: truncated SVD of W_l - W_shared in the aligned basis (weights only; biases exact).

`shared_rounds` (fit only; default 10, 0 keeps the base method's shared weights): the shared weights
are refitted jointly with the corrections. Each projection's error left after the corrections, summed
over the window, is lowered by alternating: each layer's correction subspace given the shared weight,
then the shared weight given those subspaces (`_joint`). `ranks`: `equal` gives every layer rank r;
`pooled` gives the window's k r directions to whichever layers they remove the most error from (each
keeps at least one), so layers that differ more from the shared FF get more (the default; the
parameter count is the same). On SmolLM2-135M (window 15-19, budget 0.35) the two took BBC test perplexity from 29.27 to
27.44; docs/results.md has the measurements.

`weighting` (fit only): `output` (default) counts an input projection's error in each hidden unit by how
much that unit moves the layer's FF output, to first order (E[(dh_j/dpre_j)^2] |W_out[:, j]|^2, from the
calibration pass), in the joint fit, the subspaces and the pooling; `none` counts every unit alike.
On SmolLM2-135M (14-19, budget 0.48) it took perplexity from 27.15 to 26.75 (13-18: 26.14).

Rank: `rank` >= 0, or (`rank` -1) from `budget`, the fraction of the merged-away FF parameters kept
as corrections. Rank 0 is the base method; full rank reproduces every layer (up to the ridge)."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from ...errors import InputError
from ..data import real_rows
from .average import average
from .common import RIDGE, Capture, MergeMethod, WindowFit, drifted_inputs, linear, replay, rows, solve, swapped
from .refit import refit, sequential
from .regmean import regmean

BASES = {"average": average, "regmean": regmean, "refit": refit, "sequential": sequential}
INITS = ("fit", "svd")
RANKS = ("equal", "pooled")
WEIGHTINGS = ("none", "output")
PROJECTION_SETS = {"all": ("in", "gate", "out"), "out": ("out",), "in": ("in", "gate")}


@dataclass
class Delta:
    """One layer's correction of one projection, as a linear map: y += (x down^T) up^T + bias."""

    up: torch.Tensor  # [d_out, r]
    down: torch.Tensor  # [r, d_in]
    bias: torch.Tensor | None = None  # [d_out]


@dataclass
class Combined:
    """What a method gives a window: the shared tensors and, for `delta`, each layer's corrections."""

    shared: dict[str, torch.Tensor]
    deltas: dict[int, dict[str, Delta]] = field(default_factory=dict)  # layer -> projection -> Delta


def rank_for_budget(fit: WindowFit, projections: tuple[str, ...], budget: float) -> int:
    """The largest rank whose corrections, over every layer of the window, stay within `budget` of the
    merged-away FF parameters."""
    if not 0 <= budget < 1:
        raise InputError(f"--delta-budget must be in [0, 1); got {budget}.")
    k = len(fit.layers)
    first = fit.aligned[0]  # one aligned copy, read once
    ff = sum(t.numel() for t in first.values())
    per_rank = bias_cost = 0
    for p in projections:
        w = linear(first[_role(p) + ".weight"], fit.adapter)
        per_rank += w.shape[0] + w.shape[1]
        bias_cost += w.shape[0] if fit.adapter.bias else 0
    return max(0, int((budget * (k - 1) * ff / k - bias_cost) // per_rank))


def _role(projection: str) -> str:
    return {"in": "fc_in", "gate": "gate", "out": "fc_out"}[projection]


def _top(b: torch.Tensor, cov: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) of the best rank-r approximation of b [d_out, d_in] in the metric of cov [d_in, d_in]."""
    return _pair(_subspaces([b], [cov], rank, pooled=False)[0], b, None)


def _pair(q: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) of the correction of b within basis q, found for the rows of b scaled by `scale`."""
    if scale is None:
        return q, q.T @ b
    return q / scale[:, None], q.T @ (scale[:, None] * b)


def _subspaces(
    diffs: list[torch.Tensor], covs: list[torch.Tensor], rank: int, pooled: bool,
    scales: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:  # fmt: skip
    """Per layer, the orthonormal basis Q [d_out, r_l] of its best correction of diffs[l] in the metric of
    covs[l]: rank r each, or (`pooled`) the k r directions that remove the most error over the window.
    With `scales`, each output row's error counts scale^2 times (Q is then for the scaled rows)."""
    if scales is not None:
        diffs = [s[:, None] * b for s, b in zip(scales, diffs)]
    eig = [_spectrum(b, c) for b, c in zip(diffs, covs)]
    cap = min(diffs[0].shape)
    if not pooled:
        ranks = [min(rank, cap)] * len(diffs)
    else:  # every layer keeps its first direction (no empty MatMuls); the rest go to the largest gains
        gains = torch.cat([vals[-cap:-1].flip(0) for vals, _ in eig]) if cap > 1 else torch.zeros(0)
        owner = torch.arange(len(diffs)).repeat_interleave(cap - 1)
        chosen = owner[torch.argsort(gains, descending=True)[: (min(rank, cap) - 1) * len(diffs)]]
        ranks = [1 + int((chosen == i).sum()) for i in range(len(diffs))]
    return [torch.linalg.qr(vecs[:, vecs.shape[1] - r :])[0] for (_, vecs), r in zip(eig, ranks)]


def _spectrum(b: torch.Tensor, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and output-space eigenvectors of b cov b^T, through the smaller side of b."""
    if b.shape[0] <= b.shape[1]:
        fitted = b @ cov @ b.T
        return torch.linalg.eigh((fitted + fitted.T) / 2)
    s, v = torch.linalg.eigh(cov)
    m = b @ (v * s.clamp_min(0).sqrt())  # b cov b^T = m m^T
    vals, w = torch.linalg.eigh(m.T @ m)
    return vals, m @ w / vals.clamp_min(1e-300).sqrt()


class _Stats:
    """Streaming sums for a regression of r on x, centered when the FF has biases."""

    def __init__(self, intercept: bool):
        self.intercept = intercept
        self.n, self.sx, self.sr, self.xx, self.xr = 0, 0, 0, 0, 0

    def add(self, x: torch.Tensor, r: torch.Tensor) -> None:
        x, r = x.double(), r.double()
        self.n += len(x)
        self.sx, self.sr = self.sx + x.sum(0), self.sr + r.sum(0)
        self.xx, self.xr = self.xx + x.T @ x, self.xr + x.T @ r

    def moments(self):
        """(cov_xx, cov_xr, mean_x, mean_r); uncentered second moments without an intercept."""
        mx, mr = self.sx / self.n, self.sr / self.n
        xx, xr = self.xx / self.n, self.xr / self.n
        if self.intercept:
            xx, xr = xx - torch.outer(mx, mx), xr - torch.outer(mx, mr)
        return xx, xr, mx, mr


def _weights(fit: WindowFit, layer_pos: int, shared: dict, projection: str):
    role = _role(projection)
    aligned = fit.aligned[layer_pos]
    w_l = linear(aligned[role + ".weight"], fit.adapter).double()
    w_s = linear(shared[role + ".weight"], fit.adapter).double()
    b_l = aligned.get(role + ".bias")
    b_s = shared.get(role + ".bias")
    db = (b_l.double() - b_s.double()) if b_l is not None else None
    return w_l - w_s, db


def _svd(fit: WindowFit, shared: dict, projections, rank: int) -> dict[int, dict[str, Delta]]:
    out = {}
    for pos, i in enumerate(fit.layers):
        for p in projections:
            dw, db = _weights(fit, pos, shared, p)
            u, s, vh = torch.linalg.svd(dw, full_matrices=False)
            r = min(rank, len(s))
            out.setdefault(i, {})[p] = Delta(u[:, :r] * s[:r], vh[:r], db)
    return out


def _cg(op, rhs: torch.Tensor, x: torch.Tensor, precondition, steps: int = 100, tol: float = 1e-10) -> torch.Tensor:
    """Preconditioned conjugate gradients for op(x) = rhs, op self-adjoint positive definite (Frobenius)."""
    r = rhs - op(x)
    z = precondition(r)
    p, rz = z, (r * z).sum()
    stop = tol * float((rhs * precondition(rhs)).sum())
    for _ in range(steps):
        if float(rz) <= stop:
            break
        ap = op(p)
        a = rz / (p * ap).sum()
        x, r = x + a * p, r - a * ap
        z = precondition(r)
        rz, old = (r * z).sum(), rz
        p = z + (rz / old) * p
    return x


def _joint(
    targets: list[torch.Tensor], covs: list[torch.Tensor], w: torch.Tensor, rank: int, rounds: int, ridge: float,
    pooled: bool = False, scales: list[torch.Tensor] | None = None,
):  # fmt: skip
    """The shared W [d_out, d_in] minimising sum_l |(1 - P_l) S_l (T_l - W)|^2 in the metric of C_l, where P_l
    is layer l's best rank-r projector for what the shared W leaves (the subspace its correction spans) and
    S_l scales the output rows (`scales`; identity without). Alternates: the projectors given W (optimal),
    then W given the projectors (conjugate gradients, preconditioned by the Gram-weighted mean's inverse).
    Each step lowers the objective."""
    total = sum(covs)
    lam = ridge * float(total.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(len(total), dtype=total.dtype)
    inverse = torch.linalg.inv(total + lam * eye)
    ones = torch.ones(w.shape[0], dtype=w.dtype)
    ss = scales if scales is not None else [ones] * len(targets)
    mean_sq = sum(s**2 for s in ss) / len(ss)
    for _ in range(int(rounds)):
        qs = _subspaces([t - w for t in targets], covs, rank, pooled, scales)

        def left(v, q, s):  # S (1 - P) S v
            v = s[:, None] * v
            return s[:, None] * (v - q @ (q.T @ v))

        def op(v, qs=qs):
            return sum(left(v, q, s) @ c for q, s, c in zip(qs, ss, covs)) + lam * mean_sq[:, None] * v

        rhs = sum(left(t, q, s) @ c for t, q, s, c in zip(targets, qs, ss, covs))
        w = _cg(op, rhs, w, lambda r: (r / mean_sq[:, None]) @ inverse)
    return w


def _corrected(fit: WindowFit, shared: dict, deltas: dict[int, dict[str, Delta]], i: int, projections) -> dict:
    """Layer i's full weights (role name -> tensor, PyTorch layout): shared plus its corrections."""
    adapter = fit.adapter
    values = dict(shared)
    for p, d in deltas.get(i, {}).items():
        if p not in projections:
            continue
        role = _role(p)
        w = linear(shared[role + ".weight"], adapter).double() + d.up @ d.down
        values[role + ".weight"] = linear(w, adapter).to(shared[role + ".weight"].dtype)
        if d.bias is not None:
            values[role + ".bias"] = (shared[role + ".bias"].double() + d.bias).to(shared[role + ".bias"].dtype)
    return values


def _refit_inputs(fit: WindowFit, cap: Capture, drifted: dict, shared: dict, projections, rank: int, ridge: float):
    """Input-projection corrections that give, from the drifted inputs, the original pre-activations."""
    adapter, bias = fit.adapter, fit.adapter.bias
    out: dict[int, dict[str, Delta]] = {}
    for pos, i in enumerate(fit.layers):
        aligned = fit.aligned[pos]
        for p in [p for p in projections if p != "out"]:
            role = _role(p)
            w_l = linear(aligned[role + ".weight"], adapter).double()
            b_l = aligned.get(role + ".bias")
            w_s = linear(shared[role + ".weight"], adapter).double()
            b_s = shared.get(role + ".bias")
            stats = _Stats(bias)
            for x, xd, m in zip(cap.x[i], drifted[i], cap.masks):
                x, xd = (real_rows(t, m).double() for t in (x, xd))
                target = x @ w_l.T + (b_l.double() if b_l is not None else 0)
                stats.add(xd, target - xd @ w_s.T - (b_s.double() if b_s is not None else 0))
            cov, cross, mx, mr = stats.moments()
            b = solve(cov, cross, ridge).T
            up, down = _top(b, cov, min(rank, *b.shape))
            out.setdefault(i, {})[p] = Delta(up, down, (mr - up @ (down @ mx)) if bias else None)
    return out


def _fit(
    fit: WindowFit, shared: dict, projections, rank: int, ridge: float, rounds: int, shared_rounds: int = 0,
    pooled: bool = False, weighted: bool = False,
) -> dict[int, dict[str, Delta]]:  # fmt: skip
    adapter, bias = fit.adapter, fit.adapter.bias
    cap = fit.capture()
    out: dict[int, dict[str, Delta]] = {}
    means, covs = [], []
    for i in fit.layers:  # input projections: the layer's own pre-activations
        x = cap.input_rows(i, bias=False)
        mx = x.mean(0)
        means.append(mx)
        covs.append((x - mx).T @ (x - mx) / len(x) if bias else x.T @ x / len(x))
        del x
    inputs = [p for p in projections if p != "out"]
    scales = _importance(fit, cap, inputs) if weighted and inputs else {}
    for p in inputs:
        if shared_rounds:
            name = _role(p) + ".weight"
            targets = [linear(a[name], adapter).double() for a in fit.aligned]
            w = linear(shared[name], adapter).double()
            w = _joint(targets, covs, w, rank, shared_rounds, ridge, pooled, scales.get(p))
            shared[name] = linear(w, adapter).to(shared[name].dtype).contiguous()
            del targets
        diffs = [_weights(fit, pos, shared, p) for pos in range(len(fit.layers))]
        qs = _subspaces([dw for dw, _ in diffs], covs, rank, pooled, scales.get(p))
        for pos, ((dw, db), q, mx, i) in enumerate(zip(diffs, qs, means, fit.layers)):
            up, down = _pair(q, dw, scales[p][pos] if p in scales else None)
            out.setdefault(i, {})[p] = Delta(up, down, (db + (dw - up @ down) @ mx) if bias else None)
        del diffs
    if "out" in projections:
        _fit_outputs(fit, cap, shared, out, rank, ridge, shared_rounds, pooled)
    for _ in range(int(rounds)):  # drift: refit on the inputs the corrected window really gives each layer
        values = {i: _corrected(fit, shared, out, i, ("in", "gate", "out")) for i in fit.layers}
        drifted = drifted_inputs(fit, cap.batches, values)
        refitted = _refit_inputs(fit, cap, drifted, shared, projections, rank, ridge)
        for i, per in refitted.items():
            out.setdefault(i, {}).update(per)
        if "out" in projections:
            original_x, cap.x = cap.x, drifted
            _fit_outputs(fit, cap, shared, out, rank, ridge)
            cap.x = original_x
    return out


def _fit_outputs(
    fit: WindowFit, cap: Capture, shared: dict, deltas: dict, rank: int, ridge: float, shared_rounds: int = 0,
    pooled: bool = False,
) -> None:  # fmt: skip
    """Output-projection corrections: what the shared output projection leaves of each layer's original FF
    output, regressed on the hidden units its corrected input projections give on cap.x. With
    `shared_rounds`, the shared output projection is refitted jointly with them (`_joint`)."""
    adapter = fit.adapter
    fitted = {}
    for i, stats in _hidden_stats(fit, cap, shared, deltas).items():
        cov, cross, mx, mr = stats.moments()
        b = solve(cov, cross, ridge).T  # [d_out, d_ff]: least squares of the residual on the hidden units
        fitted[i] = (b, cov, mx, mr)
    if shared_rounds:
        old = linear(shared["fc_out.weight"], adapter).double()
        targets = [b + old for b, *_ in fitted.values()]  # each layer's own least-squares output projection
        new = _joint(targets, [c for _, c, *_ in fitted.values()], old, rank, shared_rounds, ridge, pooled)
        shared["fc_out.weight"] = linear(new, adapter).to(shared["fc_out.weight"].dtype).contiguous()
        fitted = {i: (b + old - new, c, mx, mr + (old - new) @ mx) for i, (b, c, mx, mr) in fitted.items()}
    qs = _subspaces([b for b, *_ in fitted.values()], [c for _, c, *_ in fitted.values()], rank, pooled)
    for q, (i, (b, cov, mx, mr)) in zip(qs, fitted.items()):
        up, down = q, q.T @ b
        deltas.setdefault(i, {})["out"] = Delta(up, down, (mr - up @ (down @ mx)) if adapter.bias else None)


def _importance(fit: WindowFit, cap: Capture, projections: list[str]) -> dict[str, list[torch.Tensor]]:
    """Per input projection and layer, the square root of how much an error in each pre-activation moves
    the layer's FF output, to first order and unit by unit: E[(dh_j / dpre_j)^2] |W_out[:, j]|^2, with h
    the hidden units the output projection reads (aligned basis, the layer's own inputs and weights)."""
    model, adapter, stack = fit.model, fit.adapter, fit.stack
    sums = {p: {i: 0 for i in fit.layers} for p in projections}
    count = dict.fromkeys(fit.layers, 0)
    state, kept = {"batch": 0}, {}
    handles = []
    with ExitStack() as stack_:
        for pos, i in enumerate(fit.layers):
            stack_.enter_context(swapped(model, adapter, stack, [i], fit.aligned[pos], ("in", "gate", "out")))
            layer = adapter.layers(model, stack)[i]
            for p in projections:

                def feed(_m, args, i=i):
                    return (cap.x[i][state["batch"]],) + tuple(args[1:])

                def keep(_m, _args, out, i=i, p=p):
                    kept[i, p] = out.detach().requires_grad_(True)
                    return kept[i, p]

                module = adapter.projection(layer, p)
                handles += [module.register_forward_pre_hook(feed), module.register_forward_hook(keep)]

            def slopes(_m, args, i=i):
                grads = torch.autograd.grad(args[0].sum(), [kept[i, p] for p in projections])
                for p, g in zip(projections, grads):
                    g = real_rows(g, cap.masks[state["batch"]]).double()
                    sums[p][i] = sums[p][i] + (g**2).sum(0)
                count[i] += len(g)

            handles.append(adapter.projection(layer, "out").register_forward_pre_hook(slopes))
        replay(fit, cap.batches, state, handles, grad=True)
    out = {}
    for p in projections:
        out[p] = []
        for pos, i in enumerate(fit.layers):
            w_out = linear(fit.aligned[pos]["fc_out.weight"], adapter).double()
            norms = (w_out**2).sum(0)
            weight = sums[p][i] / count[i] * norms.repeat(len(sums[p][i]) // len(norms))
            out[p].append(weight.clamp_min(1e-6 * float(weight.max())).sqrt())
    return out


def _hidden_stats(fit: WindowFit, cap: Capture, shared: dict, deltas: dict) -> dict[int, _Stats]:
    """Per layer: the hidden activations its corrected input projections give on its own inputs, and what
    the shared output projection leaves of its original FF output."""
    model, adapter, stack, bias = fit.model, fit.adapter, fit.stack, fit.adapter.bias
    w_out = linear(shared["fc_out.weight"], adapter).double()
    b_out = shared.get("fc_out.bias")
    stats = {i: _Stats(bias) for i in fit.layers}
    state = {"batch": 0}
    handles = []
    with ExitStack() as stack_:
        for i in fit.layers:
            values = _corrected(fit, shared, deltas, i, ("in", "gate"))  # the corrected input weights
            in_projections = tuple(p for p in ("in", "gate") if adapter.projections.get(p))
            stack_.enter_context(swapped(model, adapter, stack, [i], values, in_projections))
            layer = adapter.layers(model, stack)[i]

            def pre(_m, args, i=i):
                return (cap.x[i][state["batch"]],) + tuple(args[1:])

            def post(_m, args, _out, i=i):
                m = cap.masks[state["batch"]]
                h = rows(real_rows(args[0], m), False)
                merged = h @ w_out.T + (b_out.double() if b_out is not None else 0)
                stats[i].add(h, cap.y[i][state["batch"]].double() - merged)

            for p in in_projections:
                handles.append(adapter.projection(layer, p).register_forward_pre_hook(pre))
            handles.append(adapter.projection(layer, "out").register_forward_hook(post))
        replay(fit, cap.batches, state, handles)
    return stats


def delta(
    fit: WindowFit,
    rank: int = -1,
    budget: float = 0.25,
    base: str = "regmean",
    init: str = "fit",
    projections: str = "all",
    rounds: int = 0,
    ridge: float = RIDGE,
    shared_rounds: int = 10,
    ranks: str = "pooled",
    weighting: str = "output",
) -> Combined:
    if base not in BASES:
        raise InputError(f"delta base must be one of {', '.join(BASES)}; got {base!r}.")
    if init not in INITS:
        raise InputError(f"delta init must be one of {', '.join(INITS)}; got {init!r}.")
    if projections not in PROJECTION_SETS:
        raise InputError(f"delta projections must be one of {', '.join(PROJECTION_SETS)}; got {projections!r}.")
    if ranks not in RANKS:
        raise InputError(f"delta ranks must be one of {', '.join(RANKS)}; got {ranks!r}.")
    if weighting not in WEIGHTINGS:
        raise InputError(f"delta weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}.")
    if int(shared_rounds) < 0:
        raise InputError(f"delta shared_rounds must be 0 or more; got {shared_rounds}.")
    shared = BASES[base](fit)
    present = tuple(p for p in PROJECTION_SETS[projections] if fit.adapter.projections.get(p))
    r = int(rank) if int(rank) >= 0 else rank_for_budget(fit, present, float(budget))
    if r == 0:
        return Combined(shared)
    deltas = (
        _svd(fit, shared, present, r)
        if init == "svd"
        else _fit(fit, shared, present, r, ridge, rounds, shared_rounds, ranks == "pooled", weighting == "output")
    )
    return Combined(shared, deltas)


DELTA = MergeMethod(
    "delta",
    "a shared FF plus a low-rank correction of each projection per layer (--delta-rank / --delta-budget)",
    delta,
    params={
        "rank": -1,
        "budget": 0.25,
        "base": "regmean",
        "init": "fit",
        "projections": "all",
        "rounds": 0,
        "ridge": RIDGE,
        "shared_rounds": 10,
        "ranks": "pooled",
        "weighting": "output",
    },
)
