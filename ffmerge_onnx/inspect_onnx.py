"""Sharing statistics of ONNX files: unique initializer bytes, duplicates, bytes on disk."""

from __future__ import annotations

from pathlib import Path

from onnx import numpy_helper

from .onnx_files import load_onnx
from .passes.base import digest

DUPLICATE_MIN_ELEMENTS = 1024  # smaller constants (shape vectors, scalars) are not weights


def sharing(path: Path, files: list[str] | None = None) -> dict:
    path = Path(path)
    model = load_onnx(path)
    total = unique = 0
    groups: dict[str, list[str]] = {}
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        total += a.nbytes
        d = digest(a)
        if d not in groups:
            unique += a.nbytes
        if a.size >= DUPLICATE_MIN_ELEMENTS:
            groups.setdefault(d, []).append(t.name)
    dups = {names[0]: names[1:] for names in groups.values() if len(names) > 1}
    names = {t.name for t in model.graph.initializer}
    gathers = sum(1 for n in model.graph.node if n.op_type == "Gather" and n.input[0] in names
                  and n.input[0].startswith("ffmerge."))
    on_disk = sum((path.parent / f).stat().st_size for f in (files or [path.name]))
    return {"initializers": len(model.graph.initializer), "initializer_bytes": total, "unique_bytes": unique,
            "duplicated_tensors": sum(len(v) for v in dups.values()), "duplicates": dups, "file_bytes": on_disk,
            "gathers_on_shared": gathers}
