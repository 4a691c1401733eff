"""Dedupe: initializers with equal content become one (the exporter keeps equal-valued buffers apart,
e.g. GPT-Neo's causal mask in every layer). A merged tensor keeps its stable name."""

from __future__ import annotations

import onnx_ir as ir

from .base import GraphPass, digest_groups


class DedupeConstants(GraphPass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for group in digest_groups(graph).values():
            if len(group) < 2:
                continue
            keep = next((v for v in group if (v.name or "").startswith("ffmerge.")), group[0])
            for value in group:
                if value is keep or value.is_graph_input() or value.is_graph_output():
                    continue
                value.replace_all_uses_with(keep)
                graph.initializers.pop(value.name)
                self.count("initializers_removed")
        return ir.passes.PassResult(model, modified=bool(self.counts.get("initializers_removed")))

    def ensures(self, model: ir.Model) -> None:
        copies = [[v.name for v in g] for g in digest_groups(model.graph).values() if len(g) > 1]
        if copies:
            self.fail(f"initializers {copies[:3]} still hold equal content")
