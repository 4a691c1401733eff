"""Pass infrastructure: onnx-ir passes that count what they did and check what they promise.

A pass declares `requires` (what the graph must look like before it) and `ensures` (what it
promises after). Their errors subclass both onnx-ir's and this tool's, so they pass through onnx-ir's
PassManager unchanged and reach the CLI as typed errors: a precondition as bad input (exit 2), a
postcondition as a failed validation (exit 1; nothing is written)."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_ir as ir

from ...errors import EXIT_VALIDATION, FFMergeError, InputError

SCOPES = "pkg.torch.onnx.name_scopes"


class PreconditionError(InputError, ir.passes.PreconditionError):
    """A pass was given a graph it cannot work on."""


class PostconditionError(FFMergeError, ir.passes.PostconditionError):
    """A pass finished but what it promises does not hold."""

    exit_code = EXIT_VALIDATION


class GraphPass(ir.passes.InPlacePass):
    """An in-place pass with a `counts` report; `refuse` / `fail` raise the typed errors above."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def refuse(self, message: str) -> None:
        raise PreconditionError(f"{type(self).__name__}: {message}")

    def fail(self, message: str) -> None:
        raise PostconditionError(f"{type(self).__name__}: {message}")


def array(value: ir.Value) -> np.ndarray:
    return value.const_value.numpy()


def digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    h = hashlib.sha1(memoryview(a.reshape(-1).view(np.uint8)))
    h.update(str(a.dtype).encode() + str(a.shape).encode())
    return h.hexdigest()


DIGEST = "ffmerge.digest"


def value_digest(value: ir.Value) -> str:
    """The digest of an initializer's content, computed once per tensor (kept in the tensor's meta store:
    a folded weight is computed again on every read)."""
    tensor = value.const_value
    found = tensor.meta.get(DIGEST)
    if found is None:
        found = tensor.meta[DIGEST] = digest(tensor.numpy())
    return found


def digest_groups(graph: ir.Graph) -> dict[str, list[ir.Value]]:
    """Initializers grouped by content."""
    groups: dict[str, list[ir.Value]] = {}
    for v in graph.initializers.values():
        if v.const_value is not None:
            groups.setdefault(value_digest(v), []).append(v)
    return groups


def scopes(node: ir.Node) -> list[str]:
    raw = node.metadata_props.get(SCOPES)
    if not raw:
        return []
    return [s.strip().strip("'\"") for s in raw.strip("[]").split(",")]


def in_module(node: ir.Node, suffixes: list[str]) -> bool:
    """Whether the node was traced inside a module whose path ends with one of suffixes."""
    return any(s == suf or s.endswith("." + suf) for s in scopes(node) for suf in suffixes)


def transposed_initializers(graph: ir.Graph) -> list[str]:
    """Names of Transpose nodes that still read an initializer, not counting those of a weight that other
    nodes also read directly (a tied embedding: its Transpose is left for the runtime to fold)."""
    out = []
    for node in graph:
        if node.op_type != "Transpose" or node.inputs[0] is None or not node.inputs[0].is_initializer():
            continue
        value = node.inputs[0]
        read_directly = value.is_graph_output() or any(n.op_type != "Transpose" for n, _ in value.uses())
        if not read_directly:
            out.append(node.name)
    return out


def add_initializer(graph: ir.Graph, name: str, data: np.ndarray | ir.TensorProtocol) -> ir.Value:
    """A new initializer holding an array, or a tensor as it is (an ir.LazyTensor stays lazy)."""
    tensor = ir.tensor(np.ascontiguousarray(data), name=name) if isinstance(data, np.ndarray) else data
    tensor.name = name
    value = ir.Value(name=name, const_value=tensor)
    value.shape = ir.Shape(tensor.shape)
    value.dtype = value.const_value.dtype
    graph.register_initializer(value)
    return value


def remove_if_unused(graph: ir.Graph, value: ir.Value) -> bool:
    if not value.uses() and not value.is_graph_output() and value.name in graph.initializers:
        graph.initializers.pop(value.name)
        return True
    return False
