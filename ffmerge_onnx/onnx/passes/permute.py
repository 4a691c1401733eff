"""Permute (mode `gather`): a layer that keeps its own neuron order reads
Gather(shared, order, axis) instead of the shared tensor.

Mode `fold` needs no pass: the merge already applied every permutation to the weights,
which is exact because a layer's hidden units are permuted consistently."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .base import GraphPass, add_initializer, in_module
from .share import Target, shared_forms


@dataclass(frozen=True)
class LayerOrder:
    """order[j]: position in the shared tensor of the layer's own neuron j."""

    name: str  # initializer name for the index tensor
    order: np.ndarray
    module_suffixes: list[str]  # the layer's FF modules


class PermuteGather(GraphPass):
    def __init__(self, targets: list[Target], layers: list[LayerOrder]):
        super().__init__()
        self.targets = [t for t in targets if t.hidden_axis is not None]
        self.layers = layers

    def requires(self, model: ir.Model) -> None:
        missing = [t.name for t in self.targets if not shared_forms(model.graph, t)]
        if missing:
            self.refuse(
                f"shared tensors {missing[:3]} are not in the graph under their stable names; run ShareMerged first"
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for layer in self.layers:
            index = None
            for t in self.targets:
                for name, transposed in shared_forms(graph, t).items():
                    value = graph.initializers[name]
                    axis = (1 - t.hidden_axis) if transposed else t.hidden_axis
                    for node, i in list(value.uses()):
                        if node.op_type == "Gather" and node.inputs[0] is value and node.inputs[1].name == layer.name:
                            continue
                        if not in_module(node, layer.module_suffixes):
                            continue
                        if index is None:
                            index = add_initializer(graph, layer.name, layer.order.astype(np.int64))
                        tag = layer.name.rsplit(".", 1)[-1]
                        gather = ir.node("Gather", [value, index], {"axis": axis}, name=f"{name}.gather.{tag}")
                        gather.outputs[0].name = gather.name
                        graph.insert_before(node, gather)
                        node.replace_input_with(i, gather.outputs[0])
                        self.count("gathers")
        return ir.passes.PassResult(model, modified=bool(self.counts))

    def ensures(self, model: ir.Model) -> None:
        for t in self.targets:
            for name in shared_forms(model.graph, t):
                for node, _ in model.graph.initializers[name].uses():
                    for layer in self.layers:
                        if node.op_type != "Gather" and in_module(node, layer.module_suffixes):
                            self.fail(f"{node.name} in a permuted layer reads {name} directly")
