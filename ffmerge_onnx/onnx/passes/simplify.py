"""Simplify with onnxslim or onnxsim without undoing the sharing.

Both constant-fold Gather/Transpose on initializers into one full copy per consumer. We hide
the tensors that must stay shared (every initializer of at least `protect_elements` elements,
and every Gather index) as graph inputs while the simplifier runs, then put them back, and
check that each one still exists once with its bytes unchanged. The graph's inputs and outputs keep
their shapes (onnxslim fixes Megatron-BERT's sequence length to its position table: onnxsim is used
for such a model instead, and the pass counts the fallback)."""

from __future__ import annotations

import onnx
import onnx_ir as ir

from ...errors import GraphError
from .base import GraphPass, array, digest, digest_groups

SIMPLIFIERS = {
    "onnxslim": "onnxslim (default): constant folding, dead-code and pattern elimination",
    "onnxsim": "onnx-simplifier: constant folding with shape inference, checked against onnxruntime",
}


class SharingSafeSimplify(GraphPass):
    def __init__(self, simplifier: str = "onnxslim", protect_elements: int = 1024):
        super().__init__()
        if simplifier not in SIMPLIFIERS:
            raise ValueError(f"simplifier must be one of {list(SIMPLIFIERS)}, not {simplifier!r}")
        self.simplifier = simplifier
        self.protect_elements = protect_elements
        self.protected: dict[str, str] = {}  # name -> digest of every tensor that must stay shared
        self.before: dict[str, int] = {}  # digest -> copies before simplification
        self.io_shapes: dict[str, list] = {}  # graph input / output -> dims before simplification

    @property
    def in_place(self) -> bool:  # returns a new model built from the simplifier's output
        return False

    @property
    def changes_input(self) -> bool:
        return False

    def _protected_names(self, graph: ir.Graph) -> set[str]:
        names = {
            n
            for n, v in graph.initializers.items()
            if v.const_value is not None and v.const_value.size >= self.protect_elements
        }
        for node in graph:
            if node.op_type == "Gather" and node.inputs[0] is not None and node.inputs[0].is_initializer():
                names.add(node.inputs[0].name)
                if node.inputs[1] is not None and node.inputs[1].is_initializer():
                    names.add(node.inputs[1].name)
        return names

    def requires(self, model: ir.Model) -> None:
        import importlib.util

        if importlib.util.find_spec(self.simplifier) is None:
            self.refuse(f"{self.simplifier} is not installed: `pip install {self.simplifier}`, or pass --no-simplify")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = self._protected_names(graph)
        self.protected = {n: digest(array(graph.initializers[n])) for n in names}
        self.before = self._digest_counts(graph)
        proto = ir.serde.serialize_model(model)
        kept = {t.name: t for t in proto.graph.initializer if t.name in names}
        others = [t for t in proto.graph.initializer if t.name not in names]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(others)
        n_inputs = len(proto.graph.input)
        for name, t in kept.items():
            proto.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
        self.io_shapes = _io_shapes(proto.graph, skip=set(kept))
        simplified = self._run(proto, self.simplifier)
        if self.simplifier == "onnxslim" and _io_shapes(simplified.graph, skip=set(kept)) != self.io_shapes:
            simplified = self._run(proto, "onnxsim")  # onnxslim fixed a dynamic size
            self.count("fallback_to_onnxsim")
        inputs = [i for i in simplified.graph.input if i.name not in kept]
        if len(inputs) != n_inputs:
            raise GraphError(f"{self.simplifier} changed the model's inputs")
        used = {i for n in simplified.graph.node for i in n.input} | {o.name for o in simplified.graph.output}
        del simplified.graph.input[:]
        simplified.graph.input.extend(inputs)
        simplified.graph.initializer.extend(t for name, t in kept.items() if name in used)
        self.count("protected", len(kept))
        self.count("nodes_before", len(list(graph.all_nodes())))
        result = ir.serde.deserialize_model(simplified)
        self.count("nodes_after", len(list(result.graph.all_nodes())))
        after = self._digest_counts(result.graph)
        modified = self.counts["nodes_after"] != self.counts["nodes_before"] or after != self.before
        return ir.passes.PassResult(result, modified=modified)

    @staticmethod
    def _run(proto: onnx.ModelProto, simplifier: str) -> onnx.ModelProto:
        if simplifier == "onnxslim":
            import onnxslim

            return onnxslim.slim(proto)
        import onnxsim

        simplified, ok = onnxsim.simplify(proto)
        if not ok:
            raise GraphError("onnxsim could not verify the simplified model")
        return simplified

    @staticmethod
    def _digest_counts(graph: ir.Graph) -> dict[str, int]:
        return {d: len(values) for d, values in digest_groups(graph).items()}

    def ensures(self, model: ir.Model) -> None:
        """No protected tensor gained a copy (folded Gather/Transpose would add one), and the graph's inputs
        and outputs kept their shapes."""
        shapes = _io_shapes(ir.serde.serialize_model(model).graph, skip=set())
        changed = {k: (v, shapes.get(k)) for k, v in self.io_shapes.items() if shapes.get(k) != v}
        if changed:
            self.fail(f"the graph's inputs or outputs changed shape (before, after): {changed}")
        after = self._digest_counts(model.graph)
        for name, d in self.protected.items():
            if after.get(d, 0) > self.before.get(d, 0):
                self.fail(f"{name} exists {after[d]} times after simplification (was {self.before[d]})")


def _io_shapes(graph: onnx.GraphProto, skip: set[str]) -> dict[str, list]:
    """Graph input and output name -> dims (a name for a dynamic one, a number for a fixed one)."""
    return {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*graph.input, *graph.output]
        if v.name not in skip
    }
