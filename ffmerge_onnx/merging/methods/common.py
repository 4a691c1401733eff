"""What every merge method sees (`WindowFit`), and the activation captures and solvers the fitted
methods share.

Everything is in the window's anchor neuron order (each layer's tensors already permuted).
Memory of a fitted method: the window's FF inputs and outputs on the calibration tokens in float32
(2 x tokens x d_model x 4 bytes per layer: 46 MB per layer for SmolLM2 at 10k tokens), and float64
Gram matrices of (d_ff + 1)^2 and (d_model + 1)^2 entries."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import CalibrationError
from ...families import Adapter
from ..calibration import run_batch, tokens_per_item
from ..data import Calibration, real_rows, token_mask

RIDGE = 1e-6  # relative to the Gram matrix's mean diagonal


@dataclass
class WindowFit:
    """One window's inputs to a merge method."""

    model: nn.Module
    adapter: Adapter
    stack: str
    layers: list[int]
    aligned: Sequence[dict[str, torch.Tensor]]  # per layer: role name -> tensor, anchor order, PyTorch layout
    perms: list[torch.Tensor]  # per layer: its permutation into the anchor's order
    calibration: Calibration | None

    def average(self) -> dict[str, torch.Tensor]:
        """The aligned tensors' mean, summed one layer at a time in float64 (one layer's copy held at once)."""
        total: dict[str, torch.Tensor] = {}
        for tensors in self.aligned:
            for name, t in tensors.items():
                total[name] = total[name].add_(t) if name in total else t.double()
        dtypes = self.dtypes()
        return {name: (t / len(self.aligned)).to(dtypes[name]) for name, t in total.items()}

    def dtypes(self) -> dict[str, torch.dtype]:
        first = self.adapter.layers(self.model, self.stack)[self.layers[0]]
        return {name: p.dtype for name, p in self.adapter.ff_params(first).items()}

    def capture(self) -> Capture:
        if self.calibration is None:
            raise CalibrationError("This merge method fits on calibration data: pass --calibration PATH.")
        return Capture(self.model, self.adapter, self.stack, self.layers, self.calibration, self.adapter.bias)


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: one function from a window to its shared FF tensors (role name -> tensor).

    `params` declares the method's parameters and their defaults; they are passed to `combine` as
    keyword arguments and recorded in the manifest. `combine` returns the shared tensors, or a
    `delta.Combined` with per-layer corrections too."""

    name: str
    help: str
    combine: Callable[..., object]
    needs_calibration: bool = True
    params: Mapping[str, object] = field(default_factory=dict)


def window_modules(model, adapter: Adapter, stack: str, layers: list[int], projection: str) -> list[nn.Module]:
    """The `projection` module ("in", "gate", "out") of each of the stack's `layers`."""
    return [adapter.projection(adapter.layers(model, stack)[i], projection) for i in layers]


def replay(fit: WindowFit, batches, state: dict, handles: list, grad: bool = False) -> None:
    """Runs the calibration batches up to the window's last output projection, with state["batch"] set
    for the hooks in `handles`, which are removed afterwards whatever happens."""
    try:
        last = window_modules(fit.model, fit.adapter, fit.stack, fit.layers, "out")
        with torch.enable_grad() if grad else torch.no_grad():
            for b, batch in enumerate(batches):
                state["batch"] = b
                run_batch(fit.model, batch, stop_after=last)
    finally:
        for h in handles:
            h.remove()


def linear(t: torch.Tensor, adapter: Adapter) -> torch.Tensor:
    """[out, in] layout from GPT-2's Conv1D [in, out], and back (a transpose is its own inverse)."""
    return t if adapter.layout == "linear" or t.dim() == 1 else t.T


def augment(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return w if b is None else torch.cat([w, b[:, None]], dim=1)


def rows(x: torch.Tensor, bias: bool) -> torch.Tensor:
    x = x.double()
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1) if bias else x


def solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """(gram + ridge * mean diag * I)^-1 rhs, in float64."""
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    return torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), rhs)


def store(out: dict, name: str, fitted: torch.Tensor, bias: bool, adapter: Adapter) -> None:
    """Write an augmented [out, in (+1)] solution back as the projection's weight (and bias)."""
    w = fitted[:, :-1] if bias else fitted
    out[f"{name}.weight"] = linear(w, adapter).contiguous()
    if bias:
        out[f"{name}.bias"] = fitted[:, -1].contiguous()


class Capture:
    """Per layer: its FF inputs (full batches), real-token masks, original FF outputs and hidden Gram."""

    def __init__(self, model, adapter: Adapter, stack: str, layers: list[int], calibration: Calibration, bias: bool):
        self.x: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
        self.y: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
        self.h_gram: dict[int, torch.Tensor] = {}
        self.masks: list[torch.Tensor] = []
        self.batches = calibration.batches
        mask_now = {}
        handles = []
        last = window_modules(model, adapter, stack, layers, "out")
        for i in layers:
            layer = adapter.layers(model, stack)[i]

            def pre(_m, args, i=i):
                self.x[i].append(args[0].detach().clone())

            def post(_m, args, out, i=i):
                m = mask_now["m"]
                h = rows(real_rows(args[0], m), bias)
                self.h_gram[i] = self.h_gram.get(i, 0) + h.T @ h
                self.y[i].append(real_rows(out, m).detach().clone())

            handles.append(adapter.projection(layer, "in").register_forward_pre_hook(pre))
            handles.append(adapter.projection(layer, "out").register_forward_hook(post))
        try:
            with torch.no_grad():
                for batch in calibration.batches:
                    mask_now["m"] = token_mask(batch, stack, tokens_per_item(model, batch, stack), model.config)
                    self.masks.append(mask_now["m"])
                    run_batch(model, batch, stop_after=last)
        finally:
            for h in handles:
                h.remove()
        if not self.masks:
            raise CalibrationError("The merge method needs calibration data; none was given.")

    def input_rows(self, i: int, bias: bool) -> torch.Tensor:
        """Layer i's FF inputs on real tokens, float64, with a ones column when the FF has biases."""
        return torch.cat([rows(real_rows(x, m), bias) for x, m in zip(self.x[i], self.masks)])


@contextmanager
def swapped(model, adapter: Adapter, stack: str, layers: list[int], values: dict, projections: tuple[str, ...]):
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


def drifted_inputs(fit: WindowFit, batches: list[dict], values: dict[int, dict]) -> dict[int, list[torch.Tensor]]:
    """Each window layer's FF inputs (full batches) when layer i computes its FF with values[i] (role name ->
    tensor): the inputs a merged window really gives its layers, drift of the earlier ones included."""
    model, adapter, stack = fit.model, fit.adapter, fit.stack
    x: dict[int, list[torch.Tensor]] = {i: [] for i in fit.layers}
    handles = []
    last = window_modules(model, adapter, stack, fit.layers, "in")
    with ExitStack() as context:
        for i in fit.layers:
            context.enter_context(swapped(model, adapter, stack, [i], values[i], ("in", "gate", "out")))

            def pre(_m, args, i=i):
                x[i].append(args[0].detach().clone())

            handles.append(adapter.projection(adapter.layers(model, stack)[i], "in").register_forward_pre_hook(pre))
        try:
            with torch.no_grad():
                for batch in batches:
                    run_batch(model, batch, stop_after=last)
        finally:
            for h in handles:
                h.remove()
    return x
