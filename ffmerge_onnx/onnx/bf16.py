"""bf16 for GPUs: every weight matrix stored once in bf16 (a merged tensor stays one tensor), and the
products that read one (linear layers, the LM head) computed in bf16; everything else stays fp32. So
norms, softmax, activations and residual adds keep fp32 as torch autocast keeps them, and only the bf16
kernels every CUDA build has are needed (MatMul, Gemm, Gather, Cast). Unlike autocast, products of two
activations (attention scores, the rotary angles positions x frequencies) stay fp32: bf16 holds integers
exactly only up to 256, so an angle computed in bf16 past position 256 is off.

A weight is a 2-D fp32 initializer a MatMul or Gemm reads as its second operand, or a Gather's table
(embeddings); such a product's other operands are cast to bf16 in front of it and its result back to fp32.

onnxruntime's CPU provider has no bf16 MatMul or Gemm (1.32), so a bf16 graph runs on CUDA only. For
checks on a CPU, `emulate` writes a copy whose products compute in fp32 on their bf16 operands and round
their results to bf16: what a GPU's bf16 GEMM does (bf16 operands, fp32 accumulation, bf16 result), up to
the order of the sums. Its memory and speed say nothing about bf16's; only its outputs are used."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

PRODUCTS = ("MatMul", "Gemm")
EMULATED = ("bf16 on onnxruntime's CPU provider, emulated: products in fp32 on bf16 operands, results rounded to "
            "bf16 (outputs only; memory and latency need the CUDA provider)")  # fmt: skip


def _float(v) -> bool:
    import onnx_ir as ir

    return v is not None and v.dtype == ir.DataType.FLOAT


def _swap(graph, old, inputs, inner, outer) -> None:
    """Replace node `old` by the same op on `inputs` computing in dtype `inner`, its result cast to `outer`."""
    import onnx_ir as ir

    attrs = {k: a.value for k, a in old.attributes.items()}
    op = ir.node(old.op_type, inputs, attrs, name=f"{old.name}.{inner.name.lower()}")
    cast = ir.node("Cast", [op.outputs[0]], {"to": outer}, name=f"{old.name}.to_{outer.name.lower()}")
    for node, dtype in ((op, inner), (cast, outer)):
        node.outputs[0].dtype, node.outputs[0].shape = dtype, old.outputs[0].shape
        graph.insert_before(old, node)
    _replace(graph, old, cast.outputs[0])


def _replace(graph, old, out) -> None:
    """Put value `out` in place of node `old`'s result, keeping graph output names; `old` goes."""
    import onnx_ir as ir

    if old.outputs[0].is_graph_output():
        index = list(graph.outputs).index(old.outputs[0])
        graph.outputs[index] = out
        out.name, old.outputs[0].name = old.outputs[0].name, None
    ir.convenience.replace_all_uses_with(old.outputs[0], out)
    graph.remove(old, safe=True)


def _cast(graph, value, to, before, cache: dict):
    """`value` cast to `to`, one Cast per value, placed before the first node that needs it."""
    import onnx_ir as ir

    if value not in cache:
        node = ir.node("Cast", [value], {"to": to}, name=f"{value.name}.to_{to.name.lower()}")
        node.outputs[0].dtype, node.outputs[0].shape = to, value.shape
        graph.insert_before(before, node)
        cache[value] = node.outputs[0]
    return cache[value]


def _table(v) -> bool:
    return _float(v) and v.is_initializer() and v.const_value is not None and not v.is_graph_input() and len(
        v.const_value.shape) == 2  # fmt: skip


def _weight(node):
    """The initializer `node` reads as a weight, or None: a product's 2-D second operand, as it is or through a
    Transpose (a tied LM head reads its embedding table so); a Gather's table (embeddings)."""
    if node.op_type == "Gather":
        return node.inputs[0] if _table(node.inputs[0]) else None
    if node.op_type not in PRODUCTS or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    v = node.inputs[1]
    if _table(v):
        return v
    producer = v.producer()
    if producer is not None and producer.op_type == "Transpose" and _table(producer.inputs[0]):
        return producer.inputs[0]
    return None


