"""onnxruntime sessions and the settings written next to an export (`ort_session_settings.json`)."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort

from ..errors import CorruptModelError, InputError

SESSION_SETTINGS = "ort_session_settings.json"
PREPACKING_OFF = {"session.disable_prepacking": "1"}
FOLDING_OFF = {"optimization.disable_specified_optimizers": "ConstantFolding"}
MODES = {
    "fold": "permutations folded into the weights (exact; no runtime cost)",
    "gather": "each layer keeps its own neuron order through Gather(shared, order) (needs ConstantFolding off)",
}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def session_settings(mode: str) -> dict:
    """What an ONNX Runtime server needs so the shared weights stay shared in memory.

    On CPU, onnxruntime prepacks each MatMul's constant weight into a private buffer, so a
    weight read by k layers would be packed k times and the memory saving would vanish."""
    entries = dict(PREPACKING_OFF)
    why = [
        (
            "session.disable_prepacking=1: onnxruntime's CPU kernels otherwise pack a private copy "
            "of a shared weight for every layer that reads it."
        )
    ]
    if mode == "gather":
        entries.update(FOLDING_OFF)
        why.append(
            "ConstantFolding off: keeps Gather(shared weight, order) unfolded; otherwise onnxruntime "
            "folds each into a per-layer copy at load."
        )
    else:
        why.append("Mode fold needs no graph-optimizer settings (no Gather on weights).")
    return {"session_config_entries": entries, "why": why}


def write_settings(folder: Path, mode: str) -> None:
    (Path(folder) / SESSION_SETTINGS).write_text(json.dumps(session_settings(mode), indent=2))


def session_entries(path: Path) -> dict[str, str]:
    """The session config entries of an ort_session_settings.json ({} when there is none)."""
    if not path.exists():
        return {}
    try:
        entries = json.loads(path.read_text())["session_config_entries"]
        return {str(k): str(v) for k, v in entries.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{path} is not valid ({type(e).__name__}); re-run `ffmerge-onnx convert`.") from e


def parse_providers(text: str) -> tuple[str, ...]:
    """'cpu,cuda' -> ('cpu', 'cuda'); unknown names are refused."""
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in names if p not in PROVIDERS]
    if unknown or not names:
        raise InputError(f"--providers takes {' and/or '.join(PROVIDERS)}, comma separated; got {text!r}.")
    return names


def open_session(path: Path, provider: str, entries: dict[str, str]) -> ort.InferenceSession:
    so = ort.SessionOptions()
    for k, v in entries.items():
        so.add_session_config_entry(k, v)
    if provider == "cuda":
        providers = [("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:
        raise CorruptModelError(f"onnxruntime cannot load {path}: {str(e)[:300]}") from e
