"""Merged PyTorch model -> ONNX files whose merged FF tensors are stored once.

The order of the ONNX passes lives here, in `PASS_ORDER`."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401
import torch
from torch import nn

from .adapters import adapter_for, task_of
from .export import Part, export_part, parts_for
from .passes.permute import LayerOrder, PermuteGather
from .passes.share import ShareMerged, Target
from .passes.simplify import SharingSafeSimplify
from .passes.transposes import FoldWeightTransposes

MODES = ("fold", "gather")
EXTERNAL_DATA_THRESHOLD = 2 * 2**30
PASS_ORDER = ("FoldWeightTransposes", "ShareMerged", "PermuteGather", "SharingSafeSimplify")
SESSION_SETTINGS = "ort_session_settings.json"
INFO = "onnx_export.json"


@dataclass
class BuildOptions:
    mode: str = "fold"  # "fold" | "gather"
    simplifier: str = "onnxslim"
    external_data: bool = False  # force external data at any size
    share: bool = True  # False: the unmerged baseline
    kv_cache: bool = False  # decoders take and return past key/values


@dataclass
class BuildResult:
    files: list[str]
    passes: dict[str, dict[str, int]] = field(default_factory=dict)


def part_stacks(filename: str, stacks: list[str]) -> list[str]:
    """Which stacks an export file holds (seq2seq files hold one each)."""
    if filename.startswith("encoder_"):
        return ["encoder"]
    if filename.startswith("decoder_"):
        return ["decoder"]
    return stacks


def _suffix(model, adapter, stack: str, layer: int, proj: str) -> str:
    layers = adapter.layers(model, stack)
    tail = adapter.stack_path(model, stack).rsplit(".", 1)[-1]
    return f"{tail}.{layer}.{adapter.projection_path(layers[layer], proj)}"


def targets(model: nn.Module, stacks: list[str]) -> list[Target]:
    """One Target per merged tensor of every window in the given stacks."""
    adapter = adapter_for(model)
    manifest = model.ffmerge_manifest
    out = []
    for w in manifest.windows:
        if w.stack not in stacks:
            continue
        layer0 = adapter.layers(model, w.stack)[w.start]
        params = adapter.ff_params(layer0)
        for role in adapter.roles():
            out.append(Target(
                name=w.shared[role.name],
                value=params[role.name].detach().cpu().numpy(),
                hidden_axis=role.hidden_axis,
                module_suffixes=[_suffix(model, adapter, w.stack, i, role.projection) for i in w.layers],
            ))
    return out


def layer_orders(model: nn.Module, stacks: list[str]) -> list[LayerOrder]:
    """For mode gather: each permuted layer's own neuron order within the shared tensor."""
    adapter = adapter_for(model)
    out = []
    for w in model.ffmerge_manifest.windows:
        if w.stack not in stacks:
            continue
        for i in w.layers:
            perm = np.asarray(model.ffmerge_permutations[f"{w.stack}.{i}"])
            if np.array_equal(perm, np.arange(len(perm))):
                continue
            projections = [p for p in ("in", "gate", "out") if adapter.projections.get(p)]
            out.append(LayerOrder(
                name=f"ffmerge.{w.stack}.w{w.start}_{w.end}.order{i}",
                order=np.argsort(perm).astype(np.int64),
                module_suffixes=[_suffix(model, adapter, w.stack, i, p) for p in projections],
            ))
    return out


def untied_copy(model: nn.Module) -> nn.Module:
    """The merged model with every window tie broken into k equal copies (the paper's practice)."""
    clone = copy.deepcopy(model)
    adapter = adapter_for(clone)
    for w in clone.ffmerge_manifest.windows:
        for i in w.layers:
            layer = adapter.layers(clone, w.stack)[i]
            for role in adapter.roles():
                module = adapter.projection(layer, role.projection)
                setattr(module, role.attr, nn.Parameter(getattr(module, role.attr).detach().clone()))
    return clone


def run_passes(ir_model: ir.Model, model: nn.Module, part: Part, options: BuildOptions) -> tuple[ir.Model, dict]:
    stacks = part_stacks(part.filename, adapter_for(model).stack_names())
    passes = [FoldWeightTransposes()]
    if options.share:
        tgts = targets(model, stacks)
        passes.append(ShareMerged(tgts))
        if options.mode == "gather":
            passes.append(PermuteGather(tgts, layer_orders(model, stacks)))
    if options.simplifier != "none":
        passes.append(SharingSafeSimplify(options.simplifier))
    assert [type(p).__name__ for p in passes] == [n for n in PASS_ORDER if n in {type(p).__name__ for p in passes}]
    counts = {}
    for p in passes:
        ir_model = p(ir_model).model
        counts[type(p).__name__] = dict(p.counts)
    # scopes and stack traces were only needed by the passes; they would bloat the file
    ir.passes.common.ClearMetadataAndDocStringPass()(ir_model)
    return ir_model, counts


def save(ir_model: ir.Model, path: Path, external: bool) -> list[str]:
    size = sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)
    if external or size > EXTERNAL_DATA_THRESHOLD:
        data = path.name + ".data"
        # tensors under 1 KB (shape constants) stay inline: onnxruntime's shape inference reads them
        ir.save(ir_model, path, external_data=data, size_threshold_bytes=1024)
        return [path.name, data]
    ir.save(ir_model, path)
    return [path.name]


def build(model: nn.Module, folder: Path, options: BuildOptions) -> BuildResult:
    """Export every part of the model into folder, pass it through PASS_ORDER and save it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    result = BuildResult(files=[])
    with torch.no_grad():
        for part in parts_for(model, options.kv_cache):
            ir_model = export_part(part, folder / part.filename)
            ir_model, counts = run_passes(ir_model, model, part, options)
            result.files += save(ir_model, folder / part.filename, options.external_data)
            result.passes[part.filename] = counts
    return result


PREPACKING_OFF = {"session.disable_prepacking": "1"}
FOLDING_OFF = {"optimization.disable_specified_optimizers": "ConstantFolding"}


def session_settings(mode: str) -> dict:
    """What an ONNX Runtime server needs so the shared weights stay shared in memory.

    On CPU, onnxruntime prepacks each MatMul's constant weight into a private buffer, so a
    weight read by k layers would be packed k times and the memory saving would vanish."""
    entries = dict(PREPACKING_OFF)
    why = ["session.disable_prepacking=1: onnxruntime's CPU kernels otherwise pack a private copy "
           "of a shared weight for every layer that reads it."]
    if mode == "gather":
        entries.update(FOLDING_OFF)
        why.append("ConstantFolding off: keeps Gather(shared weight, order) unfolded; otherwise onnxruntime "
                   "folds each into a per-layer copy at load.")
    else:
        why.append("Mode fold needs no graph-optimizer settings (no Gather on weights).")
    return {"session_config_entries": entries, "why": why}


def write_info(folder: Path, model: nn.Module, options: BuildOptions, result: BuildResult) -> None:
    info = {"task": task_of(model), "mode": options.mode, "simplifier": options.simplifier,
            "kv_cache": options.kv_cache, "files": result.files,
            "parts": [p.filename for p in parts_for(model, options.kv_cache)], "passes": result.passes}
    (Path(folder) / INFO).write_text(json.dumps(info, indent=2))
    (Path(folder) / SESSION_SETTINGS).write_text(json.dumps(session_settings(options.mode), indent=2))
