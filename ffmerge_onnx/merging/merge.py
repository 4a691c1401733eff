"""Merge and tie windows of adjacent FF sublayers (paper §3.2-3.3), and the layer-drop baseline.

Both return a `MergeResult`: the changed model, its manifest and the permutations. That object is
what later steps (recovery, saving, ONNX export, validation) take."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..errors import CalibrationError, InputError, WindowError
from ..families import Adapter, adapter_for
from ..progress import track
from . import calibration as calibrate
from .align import ALIGNERS, ANCHORS, Match, anchor_layer, identity, match
from .data import Calibration
from .lowrank import DELTA_NAMES, LowRankDelta, delta_parameters, wrap
from .manifest import Manifest, WindowRecord, fingerprint, perm_key
from .methods import Delta, WindowFit, combine, method_params
from .windows import Window, check_windows


@dataclass
class MergeResult:
    """A merged (or layer-dropped) model with the record of what was done to it."""

    model: nn.Module
    manifest: Manifest
    permutations: dict[str, torch.Tensor] = field(default_factory=dict)  # "<stack>.<layer>" -> perm
    plan: dict | None = None  # how automatic windows / method were chosen (quality/plan.py), if they were

    @classmethod
    def unchanged(cls, model: nn.Module, source: str = "") -> MergeResult:
        """An unmerged model as a result (method "none"): baselines go through the same steps."""
        return cls(model, _manifest(model, adapter_for(model), source, method="none"))

    @property
    def adapter(self) -> Adapter:
        return adapter_for(self.model)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The Parameter objects every merged window's layers share (once each)."""
        out = {}
        for layer in self.first_merged_layers():
            for p in self.adapter.ff_params(layer).values():
                out[id(p)] = p
        return list(out.values())

    def first_merged_layers(self) -> list[nn.Module]:
        """The first layer of each merged window."""
        adapter = self.adapter
        return [adapter.layers(self.model, w.stack)[w.start] for w in self.manifest.windows]

    def delta_parameters(self) -> list[nn.Parameter]:
        """Each merged layer's own low-rank corrections (method `delta`)."""
        return delta_parameters(self.model)

    def merged_away_bytes(self, stacks: list[str] | None = None) -> int:
        """Bytes the merge removes: the k-1 FF copies each window no longer stores, less its layers' corrections."""
        adapter = self.adapter
        total = 0
        for w in self.manifest.windows:
            if stacks is None or w.stack in stacks:
                layers = adapter.layers(self.model, w.stack)
                params = adapter.ff_params(layers[w.start])
                total += (w.end - w.start) * sum(p.numel() * p.element_size() for p in params.values())
                for i in w.layers:
                    for m in layers[i].modules():
                        if isinstance(m, LowRankDelta):
                            total -= sum(getattr(m, n).numel() * getattr(m, n).element_size()
                                         for n in DELTA_NAMES if getattr(m, n) is not None)  # fmt: skip
        return total

    def refresh_fingerprint(self) -> None:
        """After the weights changed (recovery), tie the manifest to them again."""
        self.manifest.fingerprint = fingerprint(self.model)


# -- permutations and ties ---------------------------------------------------------------
@torch.no_grad()
def permute_ff(adapter: Adapter, layer: nn.Module, perm: torch.Tensor | np.ndarray) -> None:
    """Reorder one layer's FF hidden units in place: unit p becomes old unit perm[p]. Exact."""
    for name, param in adapter.ff_params(layer).items():
        role = adapter.role(name)
        if role.hidden_axis is not None:
            param.copy_(param.index_select(role.hidden_axis, role.index(perm)))


class AlignedLayers(Sequence):
    """A window's FF tensors in the anchor's neuron order, one layer's copy made each time it is read (a
    method that streams over the layers holds one layer at a time)."""

    def __init__(self, adapter: Adapter, layers: list[nn.Module], perms: list[np.ndarray]):
        self.adapter, self.perms = adapter, perms
        self.params = [adapter.ff_params(layer) for layer in layers]  # the tensors now, whatever is swapped in later

    def __len__(self) -> int:
        return len(self.params)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        out = {}
        params = self.params[i]
        for role in self.adapter.roles():
            t = params[role.name].detach()
            out[role.name] = (
                t.index_select(role.hidden_axis, role.index(self.perms[i]))
                if role.hidden_axis is not None
                else t.clone()
            )
        return out


