"""Precision steps after the graph passes: fp16 for GPUs, int8 and 4-bit weights for CPUs, each done by
onnxruntime's own tools, each followed by the sharing postcondition (a merged tensor stays one tensor,
or one quantized weight with its scales).

    fp32  as exported
    fp16  onnxruntime.transformers.float16 (LayerNorm, RMSNorm and Softmax kept in fp32, fp32 inputs and outputs)
    bf16  bf16.py: weights and matrix products in bf16, the rest fp32 (torch autocast's split); CUDA provider
          only, checked on CPU through an emulation (onnxruntime has no bf16 converter; its CPU provider no
          bf16 MatMul)
    int8  8-bit blockwise MatMul weights (MatMulNBits, weight-only; --block-size, --accuracy-level, default 4:
          int8 compute) and int8 embedding tables (quantize_dynamic on Gather, per channel)
    int8-dynamic  onnxruntime.quantization.quantize_dynamic on MatMul and Gather weights (QInt8, per channel,
          activations quantized per tensor at run time): the fastest on CPU, the least accurate
    int4  onnxruntime.quantization MatMulNBitsQuantizer on MatMul weights with its HQQ algorithm (half-quadratic
          zero points and scales, no calibration data; --block-size, --accuracy-level); the LM head (or
          classifier) and tensors merged from 4 layers or more in 8 bits, the embedding tables in int8
    (before the weight quantizers, Gemm with a constant weight becomes MatMul + Add, so Conv1D FFs are reached,
    and a tied LM head reads its transposed embedding table as a constant, so it is quantized too)

Measured on the MiniLM 2-3 regmean merge (100 BBC test articles, pooled embedding cosine to the fp32 merged
model; file against fp32; prefill 4 x 128 latency against fp32): int8 0.9993, 0.265x, 0.88x; int8-dynamic
0.9881, 0.253x, 0.60x. Per-tensor activation quantization is what costs int8-dynamic its accuracy (its
embedding tables alone: 0.9997).

Quality gates against the fp32 merged reference (validate): fp32 max abs 1e-4 + 1e-5 max|ref|; fp16
max abs 1e-2 max|ref|; bf16 mean cosine 0.99 over output rows (its max abs error on random tiny models
reaches 0.2 max|ref| on an outlier logit while rows stay above 0.998); int8, int8-dynamic and int4 mean
cosine 0.50 over output rows on validate's random inputs (top-1 agreement reported): sanity floors that
catch broken graphs (random token ids are far from real text: SmolLM2-135M's int8 logits on them fall
below a 0.90 floor while its BBC perplexity rises by 0.7 %). On real text (the built-in BBC test split),
below fp32: causal LMs' perplexity may rise by at most 1 % (fp16), 2 % (bf16), 3 % (int8), 5 %
(int8-dynamic), 10 % (int4) over the fp32 reference's; encoders' pooled embeddings keep a mean cosine to
the reference of 0.999, 0.998, 0.99, 0.98, 0.95.

int4 on SmolLM2-135M with FF 11-21 merged (sequential), BBC test perplexity over 4,000 tokens, fp32 merged 131.50:
symmetric round-to-nearest 386.46 (+194 %), asymmetric 268.76, HQQ 158.38, round-to-nearest with the merged tensors
in 8 bits 264.81, HQQ with the merged tensors in 8 bits 130.90 (-0.5 %). A merged tensor's rounding error is the
same in all k layers that read it, so it adds up instead of averaging out; 8 bits for it cost 4 bits per merged
parameter (1.3 MB here). The unmerged model: fp32 26.93, symmetric 4-bit 32.67, HQQ 26.92."""

from __future__ import annotations

import contextlib
import logging
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
RELATIVE = {"fp32": FP32_RTOL, "fp16": 1e-2}  # max abs gates: atol + this x max|ref|
FLOAT_PRECISIONS = ("fp32", "fp16", "bf16")  # no scales or zero points: the file saves what the merge removes
# int4: a tensor merged from this many layers or more stays in 8 bits. Its rounding error is the same in each
# of the k layers, so it adds up (k e) where separate layers' errors partly cancel (sqrt(k) e); 8 bits cost
# 0.375 bytes per merged parameter more than HQQ's 4 (0.75 with scales and zero points), which leaves
# 1 - 0.5 / (k - 1) of the merged-away int4 bytes saved: 0.83 at k = 4, 0.95 at k = 11.
EIGHT_BIT_WINDOW = 4
FP16_BLOCKED = ["LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization", "RMSNormalization",
                "Softmax"]  # fmt: skip


