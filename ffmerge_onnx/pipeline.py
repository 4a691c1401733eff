"""The pipeline, in order, in one place:

    load -> windows -> calibrate -> merge -> recover -> save -> export -> passes -> validate [-> goal]

`merge_and_recover` runs the steps up to recovery and returns a MergeResult; the `merge` command
saves it (`run_merge`); `export` saves the reference checkpoint, exports, runs the graph passes and
validates, into a folder that appears only when everything passed; `convert` is all of it. Windows
are given, or (--reduction, --method auto) chosen with the method on validation data (quality/plan.py);
the goal (--max-loss) scores the result on held-out data (quality/goal.py). The window search and the
similarity analysis share the load and calibration steps."""

from __future__ import annotations

import copy
import gc
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import nn

from . import distributed
from .errors import CalibrationError, InputError, ValidationFailed
from .families import adapter_for, modality, speech, task_of
from .families.builtin import (
    DEFAULT_LAYERS,
    bbc_articles,
    default_model,
    write_calibration_images,
    write_calibration_text,
)
from .families.loading import load_model, load_preprocessor
from .fsutil import atomic_dir, guarded_output
from .merging import Calibration, MergeResult, load_calibration, load_merged, merge, save_merged, windows_for
from .merging.manifest import MANIFEST_NAME
from .merging.methods import get_method
from .merging.methods import method_params as method_params_for
from .merging.windows import check_windows
from .onnx.build import INFO, BuildOptions, build, write_info
from .onnx.precision import PrecisionOptions, get_precision
from .onnx.validate import REFERENCE, summary, validate
from .quality import analyze, goal, plan
from .quality import search as window_search
from .quality.finetune import recover
from .quality.search import default_score
from .quality.textcheck import check_text_quality
from .runtime import trim_heap, version_warning

Log = Callable[[str], None]


@dataclass(frozen=True)
class MergeOptions:
    """What to merge and how (the `merge` and `convert` options)."""

    layers: str | None = None  # e.g. "3-5" or "0-2,6-8"; "auto": found for `reduction`; None: the built-in default
    stack: str | None = None  # None: every stack of a seq2seq model, else the only one
    anchor: str = "first"
    align: str = "correlation"
    method: str = "average"  # or "auto": the best of plan.CANDIDATE_METHODS per window on validation data
    method_params: dict = field(default_factory=dict)  # overrides of the method's declared parameters
    calibration: Path | None = None  # None: built-in data for the model's modality
    calibration_tokens: int = 10_000
    reduction: float | None = None  # remove at least this fraction of the parameters (windows found: plan.py)
    validation: Path | None = None  # what automatic choices are scored on (None: the built-in validation split)
    validation_tokens: int = 10_000
    top: int = 3  # window sets scored on validation

    def __post_init__(self):
        if self.layers == plan.AUTO and self.reduction is None:
            raise InputError(
                "--layers auto finds windows for --reduction F: give the fraction of parameters to remove."
            )
        if self.reduction is not None and not 0 < self.reduction < 1:
            raise InputError(f"--reduction is a fraction of the parameters in (0, 1), e.g. 0.1; got {self.reduction}.")
        if self.top < 1:
            raise InputError(f"--top must be 1 or more; got {self.top}.")

    @property
    def automatic(self) -> bool:
        return self.layers == plan.AUTO or self.method == plan.AUTO or self.reduction is not None


@dataclass(frozen=True)
class RecoveryOptions:
    """The recovery fine-tune after merging (none when steps is 0)."""

    steps: int = 0
    lr: float = 5e-5
    data: Path | None = None  # None: the built-in calibration split
    tokens: int = 50_000
    objective: str | None = None  # None: the task's default
    train: str = "all"
    schedule: str = "constant"
    minutes: float = 0.0  # time budget for training (evaluations not counted); 0: steps alone decide
    shard: bool = False  # under torchrun: FSDP2 instead of DDP
    rows: int | None = None  # rows per training step (0: the data's batches; None: the task's default)

    @property
    def active(self) -> bool:
        return self.steps > 0 or self.minutes > 0


