"""Permute (mode `gather`): a layer that keeps its own neuron order gets it on its FF's hidden
activations, not on the weights. Its projections read the shared tensors directly (in the window's
shared neuron order); the hidden units leave the input projection(s) through Gather(h, order) into
the layer's own order, and enter the output projection through Gather(h, inverse) back into the
shared order. A Gather on the weights would copy them on every run (or be folded into per-layer copies
at load). On the activations the hidden axis is moved to the front first: onnxruntime's Gather copies
one element at a time along the last axis (1.11x GPT-2's prefill latency) but whole rows along the
first, so Transpose -> Gather(axis 0) -> Transpose costs a few percent of the FF instead.

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
    blocks: int = 1  # d_ff-wide blocks in an input projection's output (2: gate and up fused)

    @property
    def input_name(self) -> str:
        """Index tensor for the input projections' outputs (the order on every block)."""
        return self.name if self.blocks == 1 else self.name + ".blocks"

    def input_order(self) -> np.ndarray:
        d = len(self.order)
        return np.concatenate([self.order + b * d for b in range(self.blocks)]).astype(np.int64)


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


def _reorder(value: ir.Value, index: ir.Value, name: str) -> list[ir.Node]:
    """Nodes that put `value`'s last axis in `index` order; the last node's output is the result.
    Transpose -> Gather(axis 0) -> Transpose where the rank is known, else one Gather on the last axis."""
    rank = len(value.shape) if value.shape is not None else None
    if rank is None or rank < 2:
        nodes = [ir.node("Gather", [value, index], {"axis": -1}, name=name)]
    else:
        front = ir.node("Transpose", [value], {"perm": [rank - 1, *range(rank - 1)]}, name=f"{name}.front")
        gather = ir.node("Gather", [front.outputs[0], index], {"axis": 0}, name=f"{name}.gather")
        back = ir.node("Transpose", [gather.outputs[0]], {"perm": [*range(1, rank), 0]}, name=name)
        nodes = [front, gather, back]
        for node in nodes[:2]:
            node.outputs[0].name = node.name
            if value.dtype is not None:
                node.outputs[0].dtype = value.dtype
    nodes[-1].outputs[0].name = name
    if value.dtype is not None:  # same type and shape as its input (when the graph records them)
        nodes[-1].outputs[0].dtype, nodes[-1].outputs[0].shape = value.dtype, value.shape
    return nodes


def _reordered_by(value: ir.Value) -> str | None:
    """The order (index tensor name) that produced `value` through _reorder's nodes, else None."""
    node = value.producer()
    if node is not None and node.op_type in ("Transpose", "Reshape"):
        node = node.inputs[0].producer()
    return node.inputs[1].name if node is not None and node.op_type == "Gather" else None


def _starts_reorder(user: ir.Node, order: str) -> bool:
    """`user` is the first node of a _reorder by `order`."""
    if user.op_type == "Transpose":
        return all(_starts_reorder(u, order) for u, _ in user.outputs[0].uses())
    return user.op_type == "Gather" and user.inputs[1].name == order


def _constant(graph: ir.Graph, name: str, data: list[int]) -> ir.Value:
    """A small int64 shape constant, one per value in the graph."""
    found = graph.initializers.get(name)
    return found if found is not None else add_initializer(graph, name, np.array(data, dtype=np.int64))


def _projection(users: list[tuple[ir.Node, int]]) -> tuple[ir.Node, ir.Node | None] | None:
    """The output projection reading the hidden units as (Gemm or MatMul, the Reshape to 2-D before a
    Gemm), when it is one product with a constant weight; else None."""
    if len(users) != 1:
        return None
    (node, _), reshape = users[0], None
    if node.op_type == "Reshape" and len(node.outputs[0].uses()) == 1:
        reshape, (node, _) = node, node.outputs[0].uses()[0]
        if node.op_type != "Gemm" or node.inputs[0] is not reshape.outputs[0]:
            return None
        attrs = {k: a.value for k, a in node.attributes.items()}
        if attrs.get("transA", 0) or attrs.get("transB", 0) or attrs.get("alpha", 1.0) != 1.0:
            return None
    elif node.op_type != "MatMul" or users[0][1] != 0:  # the hidden units as the left operand
        return None
    weight = node.inputs[1]
    if not weight.is_initializer() or weight.shape is None or len(weight.shape) != 2:
        return None
    return node, reshape