@torch.no_grad()
def add_deltas(
    adapter: Adapter, layers: nn.ModuleList, deltas: dict[int, dict[str, Delta]]
) -> dict[str, int | list[int]]:
    """Give each layer its own low-rank corrections beside the tied projections; returns projection -> rank
    (one rank, or one per layer in window order where they differ)."""
    ranks: dict[str, list[int]] = {}
    for i in sorted(deltas):
        for projection, d in deltas[i].items():
            module = wrap(adapter, layers[i], projection, d.up.shape[1])
            module.delta_up.copy_(d.up)
            module.delta_down.copy_(d.down)
            if module.delta_bias is not None and d.bias is not None:
                module.delta_bias.copy_(d.bias)
            ranks.setdefault(projection, []).append(d.up.shape[1])
    return {p: r[0] if len(set(r)) == 1 else r for p, r in ranks.items()}


def restore_deltas(model: nn.Module, adapter: Adapter, windows) -> None:
    """Rebuild the correction modules a manifest records (zeros; the checkpoint fills them)."""
    for w in windows:
        layers = adapter.layers(model, w.stack)
        for pos, i in enumerate(w.layers):
            for projection, rank in w.deltas.items():
                wrap(adapter, layers[i], projection, rank[pos] if isinstance(rank, list) else rank)


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
        raise CalibrationError(
            "Correlation alignment needs calibration data: pass --calibration PATH (or --align none)."
        )
    pairs = []
    for w in windows:
        a = anchor_layer(w.layers, anchor)
        pairs += [(f"{w.stack}.{a}.pre", f"{w.stack}.{i}.pre") for i in w.layers if i != a]
    moments = calibrate.collect(model, adapter, calibration, pairs, max_bytes=max_stat_bytes, progress=progress)
    if distributed.world().active:  # the statistics are summed on every rank: solve once, share the answer
        found = _matches(model, adapter, windows, anchor, moments, progress) if distributed.world().main else None
        return distributed.broadcast_object(found)
    return _matches(model, adapter, windows, anchor, moments, progress)


def _matches(model, adapter, windows, anchor, moments, progress) -> dict:
    matches: dict[Window, dict[int, Match]] = {}
    jobs = [(w, i) for w in windows for i in w.layers]
    for w, i in track(jobs, "aligning", enabled=progress):
        a = anchor_layer(w.layers, anchor)
        if i == a:
            d = adapter.ff_dim(adapter.layers(model, w.stack)[a])
            matches.setdefault(w, {})[i] = Match(np.arange(d, dtype=np.int64), 1.0)
            continue
        ka, ki = f"{w.stack}.{a}.pre", f"{w.stack}.{i}.pre"
        corr = calibrate.find(moments, ka, ki).correlation(ka, ki, release=True)  # each pair is read once
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
    params: dict | None = None,
    alignments: dict | None = None,
) -> MergeResult:
    """Align, combine (`method` with its `params`, see merging/methods) and tie each window's FF
    sublayers, in place; a method's per-layer corrections go beside the shared tensors (lowrank.py).
    `alignments`: a cache of window alignments the caller computed on this same model state (trials of
    one model share it); windows missing from it are aligned and added."""
    previous = model if isinstance(model, MergeResult) else None
    model = previous.model if previous else model
    _check_arguments(model, windows, calibration)
    if anchor not in ANCHORS:
        raise InputError(f"--anchor must be one of {', '.join(ANCHORS)}; got {anchor!r}.")
    if align not in ALIGNERS:
        raise InputError(f"--align must be one of {', '.join(ALIGNERS)}; got {align!r}.")
    params = method_params(method, params)
    adapter = adapter_for(model)
    earlier = _earlier_windows(model, adapter, previous)
    check_windows(model, adapter, [*earlier, *windows])
    _check_finite(model, adapter, windows)
    cache = alignments if alignments is not None else {}
    todo = [w for w in windows if (w, anchor, align) not in cache]
    if todo:
        found = _alignments(model, adapter, todo, anchor, align, calibration, progress, max_stat_bytes)
        cache.update({(w, anchor, align): m for w, m in found.items()})
    matches = {w: cache[(w, anchor, align)] for w in windows}
    records, permutations = [], {}
    for w in windows:
        layers = adapter.layers(model, w.stack)
        fit = WindowFit(
            model=model,
            adapter=adapter,
            stack=w.stack,
            layers=w.layers,
            aligned=AlignedLayers(adapter, [layers[i] for i in w.layers], [matches[w][i].perm for i in w.layers]),
            perms=[torch.as_tensor(matches[w][i].perm, dtype=torch.long) for i in w.layers],
            calibration=calibration,
        )
        combined = combine(fit, method, params)
        first = adapter.ff_params(layers[w.start])
        shared = {
            r.name: nn.Parameter(combined.shared[r.name], requires_grad=first[r.name].requires_grad)
            for r in adapter.roles()
        }
        tie(adapter, [layers[i] for i in w.layers], shared)
        ranks = add_deltas(adapter, layers, combined.deltas)
        for i in w.layers:
            permutations[perm_key(w.stack, i)] = torch.as_tensor(matches[w][i].perm)
        records.append(
            WindowRecord(
                stack=w.stack,
                start=w.start,
                end=w.end,
                anchor_layer=anchor_layer(w.layers, anchor) if align != "none" else w.start,
                align=align,
                method=method,
                params=params,
                deltas=ranks,
                scores={str(i): matches[w][i].score for i in w.layers},
                shared={role.name: f"{w.prefix()}.{role.name}" for role in adapter.roles()},
            )
        )
    if previous is not None:
        records = sorted([*previous.manifest.windows, *records], key=lambda r: (r.stack, r.start))
        permutations = {**previous.permutations, **permutations}
        source = source or previous.manifest.source
    manifest = _manifest(
        model,
        adapter,
        source,
        method="merge",
        windows=records,
        calibration=dict(calibration.description) if calibration is not None else {},
    )
    return MergeResult(model, manifest, permutations)


