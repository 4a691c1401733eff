"""What users feel, side by side: the merged export against what they run today.

Variants, each exported here and measured the same way:
- `merged`: the folder being validated, with its written session settings;
- `unmerged_defaults`: the original model (loaded from the manifest's source), exported by the same
  pipeline without sharing, run with onnxruntime's defaults: the baseline every saving is against;
- `paper_practice`: the merged weights untied into k equal copies (what the paper's code saves),
  exported with the exporter's own optimizer and simplified with onnxslim's defaults, run with
  onnxruntime's defaults.

Per part and shape (prefill: batch 4 x 128 tokens; decode: 1 new token after a past of 128, for
parts that take a KV cache): file bytes, peak RSS over session creation and the first run, steady
RSS after the first run as held, after malloc_trim (live memory), and in a process started with the
glibc recipe (MALLOC_TRIM_THRESHOLD_), and the median latency; each in fresh processes, 3 repeats,
medians (memprobe.py). onnxruntime >= 1.23 keys its prepacked weights by content, so k *equal*
copies share one packed buffer at run time: only the original's distinct weights are a fair memory
baseline. When the original cannot be loaded, the untied copies stand in for file sizes and the
memory gate is skipped, saying why."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..errors import FFMergeError
from ..families import adapter_for
from ..families.loading import load_model
from ..merging import MergeResult
from ..runtime import MALLOC_RECIPE
from .build import BuildOptions, build, part_stacks, targets, untied_copy
from .export import Part, export_part, parts_for
from .files import save
from .memprobe import measure
from .precision import FLOAT_PRECISIONS, PrecisionOptions, ToPrecision, derived, get_precision

MIN_MEASURABLE_BYTES = 4 * 2**20  # below this, page granularity and allocator noise swamp RSS
BASELINE = "unmerged_defaults"


def original(result: MergeResult) -> tuple[MergeResult | None, str]:
    """The model before merging, from the manifest's source, if it loads and has the merged model's layout."""
    source = result.manifest.source
    try:
        model = load_model(source)
    except (FFMergeError, OSError, ValueError) as e:
        return None, f"the original model ({source}) could not be loaded: {str(e)[:150]}"
    want = {k: tuple(v.shape) for k, v in result.model.state_dict().items() if ".delta_" not in k}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want != have:
        return None, f"the model at {source} does not have the merged model's layout (was it changed?)"
    return MergeResult.unchanged(model, source), f"original model from {source}"


def paper_practice(
    result: MergeResult, folder: Path, kv_cache: bool, precision: PrecisionOptions | None = None
) -> list[str]:
    """k equal copies, exported with torch.onnx's default optimizer and simplified with onnxslim's defaults."""
    import onnx_ir as ir
    import onnxslim

    untied = untied_copy(result)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    with torch.no_grad():
        for part in parts_for(untied.model, kv_cache):
            model = export_part(part, folder / part.filename, optimize=True)
            slim = ir.from_proto(onnxslim.slim(ir.serde.serialize_model(model)))
            saved = save(slim, folder / part.filename, external=False)
            if precision is not None and precision.name != "fp32":
                saved, _ = ToPrecision(precision, [], check=False)(folder / part.filename, saved, False)
            files += saved
    return files


def shapes(model, part: Part) -> dict[str, tuple[int, int, int]]:
    """(batch, new tokens, past tokens) per shape the part serves."""
    seq = min(128, adapter_for(model).max_positions(model.config) or 128)
    decode = (1, 1, min(128, seq - 1))
    if not part.past:
        return {"prefill": (4, seq, 0)}
    if "position_ids" in part.example:  # a causal LM's one file serves both
        return {"prefill": (4, seq, 0), "decode": decode}
    return {"decode": decode}  # seq2seq decoder_with_past


RUNTIME_FIGURES = ("peak", "steady", "steady_trimmed", "steady_recipe", "latency_ms")


def _figures(path: Path, feeds: Path, entries: dict[str, str], runs: int) -> dict:
    plain = measure(path, feeds, entries, runs)
    recipe = measure(path, feeds, entries, runs, env=MALLOC_RECIPE)
    return {
        "peak": plain["peak"],
        "steady": plain["steady"],
        "steady_trimmed": plain["steady_trimmed"],
        "steady_recipe": recipe["steady"],
        "latency_ms": plain["latency_ms"],
    }


def _size(folder: Path, files: list[str], part: str) -> int:
    return sum((folder / f).stat().st_size for f in files if f.startswith(part))


def initializer_bytes(path: Path) -> dict[str, int]:
    """Bytes of a graph's float initializers (weights) and of its integer ones (shapes, gather indices)."""
    import onnx_ir as ir

    model = ir.load(path)  # external tensors stay unread
    out = {"weight_bytes": 0, "index_bytes": 0}
    for v in model.graph.initializers.values():
        if v.const_value is not None:  # int8 / 4-bit weights are weights; int32 / int64 are indices and shapes
            index = v.const_value.dtype in (ir.DataType.INT64, ir.DataType.INT32)
            out["index_bytes" if index else "weight_bytes"] += v.const_value.nbytes
    return out


