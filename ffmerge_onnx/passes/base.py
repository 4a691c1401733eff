"""Pass infrastructure: onnx-ir passes that count what they did and check what they promise."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_ir as ir

from ..errors import PostconditionError

SCOPES = "pkg.torch.onnx.name_scopes"


class GraphPass(ir.passes.InPlacePass):
    """An in-place pass with a `counts` report; `ensures` raises PostconditionError."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def fail(self, message: str) -> None:
        raise PostconditionError(f"{type(self).__name__}: {message}")


def array(value: ir.Value) -> np.ndarray:
    return value.const_value.numpy()


def digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha1(a.tobytes() + str(a.dtype).encode() + str(a.shape).encode()).hexdigest()


def initializer_digests(graph: ir.Graph) -> dict[str, str]:
    return {name: digest(array(v)) for name, v in graph.initializers.items() if v.const_value is not None}


def scopes(node: ir.Node) -> list[str]:
    raw = node.metadata_props.get(SCOPES)
    if not raw:
        return []
    return [s.strip().strip("'\"") for s in raw.strip("[]").split(",")]


def in_module(node: ir.Node, suffixes: list[str]) -> bool:
    """Whether the node was traced inside a module whose path ends with one of suffixes."""
    return any(s == suf or s.endswith("." + suf) for s in scopes(node) for suf in suffixes)


def add_initializer(graph: ir.Graph, name: str, data: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(data), name=name))
    value.shape = ir.Shape(data.shape)
    value.dtype = value.const_value.dtype
    graph.register_initializer(value)
    return value


def remove_if_unused(graph: ir.Graph, value: ir.Value) -> bool:
    if not value.uses() and not value.is_graph_output() and value.name in graph.initializers:
        graph.initializers.pop(value.name)
        return True
    return False
