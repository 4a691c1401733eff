"""A MergeResult -> ONNX files whose merged FF tensors are stored once; and `share` for any ONNX file.

The order of the graph passes is written once, in `graph_passes`; they run through onnx-ir's
PassManager, and a pass's typed error reaches the caller as itself."""

from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
import torch
from torch import nn

from ..errors import FFMergeError, InputError
from ..families import task_of
from ..fsutil import guarded_output, place
from ..merging import MergeResult
from ..runtime import EXPORT_INFO, write_settings
from .export import Part, export_part, parts_for
from .files import load_ir, save
from .passes import (
    DedupeConstants,
    DetectShared,
    FoldWeightTransposes,
    GraphPass,
    LayerOrder,
    PermuteGather,
    ShareMerged,
    SharingSafeSimplify,
    Target,
)
from .passes.simplify import SIMPLIFIERS
from .precision import EIGHT_BIT_WINDOW, PrecisionOptions, ToPrecision

SIMPLIFIER_CHOICES = {**SIMPLIFIERS, "none": "no simplifier"}
INFO = EXPORT_INFO


@dataclass(frozen=True)
class BuildOptions:
    mode: str = "fold"  # "fold" | "gather" (runtime.MODES)
    simplifier: str = "onnxslim"  # passes.SIMPLIFIERS, or "none"
    external_data: bool = False  # force external data at any size
    share: bool = True  # False: the unmerged baseline
    kv_cache: bool = False  # decoders take and return past key/values
    prepack: bool = True  # False writes session.disable_prepacking=1 (onnxruntime < 1.23)
    precision: PrecisionOptions = field(default_factory=PrecisionOptions)  # after the passes (precision.py)


@dataclass
class BuildResult:
    files: list[str]
    passes: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # file -> pass -> counts


def part_stacks(filename: str, stacks: list[str]) -> list[str]:
    """Which stacks an export file holds (seq2seq files hold one each)."""
    if filename.startswith("encoder_"):
        return ["encoder"]
    if filename.startswith("decoder_"):
        return ["decoder"]
    return stacks


def _suffix(model, adapter, stack: str, layer: int, proj: str) -> str:
    """The projection's module path from its stack's name on (parts export sub-modules, so the full path
    differs by part); a stack inside a list of stages keeps the stage's index (Swin: 0.blocks.2.mlp.fc1)."""
    layers = adapter.layers(model, stack)
    parts = adapter.stack_path(model, stack).split(".")
    tail = ".".join(parts[-2:]) if len(parts) > 1 and parts[-2].isdigit() else parts[-1]
    return f"{tail}.{layer}.{adapter.projection_path(layers[layer], proj)}"


def targets(result: MergeResult, stacks: list[str]) -> list[Target]:
    """One Target per merged tensor of every window in the given stacks."""
    model, adapter = result.model, result.adapter
    out = []
    for w in result.manifest.windows:
        if w.stack not in stacks:
            continue
        params = adapter.ff_params(adapter.layers(model, w.stack)[w.start])
        for role in adapter.roles():
            out.append(
                Target(
                    name=w.shared[role.name],
                    value=params[role.name].detach().cpu().numpy(),
                    hidden_axis=role.hidden_axis,
                    module_suffixes=[_suffix(model, adapter, w.stack, i, role.projection) for i in w.layers],
                )
            )
    return out


def layer_orders(result: MergeResult, stacks: list[str]) -> list[LayerOrder]:
    """For mode gather: each permuted layer's own neuron order within the shared tensor."""
    model, adapter = result.model, result.adapter
    out = []
    inputs = [p for p in ("in", "gate") if adapter.projections.get(p)]
    for w in result.manifest.windows:
        if w.stack not in stacks:
            continue
        for i in w.layers:
            perm = np.asarray(result.permutations[f"{w.stack}.{i}"])
            if np.array_equal(perm, np.arange(len(perm))):
                continue
            out.append(
                LayerOrder(
                    name=f"ffmerge.{w.stack}.w{w.start}_{w.end}.order{i}",
                    order=np.argsort(perm).astype(np.int64),
                    inputs=[_suffix(model, adapter, w.stack, i, p) for p in inputs],
                    output=_suffix(model, adapter, w.stack, i, "out"),
                    blocks=len(adapter.fused) if adapter.fused else 1,
                )
            )
    return out


def untied_copy(result: MergeResult) -> MergeResult:
    """The merged model with every window tie broken into k equal copies (the paper's practice)."""
    clone = copy.deepcopy(result)
    adapter = clone.adapter
    for w in clone.manifest.windows:
        for i in w.layers:
            layer = adapter.layers(clone.model, w.stack)[i]
            for role in adapter.roles():
                module = adapter.projection(layer, role.projection)
                setattr(module, role.attr, nn.Parameter(getattr(module, role.attr).detach().clone()))
    return clone


