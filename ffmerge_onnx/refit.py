"""Merge methods beyond the paper's average, fitted on calibration activations.

- `regmean`: per projection, W = (sum_l W_l G_l)(sum_l G_l + ridge)^-1 with G_l the Gram matrix of
  that projection's inputs in layer l (bias folded in as a constant input).
- `refit`: input projections averaged, then the output projection fitted by least squares so the
  merged FF reproduces every layer's ORIGINAL FF output from that layer's original input:
  W_out^T = (sum_l H_l^T H_l + ridge)^-1 sum_l H_l^T Y_l, H_l the hidden activations the merged
  input projections give on layer l's inputs.
- `sequential`: `refit`, then refitted again (SEQUENTIAL_ROUNDS times) with each layer's input taken
  from the model whose window already uses the merged FF, so the fit sees the drift earlier merged
  layers cause and does not compound it. One forward pass gives every layer's drifted input: layer
  l's input depends only on the layers before it. Targets stay the original FF outputs. (Also
  tried: targets that cancel the drift in pre-norm models, O_l - (O'_l - F'_l). On SmolLM2 at
  k=11 the fit diverged, perplexity 1e8, against 145 with these targets.)

Everything is in the window's anchor neuron order (each layer's tensors already permuted).
Memory: the window's FF inputs and outputs on the calibration tokens are kept in float32
(2 x tokens x d_model x 4 bytes per layer: 46 MB per layer for SmolLM2 at 10k tokens), and
float64 Gram matrices of (d_ff + 1)^2 and (d_model + 1)^2 entries."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .adapters import Adapter
from .calibrate import run_batch, tokens_per_item
from .data import Calibration, token_mask
from .errors import CalibrationError

METHODS = ("average", "regmean", "refit", "sequential")
SEQUENTIAL_ROUNDS = 2
RIDGE = 1e-6  # relative to the Gram matrix's mean diagonal


def _linear(t: torch.Tensor, adapter: Adapter) -> torch.Tensor:
    """[out, in] layout from GPT-2's Conv1D [in, out], and back (a transpose is its own inverse)."""
    return t if adapter.layout == "linear" or t.dim() == 1 else t.T


def _augment(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return w if b is None else torch.cat([w, b[:, None]], dim=1)


def _rows(x: torch.Tensor, bias: bool) -> torch.Tensor:
    x = x.double()
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1) if bias else x


def _solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """(gram + ridge * mean diag * I)^-1 rhs, in float64."""
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    return torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), rhs)


class _Capture:
    """Per layer: its FF inputs (full batches), real-token masks, original FF outputs and hidden Gram."""

    def __init__(self, model, adapter: Adapter, stack: str, layers: list[int], calibration: Calibration, bias: bool):
        self.x: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
        self.y: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
        self.h_gram: dict[int, torch.Tensor] = {}
        self.masks: list[torch.Tensor] = []
        self.batches = calibration.batches
        mask_now = {}
        handles = []
        for i in layers:
            layer = adapter.layers(model, stack)[i]

            def pre(_m, args, i=i):
                self.x[i].append(args[0].detach().clone())

            def post(_m, args, out, i=i):
                m = mask_now["m"]
                h = _rows(args[0].reshape(m.shape[0], -1, args[0].shape[-1])[m], bias)
                self.h_gram[i] = self.h_gram.get(i, 0) + h.T @ h
                self.y[i].append(out.reshape(m.shape[0], -1, out.shape[-1])[m].detach().clone())

            handles.append(adapter.projection(layer, "in").register_forward_pre_hook(pre))
            handles.append(adapter.projection(layer, "out").register_forward_hook(post))
        try:
            with torch.no_grad():
                for batch in calibration.batches:
                    mask_now["m"] = token_mask(batch, stack, tokens_per_item(model, batch, stack))
                    self.masks.append(mask_now["m"])
                    run_batch(model, batch)
        finally:
            for h in handles:
                h.remove()
        if not self.masks:
            raise CalibrationError("The merge method needs calibration data; none was given.")


