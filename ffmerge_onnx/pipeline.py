"""`convert`: merge -> save reference -> export -> rewrite -> simplify -> validate, atomically."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .errors import ValidationFailed
from .fsutil import atomic_dir
from .manifest import MANIFEST_NAME
from .onnx_build import MODES, BuildOptions, build, write_info
from .storage import save_merged
from .validate import REFERENCE, summary, validate


@dataclass
class ConvertOptions:
    mode: str = "fold"
    simplifier: str = "onnxslim"
    external_data: bool = False
    kv_cache: bool = False
    keep_reference: bool = True
    providers: tuple[str, ...] = ("cpu",)
    compare: bool = True
    overwrite: bool = False


def convert(merged: nn.Module, output: Path, options: ConvertOptions, preprocessor=None, log=print) -> dict:
    """Export an already merged model into `output`; nothing is left behind unless it validates."""
    if options.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    output = Path(output)
    with atomic_dir(output, overwrite=options.overwrite) as tmp:
        log("saving the merged checkpoint (reference)")
        save_merged(merged, tmp / REFERENCE, preprocessor=preprocessor)
        shutil.copy(tmp / REFERENCE / MANIFEST_NAME, tmp / MANIFEST_NAME)
        log("exporting to ONNX and rewriting")
        build_options = BuildOptions(mode=options.mode, simplifier=options.simplifier,
                                     external_data=options.external_data, kv_cache=options.kv_cache)
        result = build(merged, tmp, build_options)
        write_info(tmp, merged, build_options, result)
        # config next to the ONNX files, so optimum's ORTModel classes load the folder as it is
        merged.config.save_pretrained(tmp)
        if getattr(merged, "generation_config", None) is not None:
            merged.generation_config.save_pretrained(tmp)
        if preprocessor is not None:
            preprocessor.save_pretrained(tmp)
        log("validating on onnxruntime")
        report = validate(tmp, providers=options.providers, compare=options.compare)
        report["folder"] = str(output)
        report["passes"] = result.passes
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "report.md").write_text(summary(report))
        if not report["ok"]:
            raise ValidationFailed(f"validation failed; nothing was written to {output}.\n" + summary(report))
        if not options.keep_reference:
            shutil.rmtree(tmp / REFERENCE)
    return report