def _store_low(graph) -> None:
    """Every weight (see `_weight`), and the bias of a Gemm that reads one, stored in bf16 in place (same
    name); a Transpose between a weight and its product passes bf16 on; other readers of those tensors, if
    any, read them through one Cast back to fp32."""
    import ml_dtypes
    import onnx_ir as ir

    low = set()  # (tensor, node that reads it in bf16)
    for node in graph:
        w = _weight(node)
        if w is None:
            continue
        reader = node if node.op_type == "Gather" or node.inputs[1] is w else node.inputs[1].producer()
        low.add((w, reader))
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            c = node.inputs[2]
            if _float(c) and c.is_initializer() and c.const_value is not None:
                low.add((c, node))
    first = next(iter(graph))
    for v in {v for v, _ in low}:
        v.const_value = ir.tensor(v.const_value.numpy().astype(ml_dtypes.bfloat16), name=v.name)
        v.dtype = ir.DataType.BFLOAT16
        high = [(n, i) for n, i in v.uses() if (v, n) not in low]
        if high:
            back = _cast(graph, v, ir.DataType.FLOAT, first, {})
            for n, i in high:
                n.replace_input_with(i, back)
    for v, node in low:
        if node.op_type == "Transpose":
            node.outputs[0].dtype = ir.DataType.BFLOAT16
            high = [(n, i) for n, i in node.outputs[0].uses() if n.op_type not in PRODUCTS or i != 1]
            if high:
                cast = ir.node("Cast", [node.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{node.name}.to_float")
                cast.outputs[0].dtype, cast.outputs[0].shape = ir.DataType.FLOAT, node.outputs[0].shape
                graph.insert_after(node, cast)
                for n, i in high:
                    n.replace_input_with(i, cast.outputs[0])


def to_bf16(model):
    """The onnx-ir model with its weights and weight products in bf16 (see the module's docstring); graph
    inputs and outputs keep their types."""
    import onnx_ir as ir

    graph = model.graph
    _store_low(graph)
    low: dict = {}
    for node in list(graph):
        if node.op_type not in ("MatMul", "Gemm", "Gather"):
            continue
        slot = 0 if node.op_type == "Gather" else 1
        if len(node.inputs) <= slot or node.inputs[slot] is None or node.inputs[slot].dtype != ir.DataType.BFLOAT16:
            continue  # reads no bf16 weight: stays fp32
        inputs = list(node.inputs)
        if node.op_type in PRODUCTS:  # its weight was fp32, so are its other operands (one type T), typed or not
            inputs = [v if v is None or v.dtype == ir.DataType.BFLOAT16 else _cast(graph, v, ir.DataType.BFLOAT16,
                                                                                  node, low) for v in inputs]  # fmt: skip
        _swap(graph, node, inputs, ir.DataType.BFLOAT16, ir.DataType.FLOAT)
    return model


def emulate(src: Path, dst: Path) -> list[str]:
    """A copy of bf16 graph `src` that onnxruntime's CPU provider runs: each bf16 product computes in fp32
    on its (bf16) operands and rounds its result to bf16. Returns the files written."""
    import onnx_ir as ir

    from .files import save

    model = ir.load(src)
    graph = model.graph
    high: dict = {}
    for node in list(graph):
        if node.op_type not in PRODUCTS or node.outputs[0].dtype != ir.DataType.BFLOAT16:
            continue
        inputs = [None if v is None else _cast(graph, v, ir.DataType.FLOAT, node, high) for v in node.inputs]
        _swap(graph, node, inputs, ir.DataType.FLOAT, ir.DataType.BFLOAT16)
    return save(model, dst, False)


def is_bf16(path: Path) -> bool:
    """Whether a graph computes a product in bf16 (so onnxruntime's CPU provider cannot run it)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    bf16 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.BFLOAT16}
    bf16 |= {n.output[0] for n in model.graph.node if n.op_type == "Cast"
             and any(a.name == "to" and a.i == onnx.TensorProto.BFLOAT16 for a in n.attribute)}  # fmt: skip
    return any(n.op_type in PRODUCTS and any(i in bf16 for i in n.input) for n in model.graph.node)


@contextlib.contextmanager
def runnable(path: Path, provider: str):
    """`path`, or where the provider cannot run it (a bf16 graph on CPU) its emulated copy, kept in a temporary
    folder while the context lasts."""
    path = Path(path)
    if provider != "cpu" or not is_bf16(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=".ffmerge-bf16-emulated-", dir=path.parent) as tmp:
        emulate(path, Path(tmp) / path.name)
        yield Path(tmp) / path.name
