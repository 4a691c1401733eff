"""Precision steps after the graph passes: fp16 for GPUs, int8 and 4-bit weights for CPUs, each done by
onnxruntime's own tools, each followed by the sharing postcondition (a merged tensor stays one tensor,
or one quantized weight with its scales).

    fp32  as exported
    fp16  onnxruntime.transformers.float16 (LayerNorm, RMSNorm and Softmax kept in fp32, fp32 inputs and outputs)
    int8  onnxruntime.quantization.quantize_dynamic on MatMul and embedding (Gather) weights (QInt8, per channel)
    (before int8 and int4, Gemm with a constant weight becomes MatMul + Add, so Conv1D FFs are reached)
    int4  onnxruntime.quantization MatMulNBitsQuantizer on MatMul and Gather weights (symmetric, --block-size,
          --accuracy-level)

Quality gates against the fp32 merged reference (validate): fp32 max abs 1e-4 + 1e-5 max|ref|; fp16
max abs 1e-2 max|ref|; int8 mean cosine 0.95 and int4 0.90 over output rows on validate's random inputs
(top-1 agreement reported). Those two are sanity gates that catch broken graphs; quality on real text
(perplexity, embedding cosine) is measured by tools/benchmark_precision.py."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .files import EXTERNAL_DATA_THRESHOLD, save, sharing
from .passes.base import PostconditionError

FP32_ATOL, FP32_RTOL = 1e-4, 1e-5
FP16_BLOCKED = ["LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization", "RMSNormalization",
                "Softmax"]  # fmt: skip


@dataclass(frozen=True)
class PrecisionOptions:
    name: str = "fp32"
    block_size: int = 32  # int4: weights per scale
    accuracy_level: int | None = None  # int4: MatMulNBits compute type (4: int8 activations), None: the default


def derived(name: str, shared: str) -> bool:
    """Whether initializer `name` holds merged tensor `shared`: itself, transposed (.T) or quantized (_...)."""
    return name == shared or name.startswith((shared + ".T", shared + "_"))


def _fp16(src: Path, dst: Path, options: PrecisionOptions, external: bool) -> list[str]:
    import onnx
    import onnx_ir as ir
    from onnxruntime.transformers import float16

    converted = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, op_block_list=FP16_BLOCKED)
    model = ir.from_proto(converted)
    model.graph.sort()  # the converter can leave the Casts it adds out of order
    return save(model, dst, external)


def _gemm_to_matmul(src: Path):
    """Gemm(A, W, C) with a constant W read as is becomes MatMul + Add (Conv1D models such as GPT-2
    export their FF as Gemm), so the weight quantizers, which read MatMul weights, reach it. Exact."""
    import onnx_ir as ir

    model = ir.load(src)
    graph = model.graph
    for node in list(graph):
        attrs = {k: a.value for k, a in node.attributes.items()}
        if node.op_type != "Gemm" or attrs.get("transA", 0) or attrs.get("transB", 0):
            continue
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or not node.inputs[1].is_initializer():
            continue
        a, w, c = (list(node.inputs) + [None])[:3]
        matmul = ir.node("MatMul", [a, w], name=f"{node.name}.matmul")
        graph.insert_before(node, matmul)
        out = matmul.outputs[0]
        if c is not None:
            add = ir.node("Add", [out, c], name=f"{node.name}.bias")
            graph.insert_before(node, add)
            out = add.outputs[0]
        ir.convenience.replace_all_uses_with(node.outputs[0], out)
        if node.outputs[0].is_graph_output():
            index = list(graph.outputs).index(node.outputs[0])
            out.name, graph.outputs[index] = node.outputs[0].name, out
        graph.remove(node, safe=True)
    return model


def _int8(src: Path, dst: Path, options: PrecisionOptions, external: bool) -> list[str]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    unfused = dst.with_name("unfused.onnx")
    model = _gemm_to_matmul(src)
    weighted = [n.name for n in model.graph if (n.op_type == "MatMul" and n.inputs[1].is_initializer())
                or (n.op_type == "Gather" and n.inputs[0].is_initializer())]  # fmt: skip
    save(model, unfused, external)
    # weights only (attention's activation x activation MatMuls stay fp32, embedding tables included), one
    # scale per output channel: MiniLM 2-3 pooled embedding cosine to fp32 0.987 against 0.937 per tensor
    # over every MatMul; the embedding table in int8 takes the file from 0.64x to 0.24x of fp32
    quantize_dynamic(unfused, dst, op_types_to_quantize=["MatMul", "Gather"], nodes_to_quantize=weighted,
                     per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=external)  # fmt: skip
    return [dst.name, dst.name + ".data"] if external else [dst.name]


def _int4(src: Path, dst: Path, options: PrecisionOptions, external: bool) -> list[str]:
    import onnx_ir as ir
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(ir.to_proto(_gemm_to_matmul(src)), bits=4, block_size=options.block_size,
                                     is_symmetric=True, accuracy_level=options.accuracy_level,
                                     op_types_to_quantize=("MatMul", "Gather"))  # embedding tables too  # fmt: skip
    quantizer.process()
    return save(ir.from_proto(quantizer.model.model), dst, external)


@dataclass(frozen=True)
class Precision:
    name: str
    help: str
    convert: Callable[[Path, Path, PrecisionOptions, bool], list[str]] | None
    gate: str  # what validate checks against the fp32 reference

    def accept(self, ref: np.ndarray, got: np.ndarray) -> dict:
        """The output check for this precision: {"ok", "max_abs", "tolerance" or "cosine", ...}."""
        ref, got = ref.astype(np.float64), got.astype(np.float64)
        diff = float(np.abs(ref - got).max()) if ref.size else 0.0
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        row = {"max_abs": diff, "max_rel": diff / max(scale, 1e-12)}
        if self.name in ("fp32", "fp16"):
            tol = FP32_ATOL + (FP32_RTOL if self.name == "fp32" else 1e-2) * scale
            return {**row, "tolerance": tol, "ok": bool(np.isfinite(got).all() and diff <= tol)}
        x = ref.reshape(-1, ref.shape[-1]) if ref.ndim else ref.reshape(1, 1)
        y = got.reshape(-1, got.shape[-1]) if got.ndim else got.reshape(1, 1)
        norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
        cosine = float(np.mean(np.where(norms > 0, (x * y).sum(1) / np.maximum(norms, 1e-30), 1.0)))
        floor = 0.95 if self.name == "int8" else 0.90
        return {**row, "cosine": cosine, "tolerance": floor, "top1_agreement": float((x.argmax(1) == y.argmax(1)).mean()),
                "ok": bool(np.isfinite(got).all() and cosine >= floor)}  # fmt: skip


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", "as exported", None, "max abs <= 1e-4 + 1e-5 max|ref|"),
        Precision("fp16", "fp16 weights and compute (GPUs); norms and softmax stay fp32", _fp16,
                  "max abs <= 1e-2 max|ref|"),
        Precision("int8", "int8 MatMul weights per channel, dynamic activations (CPUs)", _int8,
                  "mean row cosine >= 0.95"),
        Precision("int4", "4-bit blockwise MatMul weights (MatMulNBits, CPUs)", _int4, "mean row cosine >= 0.90 (a sanity gate; quality: perplexity in the benchmark)"),
    )
}  # fmt: skip


def get_precision(name: str) -> Precision:
    if name not in PRECISIONS:
        raise InputError(f"--precision is one of {', '.join(PRECISIONS)}; got {name!r}.")
    return PRECISIONS[name]


class ToPrecision:
    """One precision step on one saved ONNX file, in place, with its postcondition: every merged tensor
    (by stable name) is still there, stored once (as itself, or one quantized weight with its scales),
    and no initializer holds a copy of another."""

    def __init__(self, options: PrecisionOptions, shared: list[str], check: bool = True):
        self.options = options
        self.precision = get_precision(options.name)
        self.shared = shared  # stable names of the merged tensors in this file
        self.check = check  # False for baselines that hold equal copies on purpose

    def __call__(self, path: Path, files: list[str], external: bool) -> tuple[list[str], dict]:
        path = Path(path)
        if self.precision.convert is None:
            return files, {}
        external = external or sum((path.parent / f).stat().st_size for f in files) > EXTERNAL_DATA_THRESHOLD
        with tempfile.TemporaryDirectory(prefix=".ffmerge-precision-", dir=path.parent) as tmp:
            written = self.precision.convert(path, Path(tmp) / path.name, self.options, external)
            for f in files:
                (path.parent / f).unlink()
            for f in written:
                shutil.move(str(Path(tmp) / f), path.parent / f)
        return written, self.ensures(path, written) if self.check else {}

    def ensures(self, path: Path, files: list[str]) -> dict:
        import onnx

        stats = sharing(path, files)
        names = [t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer]
        missing = [s for s in self.shared if not any(derived(n, s) for n in names)]
        if missing:
            raise PostconditionError(
                f"ToPrecision({self.options.name}): merged tensors {missing[:3]} are gone from {path.name} under "
                "their names; the sharing can no longer be checked"
            )
        copies = stats["duplicates"]  # zero points (all zeros for every weight) are not counted (files.sharing)
        if copies:
            raise PostconditionError(
                f"ToPrecision({self.options.name}): {sum(map(len, copies.values()))} initializers of {path.name} are "
                f"copies of others ({list(copies.items())[:2]}): a merged tensor is no longer stored once"
            )
        return {"initializer_bytes": stats["initializer_bytes"], "unique_bytes": stats["unique_bytes"],
                "file_bytes": stats["file_bytes"], "merged_tensors": len(self.shared)}  # fmt: skip
