"""Merge and tie windows of adjacent FF sublayers (paper §3.2-3.3), and the layer-drop baseline."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import calibrate
from .adapters import Adapter, adapter_for
from .align import ALIGNERS, ANCHORS, Match, anchor_layer, identity, match
from .data import Calibration
from .errors import CalibrationError, InputError, WindowError
from .manifest import Manifest, WindowRecord, fingerprint, perm_key
from .progress import track
from .refit import METHODS, combine


@dataclass(frozen=True)
class Window:
    """Layers start..end (inclusive) of one stack, merged into one FF sublayer."""

    stack: str
    start: int
    end: int

    @property
    def layers(self) -> list[int]:
        return list(range(self.start, self.end + 1))

    @property
    def size(self) -> int:
        return self.end - self.start + 1

    def prefix(self) -> str:
        return f"ffmerge.{self.stack}.w{self.start}_{self.end}"


def parse_windows(spec: str, stack: str) -> list[Window]:
    """'3-5' or '0-2,6-8' -> windows of one stack."""
    windows = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", part)
        if not m:
            raise WindowError(f"Bad layer range {part!r}: write A-B, e.g. --layers 3-5 (inclusive).")
        windows.append(Window(stack, int(m.group(1)), int(m.group(2))))
    return windows


def check_windows(model: nn.Module, adapter: Adapter, windows: list[Window]) -> None:
    if not windows:
        raise WindowError("No window given: pass --layers A-B.")
    for w in windows:
        if w.stack not in adapter.stacks:
            raise WindowError(f"{adapter.name} models have stacks {adapter.stack_names()}; got {w.stack!r}.")
        n = adapter.num_layers(model, w.stack)
        if w.size < 2:
            if w.end < w.start:
                raise WindowError(f"Window {w.start}-{w.end} is reversed; write it as {w.end}-{w.start}.")
            raise WindowError(f"Window {w.start}-{w.end} has {max(w.size, 0)} layer(s); a merge needs at least 2.")
        if w.start < 0 or w.end >= n:
            raise WindowError(f"Window {w.start}-{w.end} is out of range: the {w.stack} has layers 0-{n - 1}.")
    by_stack: dict[str, list[Window]] = {}
    for w in windows:
        by_stack.setdefault(w.stack, []).append(w)
    for ws in by_stack.values():
        ws = sorted(ws, key=lambda w: w.start)
        for a, b in zip(ws, ws[1:]):
            if b.start <= a.end:
                raise WindowError(f"Windows {a.start}-{a.end} and {b.start}-{b.end} overlap; windows must be disjoint.")


# -- permutations and ties ---------------------------------------------------------------
@torch.no_grad()
def permute_ff(adapter: Adapter, layer: nn.Module, perm: torch.Tensor | np.ndarray) -> None:
    """Reorder one layer's FF hidden units in place: unit p becomes old unit perm[p]. Exact."""
    perm = torch.as_tensor(perm, dtype=torch.long)
    for role, param in adapter.ff_params(layer).items():
        axis = next(r.hidden_axis for r in adapter.roles() if r.name == role)
        if axis is not None:
            param.copy_(param.index_select(axis, perm))


def _aligned_tensors(adapter: Adapter, layer: nn.Module, perm: np.ndarray) -> dict[str, torch.Tensor]:
    idx = torch.as_tensor(perm, dtype=torch.long)
    out = {}
    for role in adapter.roles():
        t = adapter.ff_params(layer)[role.name].detach()
        out[role.name] = t.index_select(role.hidden_axis, idx) if role.hidden_axis is not None else t.clone()
    return out


def tie(adapter: Adapter, layers: list[nn.Module], shared: dict[str, nn.Parameter]) -> None:
    """Point every layer's FF projections at the same Parameter objects."""
    for layer in layers:
        for role in adapter.roles():
            module = adapter.projection(layer, role.projection)
            setattr(module, role.attr, shared[role.name])


# -- the merge ---------------------------------------------------------------------------
def _alignments(model, adapter, windows, anchor, align, calibration, progress, max_stat_bytes):
    """Per window: {layer: Match} against the window's anchor."""
    matches: dict[Window, dict[int, Match]] = {}
    if align == "none":
        for w in windows:
            d = adapter.ff_dim(adapter.layers(model, w.stack)[w.start])
            matches[w] = {i: identity(d) for i in w.layers}
        return matches
    if calibration is None:
        raise CalibrationError("Correlation alignment needs calibration data: pass --calibration PATH (or --align none).")
    pairs = []
    for w in windows:
        a = anchor_layer(w.layers, anchor)
        pairs += [(f"{w.stack}.{a}.pre", f"{w.stack}.{i}.pre") for i in w.layers if i != a]
    moments = calibrate.collect(model, adapter, calibration, pairs, max_bytes=max_stat_bytes, progress=progress)
    jobs = [(w, i) for w in windows for i in w.layers]
    for w, i in track(jobs, "aligning", enabled=progress):
        a = anchor_layer(w.layers, anchor)
        if i == a:
            d = adapter.ff_dim(adapter.layers(model, w.stack)[a])
            matches.setdefault(w, {})[i] = Match(np.arange(d, dtype=np.int64), 1.0)
            continue
        ka, ki = f"{w.stack}.{a}.pre", f"{w.stack}.{i}.pre"
        corr = calibrate.find(moments, ka, ki).correlation(ka, ki)
        matches.setdefault(w, {})[i] = match(corr)
    return matches