@dataclass(frozen=True)
class PrecisionOptions:
    name: str = "fp32"
    block_size: int = 32  # int8, int4: weights per scale
    accuracy_level: int | None = None  # int8, int4: MatMulNBits compute type (4: int8), None: int8 4, int4 ORT's
    eight_bit: tuple[
        str, ...
    ] = ()  # int4: merged tensors kept in 8 bits (set by the build: windows of EIGHT_BIT_WINDOW+)


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


def _bf16(src: Path, dst: Path, options: PrecisionOptions, external: bool) -> list[str]:
    from .bf16 import to_bf16

    # Gemm + bias unfused: the bias add stays fp32; a tied head keeps reading its one table through Transpose
    return save(to_bf16(_matmul_weights(src, fold_transposes=False)), dst, external)


def _matmul_weights(src: Path, fold_transposes: bool = True):
    """The model with every constant weight a MatMul can read as such, for the weight quantizers (which read
    MatMul weights only). Exact:
    - Gemm(A, W, C) with a constant W read as is becomes MatMul + Add (Conv1D FFs, e.g. GPT-2's), with a
      Transpose of A for transA (mode gather's output projections);
    - with `fold_transposes`, Transpose(W) of a tied embedding feeding the LM head's MatMul becomes the constant
      W.T (the quantizers skip a MatMul whose weight is computed, leaving the largest tensor of a small LM in
      fp32; quantized, W.T and the int8 table are different tensors anyway)."""
    import onnx_ir as ir

    model = ir.load(src)
    graph = model.graph
    for node in list(graph):
        attrs = {k: a.value for k, a in node.attributes.items()}
        if fold_transposes and node.op_type == "Transpose" and node.inputs[0].is_initializer() and len(
                node.inputs[0].shape) == 2:  # fmt: skip
            readers = [n for n, i in node.outputs[0].uses()]
            if readers and all(n.op_type == "MatMul" and n.inputs[1] is node.outputs[0] for n in readers):
                source = node.inputs[0]
                folded = ir.Value(name=f"{source.name}.T", const_value=ir.tensor(source.const_value.numpy().T.copy()))
                graph.register_initializer(folded)
                ir.convenience.replace_all_uses_with(node.outputs[0], folded)
                graph.remove(node, safe=True)
            continue
        if node.op_type != "Gemm" or attrs.get("transB", 0):
            continue
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or not node.inputs[1].is_initializer():
            continue
        a, w, c = (list(node.inputs) + [None])[:3]
        if attrs.get("transA", 0):
            transpose = ir.node("Transpose", [a], {"perm": [1, 0]}, name=f"{node.name}.a")
            graph.insert_before(node, transpose)
            a = transpose.outputs[0]
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


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantizers configure the root logger (logging.basicConfig) and then log every node at INFO
    and advise pre-processing at WARNING: silenced while they run, and the root logger restored after."""
    root = logging.getLogger()
    disabled, level, handlers = logging.root.manager.disable, root.level, list(root.handlers)
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(disabled)
        root.setLevel(level)
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)


def _weighted(model, op_types: tuple[str, ...]) -> list[str]:
    """Nodes that read a constant weight: MatMul's second input, Gather's table."""
    weight = {"MatMul": 1, "Gather": 0}
    return [n.name for n in model.graph if n.op_type in op_types and n.inputs[weight[n.op_type]].is_initializer()]


def _dynamic_int8(model, dst: Path, external: bool, op_types: tuple[str, ...]) -> list[str]:
    """quantize_dynamic on the weights of `op_types` nodes (QInt8, one scale per output channel; attention's
    activation x activation MatMuls stay fp32). Embedding tables in int8 take MiniLM's file from 0.64x to
    0.24x of fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    unfused = dst.with_name("unfused.onnx")
    save(model, unfused, external)
    quantize_dynamic(unfused, dst, op_types_to_quantize=list(op_types), nodes_to_quantize=_weighted(model, op_types),
                     per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=external)  # fmt: skip
    return [dst.name, dst.name + ".data"] if external else [dst.name]