def away_at_precision(merged: Path, unmerged: Path, base: MergeResult, result: MergeResult, stacks: list[str]) -> int:
    """What the merge removes at a quantized file's precision: the bytes the unmerged model at that precision
    stores for the windows' FF tensors (weights, scales, zero points), less what the merged file stores for the
    shared tensors (int4 keeps those of long windows in 8 bits) and for any per-layer corrections."""
    import onnx_ir as ir

    adapter = adapter_for(base.model)
    names = {id(p): n for n, p in base.model.named_parameters()}
    wanted = []
    for w in result.manifest.windows:
        if w.stack in stacks:
            layers = adapter.layers(base.model, w.stack)
            wanted += [(names[id(p)], p) for i in w.layers for p in adapter.ff_params(layers[i]).values()]
    if not wanted:
        return 0
    window_fp32 = sum(p.numel() * p.element_size() for _, p in wanted)
    window = sum(v.const_value.nbytes for n, v in ir.load(unmerged).graph.initializers.items()
                 if v.const_value is not None and any(_holds(n, name) for name, _ in wanted))  # fmt: skip
    shared = targets(result, stacks)
    kept = sum(v.const_value.nbytes for n, v in ir.load(merged).graph.initializers.items()
               if v.const_value is not None and any(derived(n, t.name) for t in shared))  # fmt: skip
    away_fp32 = window_fp32 - sum(t.value.nbytes for t in shared)  # k - 1 layers' FF tensors
    corrections_fp32 = away_fp32 - result.merged_away_bytes(stacks)  # method delta's, at fp32
    return round(window - kept - corrections_fp32 * window / window_fp32)


def _holds(initializer: str, param: str) -> bool:
    """Whether an initializer holds a parameter: its name (under the export wrapper's attribute, e.g. `model.`),
    transposed or quantized (precision.derived)."""
    at = initializer.find(param)
    return at >= 0 and (at == 0 or initializer[at - 1] == ".") and derived(initializer[at:], param)