@torch.no_grad()
def merge(
    model: nn.Module,
    windows: list[Window],
    *,
    anchor: str = "first",
    align: str = "correlation",
    calibration: Calibration | None = None,
    source: str = "",
    progress: bool = True,
    max_stat_bytes: int = calibrate.DEFAULT_MAX_STAT_BYTES,
    method: str = "average",
) -> nn.Module:
    """Align, combine (`method`: average, regmean or refit; see refit.py) and tie each window's
    FF sublayers, in place. Returns the model, with its manifest at `model.ffmerge_manifest` and
    permutations at `model.ffmerge_permutations`."""
    if anchor not in ANCHORS:
        raise InputError(f"--anchor must be one of {', '.join(ANCHORS)}; got {anchor!r}.")
    if align not in ALIGNERS:
        raise InputError(f"--align must be one of {', '.join(ALIGNERS)}; got {align!r}.")
    if method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}; got {method!r}.")
    adapter = adapter_for(model)
    check_windows(model, adapter, windows)
    matches = _alignments(model, adapter, windows, anchor, align, calibration, progress, max_stat_bytes)
    records, permutations = [], {}
    for w in windows:
        layers = adapter.layers(model, w.stack)
        aligned = [_aligned_tensors(adapter, layers[i], matches[w][i].perm) for i in w.layers]
        perms = [torch.as_tensor(matches[w][i].perm, dtype=torch.long) for i in w.layers]
        values = combine(model, adapter, w.stack, w.layers, aligned, perms, calibration, method)
        shared = {
            role.name: nn.Parameter(values[role.name],
                                    requires_grad=adapter.ff_params(layers[w.start])[role.name].requires_grad)
            for role in adapter.roles()
        }
        tie(adapter, [layers[i] for i in w.layers], shared)
        for i in w.layers:
            permutations[perm_key(w.stack, i)] = torch.as_tensor(matches[w][i].perm)
        records.append(WindowRecord(
            stack=w.stack, start=w.start, end=w.end,
            anchor_layer=anchor_layer(w.layers, anchor) if align != "none" else w.start,
            align=align,
            method=method,
            scores={str(i): matches[w][i].score for i in w.layers},
            shared={role.name: f"{w.prefix()}.{role.name}" for role in adapter.roles()},
        ))
    _attach(model, adapter, source, permutations, method="merge", windows=records,
            calibration=dict(calibration.description) if calibration is not None else {})
    return model


def _attach(model: nn.Module, adapter: Adapter, source: str, permutations: dict, **fields) -> None:
    """Record how the model was changed: manifest and permutations travel with it."""
    model.ffmerge_manifest = Manifest(
        source=source or getattr(model.config, "_name_or_path", ""),
        adapter=adapter.name,
        model_type=model.config.model_type,
        stacks={s: adapter.num_layers(model, s) for s in adapter.stacks},
        fingerprint=fingerprint(model),
        **fields,
    )
    model.ffmerge_permutations = permutations


# -- layer dropping baseline ---------------------------------------------------------------
def drop_layers(model: nn.Module, stack: str, layers: list[int], source: str = "") -> nn.Module:
    """Remove whole layers (attention + FF) from one stack, in place; the config follows."""
    adapter = adapter_for(model)
    stack_list = adapter.layers(model, stack)
    n = len(stack_list)
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers:
        raise WindowError(f"Cannot drop layers {layers}: the {stack} has layers 0-{n - 1}.")
    if len(set(layers)) >= n:
        raise WindowError("Dropping every layer leaves no model; drop fewer layers.")
    keep = [m for i, m in enumerate(stack_list) if i not in set(layers)]
    new_list = nn.ModuleList(keep)
    parent_path, _, attr = adapter.stack_path(model, stack).rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new_list)
    for new_idx, layer in enumerate(new_list):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    setattr(model.config, adapter.layer_count_key(stack), len(new_list))
    layer_types = getattr(model.config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == n:
        model.config.layer_types = [t for i, t in enumerate(layer_types) if i not in set(layers)]
    _attach(model, adapter, source, {}, method="drop", dropped={stack: sorted(set(layers))})
    return model


def ff_param_count(model: nn.Module, stack: str, layer: int = 0) -> int:
    adapter = adapter_for(model)
    return sum(p.numel() for p in adapter.ff_params(adapter.layers(model, stack)[layer]).values())