def _into_projection(
    graph: ir.Graph, hidden: ir.Value, users: list[tuple[ir.Node, int]], inverse: ir.Value, name: str, d_ff: int
) -> bool:
    """Put the hidden units back in the shared order straight into the output projection: Transpose ->
    Gather(axis 0) -> Reshape(d_ff, -1) -> Gemm(transA=1). The product reads the reordered rows as its
    transposed left operand, so no tensor goes back to the tokens-first layout (which, onnxruntime's
    planner reusing buffers only between equal shapes, would hold one more d_ff-wide buffer). False
    (nothing changed) where the projection is not one product with a constant weight."""
    found = _projection(users)
    if found is None or hidden.shape is None or len(hidden.shape) < 2:
        return False
    product, reshape = found
    nodes = _reorder(hidden, inverse, name)[:2]
    rows = _constant(graph, f"ffmerge.rows_{d_ff}", [d_ff, -1])
    flat = ir.node("Reshape", [nodes[-1].outputs[0], rows], name=f"{name}.flat")
    flat.outputs[0].name = flat.name
    nodes.append(flat)
    c = product.inputs[2:] if product.op_type == "Gemm" else []
    gemm = ir.node("Gemm", [flat.outputs[0], product.inputs[1], *c], {"transA": 1}, name=product.name)
    gemm.metadata_props.update(product.metadata_props)  # stays in the output projection's module
    gemm.outputs[0].name = f"{name}.product"
    nodes.append(gemm)
    result = gemm.outputs[0]
    if reshape is None:  # MatMul on [..., d_ff]: back to [..., d_model]
        lead = ir.node("Shape", [hidden], {"end": -1}, name=f"{name}.lead")
        d = product.inputs[1].shape[1]
        width = _constant(graph, f"ffmerge.width_{d}", [d])
        shape = ir.node("Concat", [lead.outputs[0], width], {"axis": 0}, name=f"{name}.shape")
        back = ir.node("Reshape", [result, shape.outputs[0]], name=f"{name}.unflat")
        for node in (lead, shape, back):
            node.outputs[0].name = node.name
        lead.outputs[0].dtype = shape.outputs[0].dtype = ir.DataType.INT64
        if product.outputs[0].dtype is not None:
            back.outputs[0].dtype, back.outputs[0].shape = product.outputs[0].dtype, product.outputs[0].shape
        for node in (shape, back):  # part of the projection; the Shape reads the layer's own order
            node.metadata_props.update(product.metadata_props)
        nodes += [lead, shape, back]
        result = back.outputs[0]
    first = reshape if reshape is not None else product
    graph.insert_before(first, nodes)
    product.outputs[0].replace_all_uses_with(result)
    for node in (product, reshape):
        if node is not None:
            graph.remove(node, safe=True)
    return True


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
            order = add_initializer(graph, layer.input_name, layer.input_order())
            inverse = add_initializer(graph, layer.name + ".inverse", np.argsort(layer.order).astype(np.int64))
            for module in layer.inputs:
                ((producer, value),) = _outputs_of(graph, module)
                nodes = _reorder(value, order, f"{module}.to_own_order")
                graph.insert_after(producer, nodes)
                for user, i in list(value.uses()):
                    if user is not nodes[0] and not in_module(user, [module]):
                        user.replace_input_with(i, nodes[-1].outputs[0])
                self.count("gathers")
            (hidden,) = [v for v in _inputs_of(graph, layer.output) if not v.is_graph_input()]
            users = [(u, i) for u, i in hidden.uses() if in_module(u, [layer.output])]
            name = f"{layer.output}.to_shared_order"
            if not _into_projection(graph, hidden, users, inverse, name, len(layer.order)):
                back = _reorder(hidden, inverse, name)
                graph.insert_before(min((u for u, _ in users), key=graph.index), back)
                for user, i in users:
                    user.replace_input_with(i, back[-1].outputs[0])
            self.count("gathers")
        return ir.passes.PassResult(model, modified=bool(self.counts))

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
                    if not all(_starts_reorder(u, layer.input_name) for u in outside):
                        self.fail(f"the output of {module} reaches the rest of the layer in the shared order")
            for v in _inputs_of(graph, layer.output):
                if not v.is_graph_input() and _reordered_by(v) != layer.name + ".inverse":
                    self.fail(f"{layer.output} reads hidden units in the layer's own order")
