"""Share: each merged FF tensor of a window becomes one initializer with a stable name.

Tensors are found by value (as stored in PyTorch, or transposed by FoldWeightTransposes),
restricted to initializers read inside the window's layers when the exporter recorded scopes.
The stable name is the manifest's (`ffmerge.<stack>.w<a>_<b>.<role>`), with `.T` appended for the
transposed form, so later passes find the shared tensors by name alone."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .base import GraphPass, digest, digest_groups, in_module, remove_if_unused, transposed_initializers, value_digest


@dataclass(frozen=True)
class Target:
    """One merged tensor: its stable name, value (PyTorch layout) and FF hidden axis."""

    name: str
    value: np.ndarray
    hidden_axis: int | None
    module_suffixes: list[str] = field(default_factory=list)  # e.g. "transformer.h.2.mlp.c_fc"

    def forms(self) -> dict[str, np.ndarray]:
        """Initializer name -> the value it must hold: as stored, and transposed for matrices."""
        out = {self.name: self.value}
        if self.value.ndim == 2:
            out[self.name + ".T"] = self.value.T
        return out


def shared_forms(graph: ir.Graph, target: Target) -> dict[str, bool]:
    """The target's stable initializers present in the graph: name -> transposed?"""
    return {name: name.endswith(".T") for name in target.forms() if name in graph.initializers}


class ShareMerged(GraphPass):
    def __init__(self, targets: list[Target]):
        super().__init__()
        self.targets = targets

    def requires(self, model: ir.Model) -> None:
        left = transposed_initializers(model.graph)
        if left:
            self.refuse(f"weights are still read through Transpose nodes {left[:3]}; run FoldWeightTransposes first")

    def _read_in_window(self, value: ir.Value, target: Target) -> bool:
        users = [node for node, _ in value.uses()]
        scoped = [n for n in users if n.metadata_props.get("pkg.torch.onnx.name_scopes")]
        return not scoped or any(in_module(n, target.module_suffixes) for n in scoped)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_digest = digest_groups(graph)
        for t in self.targets:
            for new_name, value in t.forms().items():
                matches = [
                    v
                    for v in by_digest.get(digest(value), [])
                    if graph.initializers.get(v.name) is v and self._read_in_window(v, t)
                ]
                if not matches:
                    continue
                keep = matches[0]
                for dup in matches[1:]:
                    dup.replace_all_uses_with(keep)
                    remove_if_unused(graph, dup)
                    self.count("duplicates_merged")
                if keep.name != new_name:
                    graph.initializers.pop(keep.name)
                    keep.name = new_name
                    keep.const_value.name = new_name
                    graph.register_initializer(keep)
                    self.count("renamed")
        return ir.passes.PassResult(model, modified=bool(self.counts))

    def ensures(self, model: ir.Model) -> None:
        """Every merged tensor is in the graph, and inside its window it is read from one initializer only.

        (Equal values elsewhere, e.g. all-zero biases of untouched layers, are not ours to merge.)"""
        by_digest = digest_groups(model.graph)
        for t in self.targets:
            found = shared_forms(model.graph, t)
            if not found:
                self.fail(f"merged tensor {t.name} {t.value.shape} is not in the exported graph")
            for name in found:
                same = by_digest[value_digest(model.graph.initializers[name])]
                read_in_window = [
                    v for v in same if v.name != name and any(in_module(n, t.module_suffixes) for n, _ in v.uses())
                ]
                if read_in_window:
                    self.fail(f"{name} is also read in the window from {[v.name for v in read_in_window]}")
