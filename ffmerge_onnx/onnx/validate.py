"""Validate an exported folder: outputs against PyTorch, sharing, memory and latency.

Output tolerance (fp32): |onnx - torch| <= 1e-4 + 1e-5 * max|torch| per output. The relative
part covers float32 re-association on large logits (e.g. vocab logits around 30). Other precisions
have their own gates (precision.py)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnxruntime as ort
import torch

from ..errors import InputError
from ..families import adapter_for, modality
from ..merging import load_merged
from ..runtime import MALLOC_RECIPE, SESSION_SETTINGS, check_loads, open_session, session_entries
from . import compare
from .bf16 import EMULATED, runnable
from .build import INFO
from .export import Seq2SeqDecoder, SpeechDecoder, parts_for, random_spectrogram
from .files import check_onnx, sharing
from .precision import get_precision

REFERENCE = "reference"


@dataclass
class Check:
    name: str
    status: str  # "pass" | "fail" | "skipped"
    detail: dict = field(default_factory=dict)


def _cases(model) -> list[tuple[int, int, int]]:
    """(batch, new tokens, past tokens): a prompt, a longer prompt after a past, one decoding step."""
    limit = adapter_for(model).max_positions(model.config) or 512
    cases = [(1, 7, 0), (2, 16, 5), (3, 1, 32)]
    return [(b, min(s, limit), min(p, max(0, limit - s))) for b, s, p in cases]


def _axis_sizes(batch: int, seq: int, past: int, has_past: bool) -> dict[str, int]:
    # parts without a past see the whole sequence at once
    total = seq + past
    return {
        "batch_size": batch,
        "sequence_length": seq if has_past else total,
        "total_sequence_length": total,
        "past_sequence_length": past,
        "encoder_sequence_length": total,
        "decoder_sequence_length": seq if has_past else max(2, total // 2),
        "past_decoder_sequence_length": past,
    }


def feeds_for(model, part, batch: int, seq: int, past: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random named inputs for a part, every dynamic axis sized from (batch, seq, past)."""
    g = torch.Generator().manual_seed(seed + 31 * batch + seq + 7 * past)
    sizes = _axis_sizes(batch, seq, past, bool(part.past))
    vocab = max(4, min(getattr(model.config, "vocab_size", 4), 1000))
    feeds = {}
    for name, example in part.example.items():
        shape = list(example.shape)
        for axis, axis_name in part.dynamic.get(name, {}).items():
            if axis_name == "audio_sequence_length":  # a waveform long enough for that many frames
                shape[axis] = adapter_for(model).audio_samples(model.config, sizes["total_sequence_length"])
            else:
                shape[axis] = sizes[axis_name]
        if name == "input_ids":
            feeds[name] = torch.randint(3, vocab, shape, generator=g)
        elif name.endswith("attention_mask"):
            feeds[name] = torch.ones(shape, dtype=torch.long)
        elif name == "position_ids":
            feeds[name] = torch.arange(past, past + shape[1]).expand(shape).contiguous()
        elif name == "encoder_hidden_states" and modality(model.config) == "spectrogram":
            spectrogram = random_spectrogram(model.config, shape[0], g)
            with torch.no_grad():
                feeds[name] = model.get_encoder()(input_features=spectrogram).last_hidden_state
        elif name == "encoder_hidden_states":
            ids = torch.randint(3, vocab, shape[:2], generator=g)
            with torch.no_grad():
                feeds[name] = model.get_encoder()(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        else:  # pixel values, waveforms; past key/values are replaced below
            feeds[name] = torch.randn(shape, generator=g, dtype=example.dtype)
    if part.past:
        feeds.update(_model_past(model, part, feeds, past, g))
    return feeds


def _model_past(model, part, feeds, past: int, g) -> dict[str, torch.Tensor]:
    """Past key/values the model itself produces for a random prefix (random values are not a
    state a model can be in, and they amplify float32 rounding unrealistically)."""
    names = list(part.example)[-part.past :]
    batch = feeds["input_ids"].shape[0]
    vocab = max(4, min(getattr(model.config, "vocab_size", 4), 1000))
    prefix = torch.randint(3, vocab, (batch, max(past, 1)), generator=g)
    if "position_ids" in part.example:  # causal LM: run the part itself from an empty past
        empty = {n: feeds[n][:, :, :0] for n in names}
        first = {
            "input_ids": prefix,
            "attention_mask": torch.ones_like(prefix),
            "position_ids": torch.arange(prefix.shape[1]).expand_as(prefix).contiguous(),
            **empty,
        }
        present = part.run(first)[1:]
    elif modality(model.config) == "spectrogram":  # speech seq2seq: the same from a random spectrogram
        spectrogram = random_spectrogram(model.config, batch, g)
        with torch.no_grad():
            hidden = model.get_encoder()(input_features=spectrogram).last_hidden_state
            present = list(SpeechDecoder(model, cache=True)(prefix, hidden))[1:]
    else:  # seq2seq: the first decoder step gives self and cross key/values
        enc_mask = feeds["encoder_attention_mask"]
        src = torch.randint(3, vocab, enc_mask.shape, generator=g)
        with torch.no_grad():
            hidden = model.get_encoder()(input_ids=src, attention_mask=enc_mask).last_hidden_state
            present = list(Seq2SeqDecoder(model, cache=True)(prefix, enc_mask, hidden))[1:]
    return {n: (t[:, :, :past] if ".encoder." not in n else t).contiguous() for n, t in zip(names, present)}


def check_outputs(
    folder: Path, model, provider: str, entries: dict[str, str], kv_cache: bool = False, precision: str = "fp32"
) -> Check:
    """Each part's outputs against PyTorch on several shapes, with the precision's gate (precision.py)."""
    accept = get_precision(precision).accept
    rows, ok = [], True
    emulated = False
    for part in parts_for(model, kv_cache):
        with runnable(folder / part.filename, provider) as path:  # onnxruntime holds the graph once built
            sess = open_session(path, provider, entries)
            emulated |= path != folder / part.filename
        if provider == "cuda" and sess.get_providers()[0] != "CUDAExecutionProvider":
            return Check(f"outputs[{provider}]", "skipped", {"reason": "CUDA provider fell back to CPU"})
        for batch, seq, past in _cases(model):
            feeds = feeds_for(model, part, batch, seq, past)
            refs = part.run(feeds)
            try:
                got = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
            except Exception as e:  # noqa: BLE001 - a graph that loads but cannot run fails validation
                ok = False
                rows.append(
                    {
                        "part": part.filename,
                        "case": [batch, seq, past],
                        "error": f"onnxruntime failed to run: {str(e)[:200]}",
                    }
                )
                continue
            names = [o.name for o in sess.get_outputs()]
            if names != part.outputs:
                ok = False
                rows.append({"part": part.filename, "error": f"outputs {names} != {part.outputs}"})
                continue
            for name, r, o in zip(names, refs, got):
                r = r.numpy()
                if r.shape != o.shape:
                    ok = False
                    rows.append(
                        {
                            "part": part.filename,
                            "output": name,
                            "case": [batch, seq, past],
                            "error": f"shape {o.shape} != {r.shape}",
                        }
                    )
                    continue
                verdict = accept(r, o)
                ok &= verdict["ok"]
                rows.append(
                    {
                        "part": part.filename,
                        "output": name,
                        "case": [batch, seq, past],
                        "shape": list(o.shape),
                        **verdict,
                    }
                )
    detail = {"rows": rows, **({"emulated": EMULATED} if emulated else {})}
    return Check(f"outputs[{provider}]", "pass" if ok else "fail", detail)


def unique_param_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def buffer_bytes(model) -> int:
    """Float and bool buffers (rotary tables, causal masks): constants the graph may hold besides weights
    (integer ones are counted with the graph's index constants)."""
    seen, total = set(), 0
    for b in model.buffers():
        if (b.is_floating_point() or b.dtype == torch.bool) and id(b) not in seen:
            seen.add(id(b))
            total += b.numel() * b.element_size()
    return total


def validate(
    folder,
    *,
    reference=None,
    providers=("cpu",),
    side_by_side=True,
    runs: int = 20,
    log=lambda s: None,
    text_check=None,
) -> dict:
    """Run every check; `report["ok"]` is True only if none failed. `side_by_side`: measure file, memory
    and latency against the original model under onnxruntime defaults and the paper's practice."""
    folder = Path(folder)
    info_path = folder / INFO
    if not info_path.exists():
        raise InputError(
            f"{folder} has no {INFO}: give a folder written by `ffmerge-onnx convert` "
            "(or validate_graph() for any other ONNX model)."
        )
    try:
        info = json.loads(info_path.read_text())
        files = [str(f) for f in info["files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{info_path} is not valid ({type(e).__name__}); re-run `ffmerge-onnx convert`.") from e
    entries = session_entries(folder / SESSION_SETTINGS)
    for f in files:
        if f.endswith(".onnx"):
            check_onnx(folder / f)  # before onnxruntime sees it: safe paths, sizes that match
            check_loads(folder / f, entries)  # and onnxruntime does not crash on it
    ref_dir = Path(reference) if reference else folder / REFERENCE
    if not ref_dir.exists():
        raise InputError(f"No reference model at {ref_dir}: pass --reference MODEL_DIR (a folder written by merge).")
    result = load_merged(ref_dir)
    model = result.model
    kv_cache = bool(info.get("kv_cache", False))
    precision = info.get("precision", "fp32")
    checks = [check_outputs(folder, model, "cpu", entries, kv_cache, precision)]
    for p in providers:
        if p == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                checks.append(Check("outputs[cuda]", "skipped", {"reason": "onnxruntime has no CUDA provider here"}))
            else:
                checks.append(check_outputs(folder, model, "cuda", entries, kv_cache, precision))
    if precision != "fp32" and text_check is not None:  # quality/textcheck.py: real text below fp32
        checks.append(text_check(folder, ref_dir, model, info.get("task", "unknown"), precision))
    parts = parts_for(model, kv_cache)
    share_rows = {}
    for part in parts:
        files = [f for f in info["files"] if f.startswith(part.filename)]
        share_rows[part.filename] = sharing(folder / part.filename, files)
    file_bytes = sum(r["file_bytes"] for r in share_rows.values())
    dups = sum(r["duplicated_tensors"] for r in share_rows.values())
    sharing_detail = {"files": share_rows, "file_bytes": file_bytes, "duplicated_tensors": dups}
    if len(parts) == 1:  # seq2seq parts each hold only some of the parameters
        params = unique_param_bytes(model)
        init = sum(r["unique_bytes"] for r in share_rows.values())
        index = sum(compare.initializer_bytes(folder / p.filename)["index_bytes"] for p in parts)  # shapes, indices
        buffers = buffer_bytes(model)
        sharing_detail.update(
            unique_param_bytes=params,
            integer_constant_bytes=index,
            buffer_bytes=buffers,
            file_over_params=file_bytes / params,
            initializers_over_params=(init - index) / params,
            initializers_over_params_and_buffers=(init - index) / (params + buffers),
        )
    ok = dups == 0 and (len(parts) > 1 or init - index <= 1.01 * (params + buffers))
    checks.append(Check("sharing", "pass" if ok else "fail", sharing_detail))
    table = None
    if side_by_side and result.manifest.windows:
        table = compare.side_by_side(compare.measure_variants(folder, result, info, entries, runs, feeds_for, log))
        checks += [Check(name, status, detail) for name, status, detail in compare.checks(table)]
    report = {"folder": str(folder), "mode": info.get("mode"), "precision": precision, "onnxruntime": ort.__version__,
              "session_config_entries": entries, "checks": [asdict(c) for c in checks]}  # fmt: skip
    if table is not None:
        report["side_by_side"] = table
    report["ok"] = all(c.status != "fail" for c in checks)
    return report


VARIANT_NAMES = {
    "merged": "merged (written settings)",
    compare.BASELINE: "unmerged, onnxruntime defaults",
    "paper_practice": "paper's practice, defaults",
}


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def side_by_side_lines(table: dict) -> list[str]:
    """The side-by-side figures as two markdown tables (also printed by the CLI)."""
    recipe = ", ".join(f"{k}={v}" for k, v in MALLOC_RECIPE.items())
    lines = [
        (
            f"Baseline: {table['baseline']}. Each figure: fresh processes, 3 repeats, medians, 1 intra-op thread; "
            "RSS growth over the process after its imports; trimmed = after malloc_trim(0); recipe = a process "
            f"started with {recipe}."
        ),
        "",
        "| part, shape | model | file MB | peak MB | steady MB | steady, trimmed MB | steady, recipe MB | latency ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in table["rows"].items():
        for variant, label in VARIANT_NAMES.items():
            f = r["figures"][variant]
            lines.append(
                f"| {key} | {label} | {_mb(f['file_bytes'])} | {_mb(f['peak'])} | {_mb(f['steady'])} | "
                f"{_mb(f['steady_trimmed'])} | {_mb(f['steady_recipe'])} | {_ms(f['latency_ms'])} |"
            )
    lines += [
        "",
        (
            "| part, shape | merged away MB | file saving / away | steady saving / away (trimmed, recipe, as held) | "
            "peak merged / unmerged | latency merged / unmerged | latency merged / paper's practice |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in table["rows"].items():
        lines.append(
            f"| {key} | {_mb(r['merged_away_bytes'])} | {_ratio(r['file_saving_over_away'])} | "
            f"{_ratio(r['trimmed_saving_over_away'])}, {_ratio(r['recipe_saving_over_away'])}, "
            f"{_ratio(r['steady_saving_over_away'])} | {_ratio(r['peak_ratio'])} | {_ratio(r['latency_ratio'])} | "
            f"{_ratio(r['latency_ratio_vs_paper'])} |"
        )
    return lines


def summary(report: dict) -> str:
    """A readable report.md."""
    lines = [
        f"# ffmerge-onnx validation: {'PASS' if report['ok'] else 'FAIL'}",
        "",
        (
            f"folder `{report['folder']}`, mode `{report['mode']}`, precision `{report.get('precision', 'fp32')}`, "
            f"onnxruntime {report.get('onnxruntime', '?')}, "
            f"session config entries {report.get('session_config_entries', {})}"
        ),
        "",
    ]
    for c in report["checks"]:
        lines.append(f"## {c['name']}: {c['status']}")
        d = c["detail"]
        if c["name"].startswith("outputs") and "rows" in d:
            lines += ["| part | output | case | max abs | cosine | tolerance | ok |", "|---|---|---|---|---|---|---|"]
            lines += [
                f"| {r['part']} | {r.get('output', '')} | {r.get('case', '')} | {r.get('max_abs', float('nan')):.2e} | "
                f"{r.get('cosine', float('nan')):.4f} | {r.get('tolerance', float('nan')):.2e} | "
                f"{'✓' if r.get('ok') else '✗ ' + r.get('error', '')} |"
                for r in d["rows"]
            ]
        elif c["name"] == "sharing":
            lines.append(
                f"file bytes {d['file_bytes']:,}; duplicated tensors {d['duplicated_tensors']}"
                + (
                    f"; file / unique parameter bytes {d['file_over_params']:.4f}; initializer / parameter "
                    f"and buffer bytes {d.get('initializers_over_params_and_buffers', float('nan')):.4f} "
                    "(gate <= 1.01)"
                    if "file_over_params" in d
                    else ""
                )
            )
        elif d:
            lines.append(f"{d.get('target') or d.get('note') or ''} {d.get('reason', '')}".strip())
        lines.append("")
    if "side_by_side" in report:
        lines += ["## side by side", "", *side_by_side_lines(report["side_by_side"]), ""]
    return "\n".join(lines)