def graph_passes(
    *,
    simplifier: str,
    share: list[Target] | None = None,
    orders: list[LayerOrder] | None = None,
    detect: bool = False,
) -> list[GraphPass]:
    """The order of the ONNX passes: fold weight transposes, share the merged tensors (or detect
    copies without a manifest), give permuted layers their Gathers, make equal constants one (only when
    sharing: a build without it keeps what the exporter wrote), simplify without undoing it."""
    passes: list[GraphPass] = [FoldWeightTransposes()]
    if share is not None:
        passes.append(ShareMerged(share))
    if detect:
        passes.append(DetectShared())
    if orders:
        passes.append(PermuteGather(share or [], orders))
    if share is not None or detect:
        passes.append(DedupeConstants())
    if simplifier != "none":
        passes.append(SharingSafeSimplify(simplifier))
    return passes


def run_passes(ir_model: ir.Model, passes: list[GraphPass]) -> tuple[ir.Model, dict[str, dict[str, int]]]:
    """Run the passes through onnx-ir's PassManager; returns the model and each pass's counts."""
    try:
        result = ir.passes.PassManager(passes)(ir_model)
    except ir.passes.PassError as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, FFMergeError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
    # scopes and stack traces were only needed by the passes; they would bloat the file
    ir.passes.common.ClearMetadataAndDocStringPass()(result.model)
    return result.model, {type(p).__name__: dict(p.counts) for p in passes}


def build(result: MergeResult, folder: Path, options: BuildOptions) -> BuildResult:
    """Export every part of the model into folder, run the graph passes on each and save it."""
    if options.mode == "gather" and any(w.deltas for w in result.manifest.windows):
        raise InputError(
            "Mode gather cannot carry the delta method's corrections (they are fitted in the shared neuron "
            "order); use --permutations fold."
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = BuildResult(files=[])
    stack_names = result.adapter.stack_names()
    with torch.no_grad():
        for part in parts_for(result.model, options.kv_cache):
            ir_model = export_part(part, folder / part.filename)
            stacks = part_stacks(part.filename, stack_names)
            share = targets(result, stacks) if options.share else None
            orders = layer_orders(result, stacks) if options.share and options.mode == "gather" else None
            ir_model, counts = run_passes(
                ir_model,
                graph_passes(simplifier=options.simplifier, share=share, orders=orders),
            )
            files = save(ir_model, folder / part.filename, options.external_data)
            if options.precision.name != "fp32":
                long = tuple(t.name for t in share or [] if len(t.module_suffixes) >= EIGHT_BIT_WINDOW)
                precision = replace(options.precision, eight_bit=long)
                step = ToPrecision(precision, [t.name for t in share or []], check=options.share)
                files, counts["ToPrecision"] = step(folder / part.filename, files, options.external_data)
            out.files += files
            out.passes[part.filename] = counts
    return out


def write_info(folder: Path, result: MergeResult, options: BuildOptions, built: BuildResult) -> None:
    """onnx_export.json (what the folder holds) and the session settings it needs."""
    parts: list[Part] = parts_for(result.model, options.kv_cache)
    info = {
        "task": task_of(result.model),
        "mode": options.mode,
        "simplifier": options.simplifier,
        "kv_cache": options.kv_cache,
        "prepack": options.prepack,
        "precision": options.precision.name,
        "block_size": options.precision.block_size,
        "accuracy_level": options.precision.accuracy_level,
        "files": built.files,
        "parts": [p.filename for p in parts],
        "passes": built.passes,
    }
    (Path(folder) / INFO).write_text(json.dumps(info, indent=2))
    write_settings(folder, options.mode, options.prepack)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def share_file(path, output, *, simplifier: str = "none", overwrite: bool = False) -> dict:
    """Without a manifest: share initializers that are equal, or equal up to a permutation."""
    path, output = Path(path), Path(output)
    if not path.is_file():
        raise InputError(f"{path} is not a file. Give an .onnx model.")
    if output.is_dir():
        raise InputError(f"-o {output} is a folder; give the path of the .onnx file to write.")
    if output.suffix != ".onnx":
        raise InputError(f"-o {output}: give a path ending in .onnx.")
    with guarded_output(output, overwrite, [path, path.with_name(path.name + ".data")]) as target:
        model, counts = run_passes(load_ir(path), graph_passes(simplifier=simplifier, detect=True))
        report = {"bytes_before": _size(path), "output": str(target)}
        for c in counts.values():
            report.update(c)
        with tempfile.TemporaryDirectory(prefix=".ffmerge-tmp-", dir=target.parent) as tmp:
            written = save(model, Path(tmp) / target.name, external=False)  # external data above 2 GB
            placed = []
            try:
                for name in reversed(written):  # the .onnx last: once it is there, its data is too
                    place(Path(tmp) / name, target.parent / name, overwrite)
                    placed.append(target.parent / name)
            except BaseException:
                for p in placed:
                    p.unlink(missing_ok=True)
                raise
            stale = target.with_name(target.name + ".data")
            if stale.name not in written and overwrite:
                stale.unlink(missing_ok=True)
        report["bytes_after"] = _size(target)
    return report