def _heads(model) -> list[str]:
    """MatMuls with a constant weight whose output is a graph output, directly or through a bias Add: the LM
    head (or a classifier)."""
    heads = []
    for n in model.graph:
        if n.op_type == "MatMul" and n.inputs[1].is_initializer():
            out = n.outputs[0]
            if out.is_graph_output() or any(
                u.op_type == "Add" and u.outputs[0].is_graph_output() for u, _ in out.uses()
            ):
                heads.append(n.name)
    return heads


def _nbits(model, bits: int, options: PrecisionOptions, accuracy_level: int | None, op_types: tuple[str, ...],
           exclude: list[str] | None = None):  # fmt: skip
    """MatMulNBits weights: 4 bits with HQQ (asymmetric, zero points fitted), 8 bits symmetric round-to-nearest."""
    import onnx_ir as ir
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    hqq = (
        HQQWeightOnlyQuantConfig(block_size=options.block_size, bits=4, op_types_to_quantize=op_types)
        if bits == 4
        else None
    )
    quantizer = MatMulNBitsQuantizer(ir.to_proto(model), bits=bits, block_size=options.block_size, is_symmetric=bits != 4,
                                     accuracy_level=accuracy_level, op_types_to_quantize=op_types,
                                     nodes_to_exclude=exclude, algo_config=hqq)  # fmt: skip
    quantizer.process()
    return ir.from_proto(quantizer.model.model)


def _int8_level(options: PrecisionOptions) -> int:
    """8-bit MatMulNBits compute type: --accuracy-level, else 4 (int8 compute: 0.76x the latency of 0)."""
    return 4 if options.accuracy_level is None else options.accuracy_level


def _int8(src: Path, dst: Path, options: PrecisionOptions, external: bool) -> list[str]:
    # MatMulNBits quantizes Gather in 4 bits only: embedding tables go through quantize_dynamic
    model = _nbits(_matmul_weights(src), 8, options, _int8_level(options), ("MatMul",))
    return _dynamic_int8(model, dst, external, ("Gather",))


def _int8_dynamic(src: Path, dst: Path, options: PrecisionOptions, external: bool) -> list[str]:
    return _dynamic_int8(_matmul_weights(src), dst, external, ("MatMul", "Gather"))


def _reads(model, names: tuple[str, ...]) -> list[str]:
    """MatMuls whose weight holds one of the named merged tensors (as itself or transposed)."""
    return [n.name for n in model.graph if n.op_type == "MatMul" and n.inputs[1] is not None
            and any(derived(n.inputs[1].name or "", s) for s in names)]  # fmt: skip


def _int4(src: Path, dst: Path, options: PrecisionOptions, external: bool) -> list[str]:
    # in 8 bits: the LM head, as llama.cpp's Q4_K_M keeps its output tensor at 6 bits (its rounding goes straight
    # into the logits), and the tensors of long windows (their rounding repeats in every layer that reads them)
    model = _matmul_weights(src)
    eight = _heads(model) + _reads(model, options.eight_bit)
    model = _nbits(model, 4, options, options.accuracy_level, ("MatMul",), exclude=eight)
    if eight:  # the only MatMuls with a constant weight left
        model = _nbits(model, 8, options, _int8_level(options), ("MatMul",))
    return _dynamic_int8(model, dst, external, ("Gather",))


