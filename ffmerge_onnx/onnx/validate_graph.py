"""`validate` for any ONNX graph (exported by optimum, by the paper's code, by a colleague): no manifest,
no PyTorch reference needed. What a CI job checks:

- the graph passes the safety and ONNX checks, and onnxruntime loads it on each requested provider;
- duplicated initializers, exact or equal up to a permutation along one axis (as `share` finds
  them), with the bytes they waste;
- file bytes against unique initializer bytes;
- peak and steady memory and latency in fresh processes (with the folder's ort_session_settings.json
  if it has one, else onnxruntime's defaults);
- with a reference ONNX model: its outputs on the same inputs, within the tolerance.

Inputs are generated from the graph's signature (see `feeds`), or read from an .npz file."""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import CorruptModelError, InputError
from ..runtime import MALLOC_RECIPE, PROVIDERS, SESSION_SETTINGS, check_loads, open_session, session_entries
from .bf16 import is_bf16
from .files import load_ir, sharing
from .memprobe import measure
from .passes import DetectShared, FoldWeightTransposes
from .validate import Check

ATOL, RTOL = 1e-4, 1e-5
AXES = {"batch": 2, "past": 8, "sequence": 16, "length": 16}  # symbolic dim name (substring) -> size
DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def model_file(path: Path) -> Path:
    path = Path(path)
    if path.is_dir():
        if not (path / "model.onnx").is_file():
            raise InputError(
                f"{path} holds no model.onnx: give a folder written by `ffmerge-onnx convert`, a folder with a "
                "model.onnx, or an .onnx file."
            )
        path = path / "model.onnx"
    if path.suffix != ".onnx" or not path.is_file():
        raise InputError(
            f"{path} is not an .onnx file: give a folder written by `ffmerge-onnx convert` or an .onnx file."
        )
    return path


def _size(dim, name: str) -> int:
    if isinstance(dim, int) and dim > 0:
        return dim
    text = str(dim or name).lower()
    if "total" in text:
        return AXES["past"] + AXES["sequence"]
    return next((n for key, n in AXES.items() if key in text), 16)