@dataclass(frozen=True)
class ExportOptions:
    """How the merged model becomes an ONNX folder."""

    mode: str = "fold"
    simplifier: str = "onnxslim"
    external_data: bool = False
    kv_cache: bool = False
    prepack: bool = True  # False: session.disable_prepacking=1 in the written settings (onnxruntime < 1.23)
    keep_reference: bool = True
    providers: tuple[str, ...] = ("cpu",)
    compare: bool = True  # measure against the original model and the paper's practice, side by side
    runs: int = 20  # timed runs per measuring process
    precision: str = "fp32"  # onnx/precision.py PRECISIONS
    block_size: int = 32  # int8, int4: weights per scale
    accuracy_level: int | None = None  # int8, int4: MatMulNBits compute type
    max_loss: float | None = None  # quality goal: relative loss on the evaluation data at most this (quality/goal.py)
    eval_data: Path | None = None  # held-out data for the goal (default: the task's built-in test split)
    on_miss: str = "nothing"  # goal missed: write nothing, or "best": write the model, marked as missing it

    def __post_init__(self):
        get_precision(self.precision)
        goal.check_goal_inputs("any", self.max_loss, self.eval_data)
        if self.on_miss not in goal.ON_MISS:
            raise InputError(f"--on-miss is one of {', '.join(goal.ON_MISS)}; got {self.on_miss!r}.")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise InputError(f"--block-size is a power of 2, 16 or more; got {self.block_size}.")

    def build_options(self) -> BuildOptions:
        return BuildOptions(
            mode=self.mode,
            simplifier=self.simplifier,
            external_data=self.external_data,
            kv_cache=self.kv_cache,
            prepack=self.prepack,
            precision=PrecisionOptions(self.precision, self.block_size, self.accuracy_level),
        )


@dataclass
class Loaded:
    """A model as loaded, with its preprocessor (tokenizer or image processor)."""

    spec: str
    model: nn.Module
    preprocessor: object
    merged: MergeResult | None = None  # a folder written by `merge`: its record, ties kept


# -- the steps ---------------------------------------------------------------------------
def load(spec: str | None, trust_remote_code: bool = False, log: Log = print) -> Loaded:
    """Step 1: the model (default: the built-in all-MiniLM-L6-v2) and its preprocessor."""
    path = spec or default_model()
    log(f"loading {spec or 'built-in all-MiniLM-L6-v2'}")
    folder = Path(path)
    if folder.is_dir() and (folder / MANIFEST_NAME).exists():
        if (folder / "model.onnx").exists() or (folder / "encoder_model.onnx").exists():
            raise InputError(
                f"{folder} is an ONNX folder written by `convert`; give its reference/ folder, or the original model."
            )
        merged = load_merged(folder)
        return Loaded(path, merged.model, load_preprocessor(path), merged)
    model = load_model(path, trust_remote_code=trust_remote_code)
    adapter = adapter_for(model)
    if adapter.name.startswith("inferred:"):
        stacks = ", ".join(
            f"{s} {adapter.stacks[s][0]} ({adapter.num_layers(model, s)} layers)" for s in adapter.stacks
        )
        ff = ", ".join(f"{k} {v[0]}" for k, v in adapter.projections.items() if v)
        log(f"no reviewed adapter for {model.config.model_type}: inferred {stacks}; FF {ff} "
            "(review it with `ffmerge-onnx inspect`, fix it with --adapter FILE)")  # fmt: skip
    return Loaded(path, model, load_preprocessor(path))


def calibration_data(
    loaded: Loaded, path: Path | None, tokens: int, split: str = "calibration", log: Log = print
) -> Calibration:
    """Step 3: batches of model inputs from `path`, or the built-in data for the model's modality."""
    if path is not None:
        return load_calibration(
            path, model=loaded.model, tokenizer=loaded.preprocessor, processor=loaded.preprocessor, budget=tokens
        )
    with tempfile.TemporaryDirectory(prefix="ffmerge-cal-") as folder:
        if task_of(loaded.model) == "image-classification":
            path = write_calibration_images(Path(folder), split)
            log(f"{split}: built-in Fashion-MNIST train images ({tokens} tokens)")
        elif modality(loaded.model.config) in ("audio", "spectrogram"):
            path = _builtin_audio(loaded, Path(folder), split, tokens)
            log(f"{split}: built-in synthetic speech-like audio ({tokens} frames)")
        else:
            if not bbc_articles():
                raise CalibrationError("No calibration data: pass --calibration PATH.")
            path = write_calibration_text(Path(folder), split)
            log(f"{split}: built-in BBC news text ({tokens} tokens)")
        return load_calibration(
            path, model=loaded.model, tokenizer=loaded.preprocessor, processor=loaded.preprocessor, budget=tokens
        )