def measure_variants(
    folder: Path,
    result: MergeResult,
    info: dict,
    entries: dict[str, str],
    runs: int,
    feeds_for: Callable,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """{"baseline": what unmerged_defaults is, "parts": {part: {shape: {variant: figures}}}, "away": {...}}."""
    model, kv_cache = result.model, bool(info.get("kv_cache", False))
    with tempfile.TemporaryDirectory(prefix="ffmerge-unmerged-") as tmp:
        tmp = Path(tmp)
        base, note = original(result)
        precision = PrecisionOptions(
            info.get("precision", "fp32"), info.get("block_size", 32), info.get("accuracy_level")
        )
        options = BuildOptions(simplifier=info.get("simplifier", "onnxslim"), share=False, kv_cache=kv_cache,
                               precision=precision)  # the baseline at the same precision  # fmt: skip
        log(f"exporting the baselines ({note}; the paper's practice)")
        unmerged = base or untied_copy(result)
        base_files = build(unmerged, tmp / "unmerged", options).files
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            paper_files = paper_practice(result, tmp / "paper", kv_cache, precision)
        timed = get_precision(precision.name).cpu  # bf16: files only, the CPU provider cannot run it
        if not timed:
            log(f"{precision.name}: sizes only (onnxruntime's CPU provider has no {precision.name} products)")
        variants = {
            "merged": (folder, info["files"], entries),
            BASELINE: (tmp / "unmerged", base_files, {}),
            "paper_practice": (tmp / "paper", paper_files, {}),
        }
        parts: dict[str, dict] = {}
        for part in parts_for(model, kv_cache):
            for shape, (batch, seq, past) in shapes(model, part).items():
                feeds = feeds_for(model, part, batch, seq, past)
                np.savez(tmp / "feeds.npz", **{k: v.numpy() for k, v in feeds.items()})
                row = {}
                for name, (where, files, variant_entries) in variants.items():
                    if timed:
                        log(f"measuring {part.filename} {shape}: {name}")
                    n = runs if shape == "prefill" else max(runs, 50)
                    row[name] = (_figures(where / part.filename, tmp / "feeds.npz", variant_entries, n) if timed
                                 else dict.fromkeys(RUNTIME_FIGURES))  # fmt: skip
                    row[name]["file_bytes"] = _size(where, files, part.filename)
                    row[name].update(initializer_bytes(where / part.filename))
                parts.setdefault(part.filename, {})[shape] = row
        stacks = result.adapter.stack_names()
        away = {}
        for p in parts:
            away[p] = result.merged_away_bytes(part_stacks(p, stacks))
            if precision.name != "fp32":
                away[p] = away_at_precision(folder / p, tmp / "unmerged" / p, unmerged, result, part_stacks(p, stacks))
    return {"baseline": note if base is not None else f"untied copies ({note})", "original": base is not None,
            "parts": parts, "away": away, "precision": precision.name}  # fmt: skip


def savings(figures: dict, away: int) -> dict:
    """Ratios of one shape's figures against the baseline (and the paper's practice)."""
    m, u, p = figures["merged"], figures[BASELINE], figures["paper_practice"]

    def over_away(key):
        return (u[key] - m[key]) / away if away and m[key] is not None else None

    def ratio(a, b):
        return a / b if a is not None and b else None

    return {
        "file_saving_over_away": over_away("file_bytes"),
        "weight_saving_over_away": over_away("weight_bytes"),
        "steady_saving_over_away": over_away("steady"),
        "trimmed_saving_over_away": over_away("steady_trimmed"),
        "recipe_saving_over_away": over_away("steady_recipe"),
        "peak_ratio": ratio(m["peak"], u["peak"]),
        "latency_ratio": ratio(m["latency_ms"], u["latency_ms"]),
        "latency_ratio_vs_paper": ratio(m["latency_ms"], p["latency_ms"]),
    }


def side_by_side(measured: dict) -> dict:
    """The report's table: per part and shape, every variant's figures and the ratios against the baseline."""
    rows = {}
    for part, by_shape in measured["parts"].items():
        away = measured["away"][part]
        for shape, figures in by_shape.items():
            rows[f"{part} {shape}"] = {"merged_away_bytes": away, "figures": figures, **savings(figures, away)}
    return {"baseline": measured["baseline"], "original": measured["original"], "rows": rows,
            "precision": measured.get("precision", "fp32")}  # fmt: skip


def checks(table: dict) -> list[tuple[str, str, dict]]:
    """(name, status, detail) of the size, memory and latency checks against the baseline."""
    rows = table["rows"]
    precision = get_precision(table.get("precision", "fp32"))
    share = 0.99 if precision.name in FLOAT_PRECISIONS else 0.95  # quantized: scales, rounding
    size_ok, mem_ok, measurable = True, True, False
    for r in rows.values():
        away, f = r["merged_away_bytes"], r["figures"]
        if away:
            size_ok &= f[BASELINE]["weight_bytes"] - f["merged"]["weight_bytes"] >= share * away  # no allowance
            if precision.cpu and away >= MIN_MEASURABLE_BYTES and table["original"]:  # a server with the recipe
                mem_ok &= r["recipe_saving_over_away"] >= 0.90
        measurable |= away >= MIN_MEASURABLE_BYTES
    if not precision.cpu:
        mem_reason = (
            f"{precision.name}: onnxruntime's CPU provider has no {precision.name} products; memory and latency "
            "need the CUDA provider"
        )
    elif not measurable:
        mem_reason = f"merged-away bytes under {MIN_MEASURABLE_BYTES:,}: too small for RSS"
    elif not table["original"]:
        mem_reason = (
            "the original model is not available (equal copies are deduplicated by onnxruntime's prepack "
            "cache, so they are no memory baseline)"
        )
    else:
        mem_reason = None

    def pick(*keys):
        return {k: {key: r[key] for key in keys} for k, r in rows.items()}

    size_reason = (
        None
        if table["original"]
        else (
            "the original model is not available (simplifiers deduplicate equal copies, so they are no size baseline; "
            "the sharing check still holds the file to its parameters)"
        )
    )
    return [
        (
            "size_vs_unmerged",
            "skipped" if size_reason else "pass" if size_ok else "fail",
            {"target": f"weight bytes in the file saved >= {share} of merged-away bytes (at the file's precision)",
             "baseline": table["baseline"],
             **({"reason": size_reason} if size_reason else {}),
             "rows": pick("merged_away_bytes", "weight_saving_over_away", "file_saving_over_away")},
        ),
        (
            "memory_vs_unmerged",
            "skipped" if mem_reason else "pass" if mem_ok else "fail",
            {"target": "steady RSS in a process started with the deployment recipe (MALLOC_TRIM_THRESHOLD_): "
             "saving >= 0.90 of merged-away bytes",
             **({"reason": mem_reason} if mem_reason else {}),
             "rows": pick("trimmed_saving_over_away", "recipe_saving_over_away", "steady_saving_over_away",
                          "peak_ratio")},
        ),
        (
            "latency_vs_unmerged",
            "pass" if precision.cpu else "skipped",
            {"note": "reported, not gated (timing noise); tools/benchmark_sharing.py holds the targets",
             **({} if precision.cpu else {"reason": mem_reason}),
             "rows": pick("latency_ratio", "latency_ratio_vs_paper")},
        ),
    ]  # fmt: skip
