"""Detect: without a manifest, share initializers that are equal, or equal up to a
permutation along one axis (e.g. checkpoints that store k copies of a merged FF).

Exact copies are replaced by the first one; a permuted copy becomes Gather(first, order, axis),
which reproduces it bit for bit."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import GraphPass, add_initializer, array, digest, remove_if_unused, transposed_initializers, value_digest


def _row_keys(a: np.ndarray, axis: int) -> list[bytes]:
    moved = np.ascontiguousarray(np.moveaxis(a, axis, 0))
    return [r.tobytes() for r in moved]


def find_order(base: np.ndarray, other: np.ndarray, axis: int) -> np.ndarray | None:
    """order with take(base, order, axis) == other, if the slices are distinct and match."""
    base_rows = _row_keys(base, axis)
    where = {k: i for i, k in enumerate(base_rows)}
    if len(where) != len(base_rows):
        return None
    order = [where.get(k) for k in _row_keys(other, axis)]
    if any(o is None for o in order):
        return None
    return np.array(order, dtype=np.int64)


class DetectShared(GraphPass):
    def __init__(self, min_elements: int = 1024, permutations: bool = True):
        super().__init__()
        self.min_elements = min_elements
        self.permutations = permutations

    def requires(self, model: ir.Model) -> None:
        left = transposed_initializers(model.graph)
        if left:
            self.refuse(f"weights are still read through Transpose nodes {left[:3]}; run FoldWeightTransposes first")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        values = [
            v
            for v in graph.initializers.values()
            if v.const_value is not None and v.const_value.size >= self.min_elements
        ]
        groups: dict[str, list[ir.Value]] = {}
        for v in values:
            groups.setdefault(value_digest(v), []).append(v)
        kept = []
        for members in groups.values():
            keep = members[0]
            kept.append(keep)
            for dup in members[1:]:
                dup.replace_all_uses_with(keep)
                remove_if_unused(graph, dup)
                self.count("duplicates_shared")
        if self.permutations:
            self._share_permuted(graph, kept)
        return ir.passes.PassResult(model, modified=bool(self.counts))

    def _share_permuted(self, graph: ir.Graph, values: list[ir.Value]) -> None:
        by_shape: dict[tuple, list[ir.Value]] = {}
        for v in values:
            a = array(v)
            # a permutation keeps the multiset of values: key on sorted contents
            by_shape.setdefault((a.shape, str(a.dtype), digest(np.sort(a, axis=None))), []).append(v)
        orders: dict[str, ir.Value] = {}  # one index tensor per distinct order (a layer's tensors share theirs)
        for members in by_shape.values():
            if len(members) < 2:
                continue
            base = members[0]
            base_a = array(base)
            for other in members[1:]:
                other_a = array(other)
                for axis in range(base_a.ndim):
                    order = find_order(base_a, other_a, axis)
                    if order is None:
                        continue
                    first_user = min((graph.index(n) for n, _ in other.uses()), default=None)
                    if first_user is None:
                        break
                    key = digest(order)
                    if key not in orders:
                        orders[key] = add_initializer(graph, f"{other.name}.order", order)
                    gather = ir.node("Gather", [base, orders[key]], {"axis": axis}, name=f"{other.name}.gather")
                    gather.outputs[0].name = f"{other.name}.gathered"
                    graph.insert_before(graph.node(first_user), gather)
                    other.replace_all_uses_with(gather.outputs[0])
                    remove_if_unused(graph, other)
                    self.count("permuted_shared")
                    break

    def ensures(self, model: ir.Model) -> None:
        seen = set()
        for v in model.graph.initializers.values():
            if v.const_value is not None and v.const_value.size >= self.min_elements:
                d = value_digest(v)
                if d in seen:
                    self.fail(f"{v.name} is still duplicated")
                seen.add(d)
