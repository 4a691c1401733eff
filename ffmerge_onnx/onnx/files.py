"""ONNX files: opening ones that may be untrusted, and what their initializers share.

Checks before any weight byte is read:
- the protobuf must parse and pass onnx.checker;
- external data must live inside the model's folder: absolute locations, `..` and symlinks
  that leave the folder are refused before the file is opened or even looked at;
- every tensor's declared size (dims x dtype) must equal the bytes it has, inline or in its
  external file (offset + length within the file), before anything is allocated.
"""

from __future__ import annotations

import math
import os
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import onnx
from onnx import external_data_helper as ext
from onnx import helper, numpy_helper

from ..errors import CorruptModelError, InputError, UnsafeModelError
from .passes.base import digest

PROTOBUF_LIMIT = 2 * 2**30


def _graph_tensors(g: onnx.GraphProto):
    yield from g.initializer
    for s in g.sparse_initializer:
        yield from (s.values, s.indices)
    for node in g.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _graph_tensors(a.g)
            for sub in a.graphs:
                yield from _graph_tensors(sub)


def _tensors(model: onnx.ModelProto):
    yield from _graph_tensors(model.graph)
    for f in model.functions:
        for node in f.node:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t


def _itemsize(t: onnx.TensorProto, path: Path) -> int | None:
    if t.data_type == onnx.TensorProto.STRING:
        return None
    try:
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    except (KeyError, ValueError, TypeError) as e:
        raise CorruptModelError(f"{path}: tensor {t.name!r} has unknown data type {t.data_type}.") from e
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4, getattr(onnx.TensorProto, "FLOAT4E2M1", -1)):
        return None  # packed sub-byte types: sizes are checked by onnx itself
    return np.dtype(dtype).itemsize


def _safe_location(location: str, folder: Path, path: Path, name: str) -> Path:
    bad = (
        not location
        or "\x00" in location
        or os.path.isabs(location)
        or PureWindowsPath(location).drive
        or PureWindowsPath(location).root
        or ".." in PurePosixPath(location.replace("\\", "/")).parts
    )
    if bad:
        raise UnsafeModelError(
            f"{path}: tensor {name!r} points at external data {location!r}, outside the model's folder. "
            "Refusing to read it; only relative paths inside the folder are allowed."
        )
    target = folder / location
    # a symlink inside the folder may still lead out of it
    if not os.path.realpath(target).startswith(os.path.realpath(folder) + os.sep):
        raise UnsafeModelError(f"{path}: external data {location!r} of {name!r} resolves outside the model's folder.")
    return target


def check_tensor_sizes(model: onnx.ModelProto, path: Path) -> None:
    folder = path.parent
    for t in _tensors(model):
        if any(d < 0 for d in t.dims):
            raise CorruptModelError(f"{path}: tensor {t.name!r} has negative dims {list(t.dims)}.")
        itemsize = _itemsize(t, path)
        expected = None if itemsize is None else math.prod(t.dims) * itemsize
        if ext.uses_external_data(t):
            try:
                info = ext.ExternalDataInfo(t)
            except (ValueError, TypeError) as e:
                raise CorruptModelError(f"{path}: external data of {t.name!r} is malformed: {e}") from e
            target = _safe_location(info.location, folder, path, t.name)
            if not target.is_file():
                raise CorruptModelError(
                    f"{path}: external data file {info.location!r} of {t.name!r} is missing. Copy it next to the model."
                )
            size = target.stat().st_size
            offset = int(info.offset or 0)
            length = int(info.length) if info.length else size - offset
            if offset < 0 or length < 0 or offset + length > size:
                raise CorruptModelError(
                    f"{path}: {t.name!r} needs bytes {offset}..{offset + length} of "
                    f"{info.location!r}, which has {size}: the data file is truncated."
                )
            if expected is not None and length != expected:
                raise CorruptModelError(
                    f"{path}: {t.name!r} declares {expected} bytes but its external data has {length}."
                )
        elif expected is not None and t.HasField("raw_data") and len(t.raw_data) != expected:
            raise CorruptModelError(f"{path}: {t.name!r} declares {expected} bytes but holds {len(t.raw_data)}.")