@dataclass(frozen=True)
class Precision:
    name: str
    help: str
    convert: Callable[[Path, Path, PrecisionOptions, bool], list[str]] | None
    gate: str  # what validate checks against the fp32 reference
    perplexity_rise: float = 0.0  # causal LMs: BBC test perplexity at most (1 + this) x the fp32 reference's
    text_cosine: float = 1.0  # encoders: mean pooled-embedding cosine to the fp32 reference on BBC test articles
    cpu: bool = True  # onnxruntime's CPU provider runs it (bf16: checked through bf16.emulate, not timed)
    # row-cosine gates (all but fp32, fp16): for quantized weights a sanity floor, as quality is judged on real
    # text (validate's text_quality check); bf16 rows on random inputs stay above 0.998 (62 tiny model types)
    cosine_floor: float = 0.50

    def accept(self, ref: np.ndarray, got: np.ndarray) -> dict:
        """The output check for this precision: {"ok", "max_abs", "tolerance" or "cosine", ...}."""
        ref, got = ref.astype(np.float64), got.astype(np.float64)
        diff = float(np.abs(ref - got).max()) if ref.size else 0.0
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        row = {"max_abs": diff, "max_rel": diff / max(scale, 1e-12)}
        if self.name in RELATIVE:
            tol = FP32_ATOL + RELATIVE[self.name] * scale
            return {**row, "tolerance": tol, "ok": bool(np.isfinite(got).all() and diff <= tol)}
        x = ref.reshape(-1, ref.shape[-1]) if ref.ndim else ref.reshape(1, 1)
        y = got.reshape(-1, got.shape[-1]) if got.ndim else got.reshape(1, 1)
        norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
        cosine = float(np.mean(np.where(norms > 0, (x * y).sum(1) / np.maximum(norms, 1e-30), 1.0)))
        floor = self.cosine_floor
        return {**row, "cosine": cosine, "tolerance": floor, "top1_agreement": float((x.argmax(1) == y.argmax(1)).mean()),
                "ok": bool(np.isfinite(got).all() and cosine >= floor)}  # fmt: skip


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", "as exported", None, "max abs <= 1e-4 + 1e-5 max|ref|"),
        Precision("fp16", "fp16 weights and compute (GPUs); norms and softmax stay fp32", _fp16,
                  "max abs <= 1e-2 max|ref|", 0.01, 0.999),
        Precision("bf16", "bf16 weights and matrix products (GPUs; autocast's split: norms, softmax and adds "
                  "stay fp32); the CPU provider has no bf16 products, so CPU checks run an emulation", _bf16,
                  "mean row cosine >= 0.99", 0.02, 0.998, cpu=False, cosine_floor=0.99),
        Precision("int8", "8-bit blockwise MatMul weights (MatMulNBits), int8 embedding tables (CPUs)", _int8,
                  "mean row cosine >= 0.50", 0.03, 0.99),
        Precision("int8-dynamic", "int8 weights per channel and activations per tensor (quantize_dynamic; "
                  "fastest on CPU, least accurate)", _int8_dynamic, "mean row cosine >= 0.50", 0.05, 0.98),
        Precision("int4", "4-bit blockwise MatMul weights (MatMulNBits with HQQ, CPUs); LM head, tensors merged "
                  "from 4+ layers and embeddings in 8 bits", _int4, "mean row cosine >= 0.50",
                  0.10, 0.95),
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
        with tempfile.TemporaryDirectory(prefix=".ffmerge-precision-", dir=path.parent) as tmp, _quiet():
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
        twice = [s for s in self.shared if {s, s + ".T"} & set(names) and any(
            derived(n, s) and n not in (s, s + ".T") for n in names)]  # fmt: skip
        if twice:
            raise PostconditionError(
                f"ToPrecision({self.options.name}): merged tensors {twice[:3]} are held both as they were and "
                f"quantized in {path.name}: a node the quantizer skips still reads the unquantized tensor"
            )
        copies = stats["duplicates"]  # zero points (all zeros for every weight) are not counted (files.sharing)
        if copies:
            raise PostconditionError(
                f"ToPrecision({self.options.name}): {sum(map(len, copies.values()))} initializers of {path.name} are "
                f"copies of others ({list(copies.items())[:2]}): a merged tensor is no longer stored once"
            )
        return {"initializer_bytes": stats["initializer_bytes"], "unique_bytes": stats["unique_bytes"],
                "file_bytes": stats["file_bytes"], "merged_tensors": len(self.shared)}  # fmt: skip
