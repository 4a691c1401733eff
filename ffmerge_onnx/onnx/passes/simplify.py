"""Simplify with onnxslim or onnxsim without undoing the sharing.

Both constant-fold Gather/Transpose on initializers into one full copy per consumer. We hide
the tensors that must stay shared (every initializer of at least `protect_elements` elements,
and every Gather index) as graph inputs while the simplifier runs, then put them back, and
check that each one still exists once with its bytes unchanged. The graph's inputs and outputs keep
their shapes (onnxslim fixes Megatron-BERT's sequence length to its position table, and fails on
WavLM's graph: onnxsim is used for such a model instead, and the pass counts the fallback)."""

from __future__ import annotations

import onnx
import onnx_ir as ir

from ...errors import GraphError
from .base import GraphPass, digest_groups, value_digest

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
        self.protected = {n: value_digest(graph.initializers[n]) for n in names}
        self.before = self._digest_counts(graph)
        self.io_shapes = _ir_io_shapes(graph)
        kept = {n: v for n, v in graph.initializers.items() if n in names}  # file order, as before
        proto = _serialized_without(model, kept)  # the simplifier never sees (or copies) the protected weights
        n_inputs = len(proto.graph.input)
        for name, v in kept.items():
            proto.graph.input.append(onnx.helper.make_tensor_value_info(name, v.const_value.dtype.value,
                                                                        list(v.const_value.shape)))  # fmt: skip
        shapes = _io_shapes(proto.graph, skip=set(kept))
        try:
            simplified = self._run(proto, self.simplifier)
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception:  # onnxslim's folding fails on some legal graphs (WavLM's position buckets)
            if self.simplifier != "onnxslim":
                raise
            simplified = proto
        if self.simplifier == "onnxslim" and (
            simplified is proto or _io_shapes(simplified.graph, skip=set(kept)) != shapes
        ):
            simplified = self._run(proto, "onnxsim")  # onnxslim failed, or fixed a dynamic size
            self.count("fallback_to_onnxsim")
        if len([i for i in simplified.graph.input if i.name not in kept]) != n_inputs:
            raise GraphError(f"{self.simplifier} changed the model's inputs")
        del proto
        result = ir.serde.deserialize_model(simplified)
        del simplified
        for v in list(result.graph.inputs):  # the protected weights go back, the same tensors, not copies
            if v.name in kept:
                result.graph.inputs.remove(v)
                if v.uses():
                    v.const_value = kept[v.name].const_value
                    result.graph.register_initializer(v)
        self.count("protected", len(kept))
        self.count("nodes_before", len(list(graph.all_nodes())))
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
        shapes = _ir_io_shapes(model.graph)
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


def _ir_io_shapes(graph: ir.Graph) -> dict[str, list]:
    """Graph input and output name -> dims (a name or None for a dynamic one, a number for a fixed one)."""
    return {
        v.name: [d if isinstance(d, int) else d.value for d in v.shape] if v.shape is not None else None
        for v in [*graph.inputs, *graph.outputs]
    }


def _serialized_without(model: ir.Model, kept: dict[str, ir.Value]) -> onnx.ModelProto:
    """The model as a proto without the `kept` initializers (taken out of the graph while it is written)."""
    graph = model.graph
    order = list(graph.initializers.values())
    for name in kept:
        graph.initializers.pop(name)
    try:
        return ir.serde.serialize_model(model)
    finally:
        graph.initializers.clear()
        for v in order:  # back in their order: the input model is left as it was
            graph.register_initializer(v)