def _builtin_audio(loaded: Loaded, folder: Path, split: str, frames: int) -> Path:
    """Built-in clips holding `frames` encoder frames: 4 s each for a waveform encoder; for a speech
    encoder-decoder, one feature-extractor window each (Whisper: 30 s) with BBC text of the same split as
    transcripts."""
    config = loaded.model.config
    if modality(config) == "audio":
        seconds, per_clip, texts = 4.0, adapter_for(loaded.model).audio_frames(config, 4 * speech.RATE), ()
    else:
        window = getattr(getattr(loaded.preprocessor, "feature_extractor", None), "chunk_length", 30)
        seconds, per_clip = float(window), adapter_for(loaded.model).spectrogram_positions(config)
        if not bbc_articles():
            raise CalibrationError("No transcripts for the built-in audio: pass --calibration PATH.")
        texts = speech.transcripts_from([p.read_text(errors="replace") for p in bbc_articles(split)])
    return speech.write_calibration_audio(folder, split, seconds, max(2, -(-frames // per_clip)), texts)


def merge_and_recover(
    loaded: Loaded, options: MergeOptions, recovery: RecoveryOptions = RecoveryOptions(), log: Log = print
) -> MergeResult:
    """Steps 2-5: windows, calibration, merge (in place) and, with recovery steps, the recovery fine-tune."""
    model = loaded.model
    if options.calibration_tokens < 1:
        raise CalibrationError(f"--calibration-tokens must be 1 or more; got {options.calibration_tokens}.")
    if min(recovery.steps, recovery.minutes, recovery.rows or 0) < 0 or recovery.tokens < 1 or not recovery.lr > 0:
        raise InputError(
            "--finetune-steps, --recovery-minutes and --finetune-batch must be 0 or more, --finetune-tokens and "
            "--finetune-lr above 0."
        )
    no_data = options.calibration is None and options.validation is None and loaded.preprocessor is None
    if no_data and options.method == plan.AUTO and options.layers != plan.AUTO and options.reduction is None:
        log("method auto scores the methods on data, and there is none (no --calibration and no tokenizer or "
            "image processor for the built-in data): merging with average")  # fmt: skip
        options = replace(options, method="average")
    if loaded.merged is not None and options.layers is None and not options.automatic:
        log(f"{loaded.spec} is merged already ({_windows_text(loaded.merged)}); no new window given")
        result = loaded.merged
        original = load_model(result.manifest.source) if recovery.active else None
    elif options.automatic:
        original = copy.deepcopy(model) if recovery.active else None
        result = _planned(loaded, options, log)
    else:
        layers = DEFAULT_LAYERS if options.layers is None else options.layers
        windows = windows_for(adapter_for(model), layers, options.stack)
        needed = options.align == "correlation" or get_method(options.method).needs_calibration
        cal = calibration_data(loaded, options.calibration, options.calibration_tokens, log=log) if needed else None
        original = copy.deepcopy(model) if recovery.active else None
        result = merge(
            loaded.merged or model,
            windows,
            anchor=options.anchor,
            align=options.align,
            calibration=cal,
            source=loaded.merged.manifest.source if loaded.merged else loaded.spec,
            method=options.method,
            params=options.method_params,
        )
    distributed.check_identical(result.model)
    if recovery.active:
        batches = list(calibration_data(loaded, recovery.data, recovery.tokens, log=log))
        val = list(calibration_data(loaded, None, min(recovery.tokens, 8_000), split="validation", log=log))
        out = recover(
            result,
            original,
            batches,
            val,
            steps=recovery.steps or RECOVERY_STEPS_CAP,
            lr=recovery.lr,
            objective=recovery.objective,
            train=recovery.train,
            schedule=recovery.schedule,
            budget_s=recovery.minutes * 60 or None,
            shard=recovery.shard,
            rows=recovery.rows,
        )
        name = result.manifest.finetune["score"]
        log(
            f"recovered {out.history[-1]['step']} steps in {out.history[-1]['seconds'] / 60:.1f} min: {name} "
            f"{out.history[0]['score']:.4f} -> {out.best_score:.4f} (best at step {out.best_step})"
        )
    return result


RECOVERY_STEPS_CAP = 1_000_000  # --recovery-minutes without --finetune-steps: the time budget decides


def _planned(loaded: Loaded, options: MergeOptions, log: Log) -> MergeResult:
    """Windows found for --reduction and/or a method chosen per window, on validation data (quality/plan.py)."""
    if loaded.merged is not None and (options.layers == plan.AUTO or options.reduction is not None):
        raise InputError(
            f"{loaded.spec} is merged already; --reduction and --layers auto start from the original model "
            f"({loaded.merged.manifest.source}). Give the further windows with --layers A-B."
        )
    model = loaded.model
    adapter = adapter_for(model)
    stacks = [options.stack] if options.stack else adapter.stack_names()
    layers = options.layers if options.layers is not None else plan.AUTO if options.reduction is not None else None
    layers = DEFAULT_LAYERS if layers is None else layers
    spans = None
    if layers != plan.AUTO:
        given = windows_for(adapter, layers, stacks[-1])
        check_windows(model, adapter, given)
        spans = [(w.start, w.end) for w in given]
        if options.reduction is not None:
            removed = plan.removed_fraction(model, spans, stacks)
            if removed < options.reduction - 1e-9:
                raise InputError(
                    f"--layers {layers} removes {removed:.2%} of the parameters, less than --reduction "
                    f"{options.reduction:.2%}; give larger windows or --layers auto."
                )
    cal = calibration_data(loaded, options.calibration, options.calibration_tokens, log=log)
    cal, val = _validation(loaded, options, cal, log)
    chosen = plan.choose(loaded.merged or model, cal, val, stacks=stacks, reduction=options.reduction, windows=spans,
                         method=options.method, params=options.method_params, anchor=options.anchor,
                         align=options.align, top=options.top, log=log)  # fmt: skip
    log(plan.lines(chosen.to_dict())[0])
    source = loaded.merged.manifest.source if loaded.merged else loaded.spec
    return plan.apply(loaded.merged or model, chosen, cal, source=source, anchor=options.anchor, align=options.align)


def _validation(loaded: Loaded, options: MergeOptions, cal: Calibration, log: Log) -> tuple[Calibration, list]:
    """Calibration and validation batches for the automatic choices: --validation or the built-in split, or
    (no preprocessor to read the built-in data with) the last quarter of the calibration batches, held out."""
    if options.validation is not None or loaded.preprocessor is not None:
        val = calibration_data(loaded, options.validation, options.validation_tokens, split="validation", log=log)
        return cal, list(val)
    if len(cal.batches) < 2:
        raise CalibrationError(
            "--method auto and --reduction score their choices on validation data: pass --validation PATH (no "
            "tokenizer or image processor came with the model to read the built-in data), or --method average."
        )
    cut = max(1, len(cal.batches) // 4)
    log(f"validation: the last {cut} of the {len(cal.batches)} calibration batches, held out (no preprocessor "
        "for the built-in data; --validation PATH to choose)")  # fmt: skip
    kept = len(cal.batches) - cut
    return replace(cal, batches=cal.batches[:kept], tokens=cal.tokens * kept // len(cal.batches)), cal.batches[kept:]


def _windows_text(result: MergeResult) -> str:
    return ", ".join(f"{w.stack} {w.start}-{w.end}" for w in result.manifest.windows) or "no windows"


def export(
    result: MergeResult,
    output: Path,
    options: ExportOptions = ExportOptions(),
    *,
    preprocessor=None,
    overwrite: bool = False,
    release: bool = False,
    log: Log = print,
) -> dict:
    """Steps 6-9: save the reference, export, run the graph passes, validate; nothing is left behind
    unless it validates. Returns the validation report. `release`: the caller is done with the model, so
    its weights are freed once exported (validation reads the saved reference)."""
    output = Path(output)
    model = result.model
    with atomic_dir(output, overwrite=overwrite) as tmp:
        log("saving the merged checkpoint (reference)")
        save_merged(result, tmp / REFERENCE, preprocessor=preprocessor)
        shutil.copy(tmp / REFERENCE / MANIFEST_NAME, tmp / MANIFEST_NAME)
        log("exporting to ONNX and rewriting")
        build_options = options.build_options()
        built = build(result, tmp, build_options)
        write_info(tmp, result, build_options, built)
        # config next to the ONNX files, so optimum's ORTModel classes load the folder as it is
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if preprocessor is not None:
            preprocessor.save_pretrained(tmp)
        removed = goal.removed_fraction(result)  # counts tied tensors once: before they are released
        if release:
            model.to("meta")  # new Parameters per module: the ties are gone, the weights freed
        gc.collect()
        trim_heap()  # the exporter's and passes' freed memory back to the OS before sessions are built
        log("validating on onnxruntime")
        report = validate(tmp, providers=options.providers, side_by_side=options.compare, runs=options.runs, log=log,
                          text_check=check_text_quality)  # fmt: skip
        report["folder"] = str(output)
        report["passes"] = built.passes
        if result.plan:
            report["plan"] = result.plan
        _write_report(tmp, report)
        if not report["ok"]:
            error = ValidationFailed(f"validation failed; nothing was written to {output}.\n" + summary(report))
            error.report = report  # the figures, for callers that want them anyway (benchmarks)
            raise error
        if options.max_loss is not None:
            quality = goal.judge(goal.score(tmp, tmp / REFERENCE, result.manifest.source, options.eval_data, log=log),
                                 options.max_loss, recovered=bool(result.manifest.finetune),
                                 methods_tried=plan.methods_tried(result.plan))  # fmt: skip
            quality.update(params_removed_fraction=removed,
                           recovery=goal.recovery_summary(result.manifest.finetune),
                           windows=[f"{w.stack} {w.start}-{w.end} ({w.method})" for w in result.manifest.windows])  # fmt: skip
            report["quality"] = quality
            _write_report(tmp, report)
            if not quality["ok"]:
                if options.on_miss != "best":
                    error = goal.QualityGoalMissed(f"quality goal missed; nothing was written to {output}: "
                                                   f"{quality['advice']}.")  # fmt: skip
                    error.report = report
                    raise error
                log(f"quality goal missed: {quality['advice']}; writing the model anyway (--on-miss best), marked "
                    "as missing the goal in report.md and report.json")  # fmt: skip
        if not options.keep_reference:
            shutil.rmtree(tmp / REFERENCE)
    return report


def _write_report(folder: Path, report: dict) -> None:
    """report.json, and report.md with the automatic choices and the quality goal when there are any."""
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    text = summary(report)
    if "quality" in report and not report["quality"]["ok"]:
        text = "# QUALITY GOAL MISSED\n\n" + text
    if "plan" in report:
        text += "\n## windows and method (chosen on validation data)\n\n" + "\n".join(plan.lines(report["plan"]))
    if "quality" in report:
        text += "\n\n## quality goal\n\n" + "\n".join(goal.goal_lines(report["quality"]))
    (folder / "report.md").write_text(text + "\n")


# -- the commands ------------------------------------------------------------------------
def run_merge(
    spec: str | None,
    output: Path,
    options: MergeOptions,
    recovery: RecoveryOptions = RecoveryOptions(),
    *,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    log: Log = print,
) -> tuple[MergeResult, int]:
    """load -> ... -> recover -> save; returns the result and the parameter count before merging."""
    main = distributed.world().main
    with guarded_output(output, overwrite, [spec, options.calibration, recovery.data], lock=main) as target:
        loaded = load(spec, trust_remote_code, log)
        before = loaded.model.num_parameters()
        result = merge_and_recover(loaded, options, recovery, log)
        if main:  # under torchrun rank 0 writes; the others wait for it
            save_merged(result, target, preprocessor=loaded.preprocessor, overwrite=overwrite)
        distributed.barrier()
    return result, before


def convert(
    spec: str | None,
    output: Path,
    options: MergeOptions = MergeOptions(),
    recovery: RecoveryOptions = RecoveryOptions(),
    export_options: ExportOptions = ExportOptions(),
    *,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    log: Log = print,
) -> dict:
    """The whole pipeline into `output`; returns the validation report."""
    inputs = [spec, options.calibration, options.validation, recovery.data, export_options.eval_data]
    held_out = export_options.eval_data
    for name, path in (("--calibration", options.calibration), ("--validation", options.validation),
                       ("--finetune-data", recovery.data)):  # fmt: skip
        if held_out is not None and path is not None and Path(path).resolve() == Path(held_out).resolve():
            raise InputError(f"--eval-data is held out: it cannot also be the {name} data. Give separate files.")
    main = distributed.world().main
    with guarded_output(output, overwrite, inputs, lock=main) as target:
        warning = version_warning()
        if warning:
            log(f"warning: {warning}")
        loaded = load(spec, trust_remote_code, log)
        goal.check_goal_inputs(task_of(loaded.model), export_options.max_loss, export_options.eval_data)
        result = merge_and_recover(loaded, options, recovery, log)
        report = None
        if main:  # under torchrun rank 0 exports, validates and writes; the others wait for its report
            report = export(result, target, export_options, preprocessor=loaded.preprocessor, overwrite=overwrite,
                            release=True, log=log)  # fmt: skip
        return distributed.broadcast_object(report)


def run_quantize(
    folder: Path,
    output: Path,
    options: ExportOptions,
    *,
    overwrite: bool = False,
    log: Log = print,
) -> dict:
    """A finished convert folder at another precision: its reference (the merged checkpoint) exported
    again with the same mode and layout, then the precision step and validation."""
    folder = Path(folder)
    if not (folder / INFO).is_file():
        raise InputError(f"{folder} is not a folder written by `ffmerge-onnx convert` (no {INFO}).")
    if not (folder / REFERENCE / MANIFEST_NAME).is_file():
        raise InputError(
            f"{folder} has no {REFERENCE}/ folder (it was converted with --no-reference): quantize starts from the "
            "merged checkpoint, not from a graph already rounded. Convert again without --no-reference."
        )
    try:
        info = json.loads((folder / INFO).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{folder / INFO} is not valid JSON; re-run `ffmerge-onnx convert`.") from e
    with guarded_output(output, overwrite, [folder]) as target:
        result = load_merged(folder / REFERENCE)
        log(f"exporting {folder} ({info.get('mode', 'fold')}) at precision {options.precision}")
        options = replace(options, mode=info.get("mode", "fold"), kv_cache=bool(info.get("kv_cache", False)),
                          simplifier=info.get("simplifier", "onnxslim"), prepack=bool(info.get("prepack", True)))  # fmt: skip
        preprocessor = load_preprocessor(str(folder))
        return export(result, target, options, preprocessor=preprocessor, overwrite=overwrite, log=log)


def run_search(
    spec: str | None,
    output: Path,
    *,
    merge_count: int | None,
    reduction: float | None,
    mode: str = "full",
    top: int = 3,
    stack: str | None = None,
    anchor: str = "first",
    method: str = "average",
    method_params: dict | None = None,
    calibration: Path | None = None,
    validation: Path | None = None,
    calibration_tokens: int = 10_000,
    validation_tokens: int = 10_000,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    log: Log = print,
) -> dict:
    """load -> calibrate -> score every candidate window on validation data -> search.json + search.png."""
    if (merge_count is None) == (reduction is None):
        raise InputError("Give exactly one of --merge-count K or --reduction FRACTION.")
    if top < 1:
        raise InputError(f"--top must be 1 or more; got {top}.")
    if min(calibration_tokens, validation_tokens) < 1:
        raise CalibrationError("--calibration-tokens and --validation-tokens must be 1 or more.")
    with guarded_output(output, overwrite, [spec, calibration, validation]) as target:
        loaded = load(spec, trust_remote_code, log)
        model = loaded.model
        stacks = [stack] if stack else adapter_for(model).stack_names()
        params = method_params_for(method, method_params)
        kept = float(params.get("budget", 0.0)) if params.get("rank", 0) == -1 else 0.0  # delta's corrections
        k = merge_count if merge_count is not None else plan.layers_needed(model, reduction, stacks, kept) + 1
        cal = calibration_data(loaded, calibration, calibration_tokens, log=log)
        val = calibration_data(loaded, validation, validation_tokens, split="validation", log=log)
        score, higher, name = default_score(model, val)
        result = window_search.search(
            model,
            k,
            cal,
            score,
            higher_is_better=higher,
            stacks=stacks,
            mode=mode,
            top=top,
            anchor=anchor,
            method=method,
            params=params,
            progress=True,
        )
        result.update(model=loaded.spec, score_name=name)
        with atomic_dir(target, overwrite=overwrite) as tmp:
            window_search.write(result, tmp)
        return result


def run_analyze(
    spec: str | None,
    output: Path,
    *,
    calibration: Path | None = None,
    calibration_tokens: int = 10_000,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    log: Log = print,
) -> dict:
    """load -> calibrate -> layer-by-layer FF similarity -> similarity.json + heatmaps."""
    with guarded_output(output, overwrite, [spec, calibration]) as target:
        loaded = load(spec, trust_remote_code, log)
        cal = calibration_data(loaded, calibration, calibration_tokens, log=log)
        result = analyze.similarity(loaded.model, cal)
        with atomic_dir(target, overwrite=overwrite) as tmp:
            analyze.write(result, tmp)
    return result