def _check_arguments(model, windows, calibration) -> None:
    """The Python API's argument types, checked before any work."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise InputError(
            f"merge() takes a transformers model (or the MergeResult of an earlier merge), not {type(model).__name__}."
        )
    if isinstance(windows, Window) or not isinstance(windows, (list, tuple)):
        raise InputError(f"windows must be a list of Window objects, not {type(windows).__name__}.")
    bad = [w for w in windows if not isinstance(w, Window)]
    if bad:
        raise InputError(f"windows must be Window objects, e.g. Window('decoder', 2, 4); got {bad[0]!r}.")
    if calibration is not None and not isinstance(calibration, Calibration):
        raise InputError(
            f"calibration must be a Calibration (merging.data.calibration_from...), not {type(calibration).__name__}."
        )


def _earlier_windows(model: nn.Module, adapter: Adapter, previous: MergeResult | None) -> list[Window]:
    """Windows merged before: from the earlier result, or refused when the module has ties no result records."""
    if previous is not None:
        if previous.manifest.method not in ("merge", "none"):
            raise InputError(f"Cannot merge a model whose layers were changed by {previous.manifest.method!r}.")
        return [Window(w.stack, w.start, w.end) for w in previous.manifest.windows]
    for stack in adapter.stacks:
        owner: dict[int, int] = {}
        for i, layer in enumerate(adapter.layers(model, stack)):
            for p in adapter.ff_params(layer).values():
                if owner.setdefault(id(p), i) != i:
                    raise InputError(
                        f"The {stack}'s layers {owner[id(p)]} and {i} already share FF weights: this model was "
                        "merged before. Pass the MergeResult of that merge (or of load_merged) to merge() so the "
                        "earlier windows stay recorded, or merge every window in one call."
                    )
    return []


def _check_finite(model: nn.Module, adapter: Adapter, windows: list[Window]) -> None:
    for w in windows:
        layers = adapter.layers(model, w.stack)
        for i in w.layers:
            for role, p in adapter.ff_params(layers[i]).items():
                if not torch.isfinite(p).all():
                    raise InputError(
                        f"The {w.stack}'s layer {i} has NaN or infinite values in its FF {role}: the weights are "
                        "damaged. Re-download or re-train the model."
                    )


def _manifest(model: nn.Module, adapter: Adapter, source: str, **fields) -> Manifest:
    """The record of how the model was changed."""
    return Manifest(
        source=source or getattr(model.config, "_name_or_path", ""),
        adapter=adapter.name,
        model_type=model.config.model_type,
        stacks={s: adapter.num_layers(model, s) for s in adapter.stacks},
        fingerprint=fingerprint(model),
        **fields,
    )


# -- layer dropping baseline ---------------------------------------------------------------
def drop_layers(model: nn.Module, stack: str, layers: list[int], source: str = "") -> MergeResult:
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
    manifest = _manifest(model, adapter, source, method="drop", dropped={stack: sorted(set(layers))})
    return MergeResult(model, manifest, {})


def ff_param_count(model: nn.Module, stack: str, layer: int = 0) -> int:
    adapter = adapter_for(model)
    return sum(p.numel() for p in adapter.ff_params(adapter.layers(model, stack)[layer]).values())
