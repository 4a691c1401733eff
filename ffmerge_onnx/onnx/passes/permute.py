"""Permute (mode `gather`): a layer that keeps its own neuron order gets it on its FF's hidden
activations, not on the weights. Its projections read the shared tensors directly (in the window's
shared neuron order); the hidden units leave the input projection(s) through Gather(h, order) into
the layer's own order, and enter the output projection through Gather(h, inverse) back into the
shared order. A Gather on d_ff activations per token is cheap; a Gather on the weights would copy
them on every run (or be folded into per-layer copies at load).

Mode `fold` needs no pass: the merge already applied every permutation to the weights, which is
exact because a layer's hidden units are permuted consistently."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .base import GraphPass, add_initializer, in_module
from .share import Target, shared_forms


@dataclass(frozen=True)
class LayerOrder:
    """order[j]: position in the shared tensor of the layer's own neuron j."""

    name: str  # initializer name for the index tensor (the inverse gets ".inverse")
    order: np.ndarray
    inputs: list[str]  # the layer's input projection modules (in, and gate when gated)
    output: str  # the layer's output projection module


FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


def _activation(v: ir.Value) -> bool:
    """A tensor of activations, not a shape value the exporter passes across module boundaries."""
    return v.dtype is None or v.dtype in FLOATS


def _outputs_of(graph: ir.Graph, module: str) -> list[tuple[ir.Node, ir.Value]]:
    """(producer, value) for activations computed inside `module` and read outside it."""
    found = []
    for node in graph:
        if not in_module(node, [module]):
            continue
        for v in node.outputs:
            if _activation(v) and any(not in_module(user, [module]) for user, _ in v.uses()):
                found.append((node, v))
    return found


def _inputs_of(graph: ir.Graph, module: str) -> list[ir.Value]:
    """Activations computed outside `module` that nodes inside it read (graph inputs included)."""
    found = []
    for node in graph:
        if not in_module(node, [module]):
            continue
        for v in node.inputs:
            if v is None or v.is_initializer() or v in found or not _activation(v):
                continue
            producer = v.producer()
            if producer is None or not in_module(producer, [module]):
                found.append(v)
    return found


class PermuteGather(GraphPass):
    def __init__(self, targets: list[Target], layers: list[LayerOrder]):
        super().__init__()
        self.targets = [t for t in targets if t.hidden_axis is not None]
        self.layers = layers

    def requires(self, model: ir.Model) -> None:
        graph = model.graph
        missing = [t.name for t in self.targets if not shared_forms(graph, t)]
        if missing:
            self.refuse(
                f"shared tensors {missing[:3]} are not in the graph under their stable names; run ShareMerged first"
            )
        for layer in self.layers:
            for module in layer.inputs:
                if len(_outputs_of(graph, module)) != 1:
                    self.refuse(f"cannot tell the one output of {module} (the exporter recorded no or several)")
            if len([v for v in _inputs_of(graph, layer.output) if not v.is_graph_input()]) != 1:
                self.refuse(f"cannot tell the one hidden input of {layer.output}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for layer in self.layers:
            order = add_initializer(graph, layer.name, layer.order.astype(np.int64))
            inverse = add_initializer(graph, layer.name + ".inverse", np.argsort(layer.order).astype(np.int64))
            for module in layer.inputs:
                ((producer, value),) = _outputs_of(graph, module)
                gather = self._gather(value, order, f"{module}.to_own_order")
                graph.insert_after(producer, gather)
                for user, i in list(value.uses()):
                    if user is not gather and not in_module(user, [module]):
                        user.replace_input_with(i, gather.outputs[0])
                self.count("gathers")
            (hidden,) = [v for v in _inputs_of(graph, layer.output) if not v.is_graph_input()]
            users = [(u, i) for u, i in hidden.uses() if in_module(u, [layer.output])]
            back = self._gather(hidden, inverse, f"{layer.output}.to_shared_order")
            graph.insert_before(min((u for u, _ in users), key=graph.index), back)
            for user, i in users:
                user.replace_input_with(i, back.outputs[0])
            self.count("gathers")
        return ir.passes.PassResult(model, modified=bool(self.counts))

    @staticmethod
    def _gather(value: ir.Value, index: ir.Value, name: str) -> ir.Node:
        node = ir.node("Gather", [value, index], {"axis": -1}, name=name)
        node.outputs[0].name = name
        if value.dtype is not None:  # same type and shape as its input (when the graph records them)
            node.outputs[0].dtype, node.outputs[0].shape = value.dtype, value.shape
        return node

    def ensures(self, model: ir.Model) -> None:
        """Shared tensors are read as they are (no Gather on weights), and each permuted layer's hidden
        units pass through its order on the way out of the input projections and back into the output."""
        graph = model.graph
        for t in self.targets:
            for name in shared_forms(graph, t):
                if any(user.op_type == "Gather" for user, _ in graph.initializers[name].uses()):
                    self.fail(f"{name} is gathered: the order belongs on the activations")
        for layer in self.layers:
            for module in layer.inputs:
                for _, value in _outputs_of(graph, module):
                    outside = [u for u, _ in value.uses() if not in_module(u, [module])]
                    if any(u.op_type != "Gather" or u.inputs[1].name != layer.name for u in outside):
                        self.fail(f"the output of {module} reaches the rest of the layer in the shared order")
            for v in _inputs_of(graph, layer.output):
                producer = v.producer()
                if not v.is_graph_input() and (producer is None or producer.op_type != "Gather"
                                               or producer.inputs[1].name != layer.name + ".inverse"):  # fmt: skip
                    self.fail(f"{layer.output} reads hidden units in the layer's own order")
