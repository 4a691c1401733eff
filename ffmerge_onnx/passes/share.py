"""Share: each merged FF tensor of a window becomes one initializer with a stable name.

Tensors are found by value (as stored in PyTorch, or transposed by FoldWeightTransposes),
restricted to initializers read inside the window's layers when the exporter recorded scopes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .base import GraphPass, array, digest, in_module, remove_if_unused


@dataclass
class Target:
    """One merged tensor: its stable name, value (PyTorch layout) and FF hidden axis."""

    name: str
    value: np.ndarray
    hidden_axis: int | None
    module_suffixes: list[str] = field(default_factory=list)  # e.g. "transformer.h.2.mlp.c_fc"
    found: dict[str, bool] = field(default_factory=dict)  # initializer name -> transposed?


class ShareMerged(GraphPass):
    def __init__(self, targets: list[Target]):
        super().__init__()
        self.targets = targets

    def _read_in_window(self, value: ir.Value, target: Target) -> bool:
        users = [node for node, _ in value.uses()]
        scoped = [n for n in users if n.metadata_props.get("pkg.torch.onnx.name_scopes")]
        return not scoped or any(in_module(n, target.module_suffixes) for n in scoped)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_digest: dict[str, list[ir.Value]] = {}
        for value in graph.initializers.values():
            if value.const_value is not None:
                by_digest.setdefault(digest(array(value)), []).append(value)
        for t in self.targets:
            forms = {False: digest(t.value)}
            if t.value.ndim == 2:
                forms[True] = digest(t.value.T)
            for transposed, d in forms.items():
                matches = [v for v in by_digest.get(d, []) if self._read_in_window(v, t)]
                if not matches:
                    continue
                keep = matches[0]
                for dup in matches[1:]:
                    dup.replace_all_uses_with(keep)
                    remove_if_unused(graph, dup)
                    self.count("duplicates_merged")
                new_name = t.name + (".T" if transposed and False in t.found.values() else "")
                if keep.name != new_name:
                    graph.initializers.pop(keep.name)
                    keep.name = new_name
                    keep.const_value.name = new_name
                    graph.register_initializer(keep)
                    self.count("renamed")
                t.found[new_name] = transposed
            if not t.found:
                self.fail(f"merged tensor {t.name} {t.value.shape} is not in the exported graph")
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        """Inside the window, each merged tensor is read from one initializer only.

        (Equal values elsewhere, e.g. all-zero biases of untouched layers, are not ours to merge.)"""
        by_digest: dict[str, list[ir.Value]] = {}
        for v in model.graph.initializers.values():
            if v.const_value is not None:
                by_digest.setdefault(digest(array(v)), []).append(v)
        for t in self.targets:
            for name in t.found:
                if name not in model.graph.initializers:
                    self.fail(f"{name} vanished")
                same = by_digest[digest(array(model.graph.initializers[name]))]
                read_in_window = [v for v in same if v.name != name
                                  and any(in_module(n, t.module_suffixes) for n, _ in v.uses())]
                if read_in_window:
                    self.fail(f"{name} is also read in the window from {[v.name for v in read_in_window]}")
