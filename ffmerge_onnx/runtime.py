"""ONNX Runtime for a merged model: the settings written next to an export, and `session()`, the
helper a server uses to open it. Imports onnxruntime only (no torch), so a serving process stays small.

Why these settings (measured with onnxruntime 1.32, see docs/deployment.md):
- prepacking stays on: since onnxruntime 1.23 a session keeps one prepacked buffer per distinct
  weight (its prepacked-weights cache is keyed by content), so a weight shared by k layers is packed
  once; turning prepacking off saves nothing and costs 1.2-1.8x latency. `--no-prepack` writes it
  off for older runtimes;
- glibc keeps the scratch freed after packing resident unless told otherwise: set
  MALLOC_TRIM_THRESHOLD_ in the server's environment, or let `session()` call malloc_trim(0) once
  the session is built;
- mode `gather` reorders each permuted layer's hidden activations (Gather on d_ff values per token),
  never the weights, so it needs no graph-optimizer settings either.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from .errors import CorruptModelError, InputError

SESSION_SETTINGS = "ort_session_settings.json"
EXPORT_INFO = "onnx_export.json"  # written by convert: files, mode, precision
GPU_ONLY = {"bf16": "onnxruntime's CPU provider has no bf16 MatMul or Gemm kernels"}
PREPACKING_OFF = {"session.disable_prepacking": "1"}
MALLOC_RECIPE = {"MALLOC_TRIM_THRESHOLD_": "131072"}  # glibc returns freed heap above 128 KiB to the OS
MIN_ORT = (1, 23)
MODES = {
    "fold": "permutations folded into the weights (exact; no runtime cost)",
    "gather": "each layer keeps its own neuron order: Gathers on its FF's hidden activations (cheap)",
}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def session_settings(mode: str, prepack: bool = True) -> dict:
    """The session config entries an export needs, and why (written to ort_session_settings.json)."""
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}; got {mode!r}.")
    entries: dict[str, str] = {}
    why = []
    if prepack:
        why.append(
            "Prepacking stays on: onnxruntime >= 1.23 packs each distinct weight once per session, so a weight "
            "shared by k layers is packed once (turning it off saves no memory and costs 1.2-1.8x latency)."
        )
    else:
        entries.update(PREPACKING_OFF)
        why.append(
            "session.disable_prepacking=1 (asked for with --no-prepack): for onnxruntime < 1.23, whose CPU "
            "kernels pack a private copy of a shared weight for every node that reads it. Slower."
        )
    if mode == "gather":
        why.append("Mode gather reorders hidden activations, not weights: no graph-optimizer settings are needed.")
    why.append(
        f"Server environment: {', '.join(f'{k}={v}' for k, v in MALLOC_RECIPE.items())} returns the freed "
        "packing scratch to the OS (glibc keeps it resident otherwise); ffmerge_onnx.runtime.session() "
        "calls malloc_trim(0) after building the session instead."
    )
    return {"session_config_entries": entries, "environment": dict(MALLOC_RECIPE), "why": why}


def write_settings(folder: Path, mode: str, prepack: bool = True) -> None:
    (Path(folder) / SESSION_SETTINGS).write_text(json.dumps(session_settings(mode, prepack), indent=2))


def session_entries(path: Path) -> dict[str, str]:
    """The session config entries of an ort_session_settings.json ({} when there is none)."""
    if not path.exists():
        return {}
    try:
        entries = json.loads(path.read_text())["session_config_entries"]
        return {str(k): str(v) for k, v in entries.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{path} is not valid ({type(e).__name__}); re-run `ffmerge-onnx convert`.") from e


def _precision(info: Path) -> str:
    """The precision an onnx_export.json records (fp32 when there is none)."""
    try:
        return str(json.loads(info.read_text()).get("precision", "fp32"))
    except (OSError, ValueError, AttributeError):
        return "fp32"


def parse_providers(text: str) -> tuple[str, ...]:
    """'cpu,cuda' -> ('cpu', 'cuda'); unknown names are refused."""
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in names if p not in PROVIDERS]
    if unknown or not names:
        raise InputError(f"--providers takes {' and/or '.join(PROVIDERS)}, comma separated; got {text!r}.")
    return names


def version_warning() -> str | None:
    """A warning when the installed onnxruntime would not keep shared weights shared with prepacking on."""
    import onnxruntime as ort

    version = tuple(int(p) for p in ort.__version__.split(".")[:2] if p.isdigit())
    if version >= MIN_ORT:
        return None
    return (
        f"onnxruntime {ort.__version__} is older than 1.23: its CPU kernels prepack a private copy of a shared "
        "weight for every node that reads it, so the merged model holds as much memory as the unmerged one. "
        "Upgrade onnxruntime (pip install 'onnxruntime>=1.23'), or convert with --no-prepack (slower)."
    )


def trim_heap() -> bool:
    """Return freed heap pages to the OS (glibc malloc_trim); False where there is no glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def _provider_list(provider: str) -> list:
    if provider == "cuda":
        return [("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


_PREFLIGHT = """
import json, sys
import onnxruntime as ort
so = ort.SessionOptions()
so.log_severity_level = 3
for k, v in json.loads(sys.argv[2]).items():
    so.add_session_config_entry(k, v)
ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
"""


def check_loads(path: Path, entries: dict[str, str] | None = None, timeout: float = 900) -> None:
    """Build a CPU session in a child process first: onnxruntime's optimizers can crash the whole process
    on some malformed graphs (1.32 segfaults on a LayerNormalization without its bias), and a validator
    must report that, not die of it. A Python-level failure is left to the in-process load to report."""
    import signal
    import subprocess
    import sys

    import onnxruntime as ort

    cmd = [sys.executable, "-I", "-c", _PREFLIGHT, str(path), json.dumps(entries or {})]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise CorruptModelError(f"onnxruntime took over {timeout:.0f} s to load {path}; giving up.") from e
    if out.returncode < 0:
        name = signal.Signals(-out.returncode).name
        raise CorruptModelError(
            f"onnxruntime {ort.__version__} crashed ({name}) building a session for {path}: the graph is "
            "malformed in a way its checks miss. Re-export the model; a graph a tool wrote this way is a bug "
            "to report to that tool (or to onnxruntime)."
        )


def open_session(path: Path, provider: str, entries: dict[str, str], threads: int | None = None):
    """An InferenceSession with the given config entries; a graph onnxruntime refuses is a typed error."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    for k, v in entries.items():
        so.add_session_config_entry(k, v)
    try:
        return ort.InferenceSession(str(path), so, providers=_provider_list(provider))
    except Exception as e:
        raise CorruptModelError(f"onnxruntime cannot load {path}: {str(e)[:300]}") from e


def session(model, providers: tuple[str, ...] | str = ("cpu",), *, trim: bool = True, threads: int | None = None):
    """Open a folder written by `convert` (its model.onnx) or an .onnx file with the written settings.

    `trim`: call malloc_trim(0) once the session is built, so the scratch freed after prepacking does
    not stay resident in a long-lived process (the same effect as MALLOC_TRIM_THRESHOLD_)."""
    path = Path(model)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise InputError(f"{model}: give a folder written by `ffmerge-onnx convert` or an .onnx file.")
    warning = version_warning()
    if warning:
        warnings.warn(warning, stacklevel=2)
    names = parse_providers(providers) if isinstance(providers, str) else tuple(providers)
    precision = _precision(path.parent / EXPORT_INFO)
    if names[0] == "cpu" and precision in GPU_ONLY:
        raise InputError(
            f"{model} is {precision}, which runs on the CUDA provider only ({GPU_ONLY[precision]}): open it with "
            "providers=('cuda',), or convert for CPUs with --precision fp32, int8 or int4."
        )
    sess = open_session(path, names[0], session_entries(path.parent / SESSION_SETTINGS), threads)
    if trim:
        trim_heap()
    return sess