def combine(model: nn.Module, adapter: Adapter, stack: str, layers: list[int], aligned: list[dict[str, torch.Tensor]],
            perms: list[torch.Tensor], calibration: Calibration | None, method: str,
            ridge: float = RIDGE) -> dict[str, torch.Tensor]:
    """One FF for the window from its layers' aligned tensors (role name -> tensor, native layout)."""
    average = {name: torch.stack([t[name] for t in aligned]).mean(0) for name in aligned[0]}
    if method == "average":
        return average
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if calibration is None:
        raise CalibrationError(f"Merge method {method} needs calibration data: pass --calibration PATH.")
    bias = adapter.bias
    cap = _Capture(model, adapter, stack, layers, calibration, bias)
    out = dict(average)
    in_names = [("fc_in", "in")] + ([("gate", "gate")] if adapter.gated else [])
    if method == "regmean":
        x_gram = {}
        for i in layers:
            rows = torch.cat([_rows(x.reshape(m.shape[0], -1, x.shape[-1])[m], bias)
                              for x, m in zip(cap.x[i], cap.masks)])
            x_gram[i] = rows.T @ rows
        for name, _ in in_names:
            ws = [_augment(_linear(t[f"{name}.weight"], adapter).double(), t.get(f"{name}.bias", None)) for t in aligned]
            num = sum(w @ x_gram[i] for w, i in zip(ws, layers))
            fitted = _solve(sum(x_gram.values()), num.T, ridge).T
            _store(out, name, fitted, bias, adapter)
        grams = []
        for i, p in zip(layers, perms):
            idx = torch.cat([p, torch.tensor([len(p)])]) if bias else p
            grams.append(cap.h_gram[i][idx][:, idx])  # into anchor order
        ws = [_augment(_linear(t["fc_out.weight"], adapter).double(), t.get("fc_out.bias", None)) for t in aligned]
        num = sum(w @ g for w, g in zip(ws, grams))
        _store(out, "fc_out", _solve(sum(grams), num.T, ridge).T, bias, adapter)
    if method in ("refit", "sequential"):
        _store(out, "fc_out", _refit_out(model, adapter, stack, layers, cap, average, bias, ridge), bias, adapter)
    if method == "sequential":
        for _ in range(SEQUENTIAL_ROUNDS):
            cap.x = _drifted_inputs(model, adapter, stack, layers, cap, out)
            _store(out, "fc_out", _refit_out(model, adapter, stack, layers, cap, average, bias, ridge), bias, adapter)
    return {k: v.to(average[k].dtype) for k, v in out.items()}


def _store(out: dict, name: str, fitted: torch.Tensor, bias: bool, adapter: Adapter) -> None:
    w = fitted[:, :-1] if bias else fitted
    out[f"{name}.weight"] = _linear(w, adapter).contiguous()
    if bias:
        out[f"{name}.bias"] = fitted[:, -1].contiguous()


@contextmanager
def _swapped(model, adapter: Adapter, stack: str, layers: list[int], values: dict, projections: tuple[str, ...]):
    """Window layers temporarily use `values` (role name -> tensor) for the roles of `projections`."""
    saved = []
    try:
        for i in layers:
            layer = adapter.layers(model, stack)[i]
            for r in adapter.roles():
                if r.projection in projections:
                    module = adapter.projection(layer, r.projection)
                    old = getattr(module, r.attr)
                    saved.append((module, r.attr, old))
                    setattr(module, r.attr, nn.Parameter(values[r.name].to(old.dtype).clone(), requires_grad=False))
        yield
    finally:
        for module, attr, p in saved:
            setattr(module, attr, p)


def _drifted_inputs(model, adapter, stack, layers, cap: _Capture, merged: dict) -> dict[int, list[torch.Tensor]]:
    """Each window layer's FF inputs (full batches) when the whole window uses the merged FF."""
    x: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    handles = []
    for i in layers:
        def pre(_m, args, i=i):
            x[i].append(args[0].detach().clone())

        handles.append(adapter.projection(adapter.layers(model, stack)[i], "in").register_forward_pre_hook(pre))
    try:
        with _swapped(model, adapter, stack, layers, merged, ("in", "gate", "out")), torch.no_grad():
            for batch in cap.batches:
                run_batch(model, batch)
    finally:
        for h in handles:
            h.remove()
    return x


def _refit_out(model, adapter, stack, layers, cap: _Capture, merged_in: dict, bias: bool, ridge: float) -> torch.Tensor:
    """Second pass: each layer's captured inputs through the merged input projections -> hidden rows."""
    in_projections = tuple({r.projection for r in adapter.roles() if r.projection in ("in", "gate")})
    handles = []
    gram, cross = 0, 0
    state = {"batch": 0}
    try:
        for i in layers:
            layer = adapter.layers(model, stack)[i]

            def pre(_m, args, i=i):
                return (cap.x[i][state["batch"]],) + tuple(args[1:])

            def post(_m, args, _out, i=i):
                nonlocal gram, cross
                m = cap.masks[state["batch"]]
                h = _rows(args[0].reshape(m.shape[0], -1, args[0].shape[-1])[m], bias)
                gram = gram + h.T @ h
                cross = cross + h.T @ cap.y[i][state["batch"]].double()

            for p in in_projections:
                handles.append(adapter.projection(layer, p).register_forward_pre_hook(pre))
            handles.append(adapter.projection(layer, "out").register_forward_hook(post))
        with _swapped(model, adapter, stack, layers, merged_in, in_projections), torch.no_grad():
            for b, batch in enumerate(cap.batches):
                state["batch"] = b
                run_batch(model, batch)
    finally:
        for h in handles:
            h.remove()
    return _solve(gram, cross, ridge).T  # [d_model, d_ff (+1)]