def read_feeds(path: Path) -> dict[str, np.ndarray]:
    """Arrays from an .npz file (no pickled objects), or a typed error."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--feeds {path} does not exist. Give an .npz file of the model's inputs (numpy.savez).")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, KeyError) as e:
        raise InputError(
            f"--feeds {path} is not a readable .npz file ({type(e).__name__}); write it with numpy.savez."
        ) from e


def feeds(session: ort.InferenceSession, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs from a graph's signature: token ids in [3, 100), masks of ones, positions counting up,
    past key/values of 8 positions, everything else standard normal. Symbolic dims: names with
    'batch' are 2, 'past' 8, 'sequence'/'length' 16, 'total' 24, others 16."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in session.get_inputs():
        if i.type not in DTYPES:
            raise InputError(
                f"Input {i.name} has type {i.type}, which validate cannot generate; pass --feeds FILE.npz."
            )
        shape = [_size(d, i.name if "past" in i.name else "") for d in i.shape]
        dtype = DTYPES[i.type]
        if i.name.endswith("attention_mask") or dtype is np.bool_:
            out[i.name] = np.ones(shape, dtype)
        elif i.name == "position_ids":
            start = AXES["past"] if any("past" in n for n in (x.name for x in session.get_inputs())) else 0
            out[i.name] = np.broadcast_to(np.arange(start, start + shape[-1]), shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            out[i.name] = rng.integers(3, 100, shape).astype(dtype)
        else:
            out[i.name] = rng.standard_normal(shape).astype(dtype)
    return out


def duplicates(path: Path) -> dict:
    """What `share` would find: exact and permuted copies of initializers, and the bytes they waste."""
    model = load_ir(path)

    def weights(m) -> int:
        return sum(v.const_value.nbytes for v in m.graph.initializers.values() if v.const_value is not None)

    before = weights(model)
    model = FoldWeightTransposes()(model).model  # transposed copies count as copies
    detect = DetectShared()
    model = detect(model).model
    counts = detect.counts
    return {
        "exact_copies": counts.get("duplicates_shared", 0),
        "permuted_copies": counts.get("permuted_shared", 0),
        "wasted_bytes": max(0, before - weights(model)),
    }


def _parity(path: Path, reference: Path, data: dict[str, np.ndarray], entries: dict[str, str]) -> dict:
    got = open_session(path, "cpu", entries)
    ref = open_session(reference, "cpu", session_entries(reference.parent / SESSION_SETTINGS))
    names = [o.name for o in got.get_outputs()]
    ref_names = [o.name for o in ref.get_outputs()]
    if names != ref_names:
        return {"ok": False, "error": f"outputs {names} != the reference's {ref_names}"}
    ref_inputs = {i.name for i in ref.get_inputs()}
    rows, ok = [], True
    for name, a, b in zip(
        names, got.run(None, data), ref.run(None, {k: v for k, v in data.items() if k in ref_inputs})
    ):
        if a.shape != b.shape:
            rows.append({"output": name, "ok": False, "error": f"shape {a.shape} != {b.shape}"})
            ok = False
            continue
        diff = float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0
        tol = ATOL + RTOL * float(np.abs(b).max()) if b.size else ATOL
        passed = bool(np.isfinite(a).all() and diff <= tol)
        ok &= passed
        rows.append({"output": name, "max_abs": diff, "tolerance": tol, "ok": passed})
    return {"ok": ok, "rows": rows}


def validate_graph(
    path,
    *,
    reference=None,
    providers=("cpu",),
    feeds_file: Path | None = None,
    measure_memory: bool = True,
    runs: int = 20,
) -> dict:
    """Run every check on one ONNX graph; `report["ok"]` is True only if none failed."""
    path = model_file(path)
    given = read_feeds(feeds_file) if feeds_file else None
    files = sorted(p.name for p in path.parent.iterdir() if p.name == path.name or p.name.startswith(path.name + "."))
    stats = sharing(path, files)  # safety and ONNX checks first (typed errors, exit 2)
    entries = session_entries(path.parent / SESSION_SETTINGS)
    check_loads(path, entries)
    if reference is not None:
        check_loads(model_file(reference), session_entries(model_file(reference).parent / SESSION_SETTINGS))
    checks = []
    session = None
    for p in providers:
        if p == "cuda" and PROVIDERS["cuda"] not in ort.get_available_providers():
            checks.append(Check("load[cuda]", "skipped", {"reason": "onnxruntime has no CUDA provider here"}))
            continue
        try:
            s = open_session(path, p, entries)
        except CorruptModelError as e:
            hint = {"fix": "a bf16 graph runs on the CUDA provider only: --providers cuda"} if is_bf16(path) else {}
            checks.append(Check(f"load[{p}]", "fail", {"error": str(e), **hint}))
            continue
        used = s.get_providers()[0]
        if p == "cuda" and used != PROVIDERS["cuda"]:
            checks.append(Check("load[cuda]", "skipped", {"reason": f"CUDA provider fell back to {used}"}))
            continue
        checks.append(Check(f"load[{p}]", "pass", {"providers": s.get_providers()}))
        session = session or s
    dup = duplicates(path)
    copies = dup["exact_copies"] + dup["permuted_copies"]
    detail = {
        **dup,
        "file_bytes": stats["file_bytes"],
        "initializer_bytes": stats["initializer_bytes"],
        "unique_bytes": stats["initializer_bytes"] - dup["wasted_bytes"],
        "file_over_unique": stats["file_bytes"] / max(1, stats["initializer_bytes"] - dup["wasted_bytes"]),
    }
    if copies:
        detail["fix"] = f"ffmerge-onnx share {path} -o OUT.onnx stores each of them once"
    checks.append(Check("sharing", "fail" if copies else "pass", detail))
    data = None
    if session is not None:
        try:
            data = given if given is not None else feeds(session)
            wanted = {i.name for i in session.get_inputs()}
            if given is not None and set(given) != wanted:
                raise InputError(
                    f"--feeds {feeds_file} holds inputs {sorted(given)}; the model takes {sorted(wanted)}."
                )
            session.run(None, data)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own kinds
            checks.append(Check("run[cpu]", "fail", {"error": f"{type(e).__name__}: {str(e)[:300]}",
                                                     "fix": "pass --feeds FILE.npz with the model's inputs"}))  # fmt: skip
            data = None
    if data is not None and reference is not None:
        parity = _parity(path, model_file(reference), data, entries)
        checks.append(Check("outputs_vs_reference", "pass" if parity["ok"] else "fail", parity))
    if data is not None and measure_memory:
        with tempfile.TemporaryDirectory(prefix="ffmerge-validate-") as tmp:
            np.savez(Path(tmp) / "feeds.npz", **data)
            plain = measure(path, Path(tmp) / "feeds.npz", entries, runs)
            recipe = measure(path, Path(tmp) / "feeds.npz", entries, runs, env=MALLOC_RECIPE)
        figures = {k: plain[k] for k in ("peak", "steady", "steady_trimmed", "latency_ms")}
        figures["steady_recipe"] = recipe["steady"]
        shapes = {k: list(v.shape) for k, v in data.items()}
        checks.append(Check("memory_latency", "pass", {**figures, "inputs": shapes, "note": "reported, not gated"}))
    report = {"path": str(path), "onnxruntime": ort.__version__, "session_config_entries": entries,
              "checks": [asdict(c) for c in checks]}  # fmt: skip
    report["ok"] = all(c.status != "fail" for c in checks)
    return report