def check_onnx(path) -> onnx.ModelProto:
    """Parse and check one ONNX file; returns it without external data loaded."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} is not a file. Give an .onnx model.")
    size = path.stat().st_size
    if size == 0:
        raise CorruptModelError(f"{path} is empty.")
    if size > PROTOBUF_LIMIT:
        raise CorruptModelError(f"{path} is over 2 GB; ONNX files that large keep their weights in external data.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise CorruptModelError(
            f"{path} is not a readable ONNX model ({type(e).__name__}). Is it truncated? Re-export or re-download it."
        ) from e
    if not model.graph.output:
        raise CorruptModelError(f"{path} has no graph outputs: not a usable ONNX model.")
    check_tensor_sizes(model, path)
    try:
        onnx.checker.check_model(str(path))  # a path: external data resolve next to the model
    except Exception as e:
        raise CorruptModelError(f"{path} fails the ONNX checker: {str(e)[:300]}") from e
    return model


def load_onnx(path) -> onnx.ModelProto:
    """check_onnx, then read external data (only after every location was checked)."""
    path = Path(path)
    model = check_onnx(path)
    try:
        ext.load_external_data_for_model(model, str(path.parent))
    except Exception as e:
        raise CorruptModelError(
            f"{path}: could not read its external data ({type(e).__name__}: {str(e)[:200]})."
        ) from e
    return model


def load_ir(path):
    """An onnx_ir model from a checked file."""
    import onnx_ir as ir

    check_onnx(path)
    try:
        return ir.load(path)
    except Exception as e:
        raise CorruptModelError(f"{path} could not be read ({type(e).__name__}: {str(e)[:200]}).") from e


DUPLICATE_MIN_ELEMENTS = 1024  # smaller constants (shape vectors, scalars) are not weights


def sharing(path: Path, files: list[str] | None = None) -> dict:
    """Initializer bytes (total and unique), duplicated tensors and bytes on disk of one ONNX file."""
    path = Path(path)
    model = load_ir(path)  # external weights are read one at a time and released, never all at once
    total = unique = 0
    groups: dict[str, list[str]] = {}
    for name, v in model.graph.initializers.items():
        t = v.const_value
        a = numpy_helper.to_array(t.raw) if isinstance(t.raw, onnx.TensorProto) else t.numpy()
        total += a.nbytes
        d = digest(a)
        if d not in groups:
            unique += a.nbytes
        # corrections are per layer by design; symmetric quantization's zero points are all zeros for every weight
        if a.size >= DUPLICATE_MIN_ELEMENTS and ".delta_" not in name and not name.endswith("_zero_point"):
            groups.setdefault(d, []).append(name)
        del a
        if hasattr(t, "release"):
            t.release()
    dups = {names[0]: names[1:] for names in groups.values() if len(names) > 1}
    gathers = sum(1 for n in model.graph if n.op_type == "Gather" and n.inputs[1] is not None
                  and n.inputs[1].name.startswith("ffmerge."))  # fmt: skip
    on_disk = sum((path.parent / f).stat().st_size for f in (files or [path.name]))
    return {
        "initializers": len(model.graph.initializers),
        "initializer_bytes": total,
        "unique_bytes": unique,
        "duplicated_tensors": sum(len(v) for v in dups.values()),
        "duplicates": dups,
        "file_bytes": on_disk,
        "order_gathers": gathers,  # mode gather: Gathers that put a layer's hidden units in its own order
    }


EXTERNAL_DATA_THRESHOLD = 2 * 2**30  # protobuf's limit: above it weights go to a .data file


def save(ir_model, path: Path, external: bool) -> list[str]:
    """Write an onnx-ir model; its weights go to PATH.data when asked or when they would not fit."""
    import onnx_ir as ir

    size = sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)
    if external or size > EXTERNAL_DATA_THRESHOLD:
        data = path.name + ".data"
        # tensors under 1 KB (shape constants) stay inline: onnxruntime's shape inference reads them
        # at most 256 MiB of weights in flight: a folded (lazy) weight is computed, written and dropped
        ir.save(ir_model, path, external_data=data, size_threshold_bytes=1024, max_in_flight_bytes=2**28)
        return [path.name, data]
    ir.save(ir_model, path)
    return [path.name]
