"""`share`: detect and share duplicated initializers of any ONNX file (no manifest needed)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


from .errors import InputError, OutputExistsError
from .onnx_build import save
from .onnx_files import load_ir
from .passes.detect import DetectShared
from .passes.simplify import SharingSafeSimplify
from .passes.transposes import FoldWeightTransposes


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def share_file(path, output, *, simplifier: str = "none", overwrite: bool = False) -> dict:
    path, output = Path(path), Path(output)
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} exists. Choose another -o or pass --overwrite.")
    if output.resolve() == path.resolve():
        raise InputError("The output must not overwrite the input; choose another -o.")
    model = load_ir(path)
    counts = {"bytes_before": _size(path)}
    passes = [FoldWeightTransposes(), DetectShared()]
    if simplifier != "none":
        passes.append(SharingSafeSimplify(simplifier))
    for p in passes:
        model = p(model).model
        counts.update(p.counts)
    with tempfile.TemporaryDirectory(dir=output.parent if output.parent.exists() else None) as tmp:
        save(model, Path(tmp) / output.name, external=False)  # external data above 2 GB
        output.parent.mkdir(parents=True, exist_ok=True)
        for f in Path(tmp).iterdir():
            shutil.move(str(f), output.parent / f.name)
    counts["bytes_after"] = _size(output)
    return counts
