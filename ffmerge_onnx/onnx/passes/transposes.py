"""Fold Transpose(initializer) without copying shared weights.

Generic constant folding makes one copy per Transpose node, so k layers reading one tied
weight through k Transpose nodes would become k copies. Here:
- a weight read only through transposes gets one transposed initializer per perm;
- a weight also read directly (e.g. a tied embedding that lm_head reads transposed) keeps
  one copy: MatMul(x, Transpose(W)) becomes Reshape -> Gemm(transB=1) -> Reshape."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import GraphPass, add_initializer, array, remove_if_unused, transposed_initializers


def _perm(node: ir.Node, rank: int) -> tuple[int, ...]:
    attr = node.attributes.get("perm")
    return tuple(attr.as_ints()) if attr is not None else tuple(reversed(range(rank)))


class FoldWeightTransposes(GraphPass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for name, value in list(graph.initializers.items()):
            if value.const_value is None:
                continue
            uses = [n for n, _ in value.uses()]
            transposes = [n for n in uses if n.op_type == "Transpose" and n.domain in ("", "ai.onnx")]
            if not transposes:
                continue
            direct = len(transposes) < len(uses) or value.is_graph_output()
            folded: dict[tuple[int, ...], ir.Value] = {}
            for node in transposes:
                perm = _perm(node, len(value.shape))
                if direct and perm == (1, 0) and self._as_gemm(graph, node, value):
                    continue
                if perm not in folded:
                    suffix = ".T" if perm == (1, 0) else ".T" + "".join(map(str, perm))
                    folded[perm] = add_initializer(graph, name + suffix, np.transpose(array(value), perm))
                    self.count("initializers_added")
                node.outputs[0].replace_all_uses_with(folded[perm])
                graph.remove(node, safe=True)
                self.count("transposes_folded")
            remove_if_unused(graph, value)
        return ir.passes.PassResult(model, modified=bool(self.counts))

    def _as_gemm(self, graph: ir.Graph, transpose: ir.Node, weight: ir.Value) -> bool:
        """MatMul(x, W^T) -> Reshape(Gemm(Reshape(x, [-1, K]), W, transB=1), shape(x)[:-1] + [N])."""
        out = transpose.outputs[0]
        users = list(out.uses())
        if not users or any(n.op_type != "MatMul" or i != 1 for n, i in users):
            return False
        n_out, k = weight.shape[0], weight.shape[1]
        flat = add_initializer(graph, f"{weight.name}.gemm_flat", np.array([-1, k], dtype=np.int64))
        tail = add_initializer(graph, f"{weight.name}.gemm_n", np.array([n_out], dtype=np.int64))
        for matmul, _ in users:
            x = matmul.inputs[0]
            tag = matmul.name or f"{weight.name}.mm"
            nodes = [
                ir.node("Reshape", [x, flat], name=f"{tag}.flatten"),
                ir.node("Shape", [x], {"end": -1}, name=f"{tag}.lead"),
            ]
            nodes.append(ir.node("Gemm", [nodes[0].outputs[0], weight], {"transB": 1}, name=f"{tag}.gemm"))
            nodes.append(ir.node("Concat", [nodes[1].outputs[0], tail], {"axis": 0}, name=f"{tag}.shape"))
            nodes.append(ir.node("Reshape", [nodes[2].outputs[0], nodes[3].outputs[0]], name=f"{tag}.unflatten"))
            for n in nodes:
                n.outputs[0].name = n.name
            graph.insert_before(matmul, nodes)
            old, new = matmul.outputs[0], nodes[-1].outputs[0]
            is_output, name = old.is_graph_output(), old.name
            new.dtype, new.shape = old.dtype, old.shape
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            if is_output:  # keep the graph's output name (e.g. "logits")
                old.name = f"{name}.replaced"
                new.name = name
            graph.remove(matmul, safe=True)
            self.count("matmuls_as_gemm")
        graph.remove(transpose, safe=True)
        return True

    def ensures(self, model: ir.Model) -> None:
        left = transposed_initializers(model.graph)
        if left:
            self.fail(f"Transpose nodes {left[:5]} still read initializers")
