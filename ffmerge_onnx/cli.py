"""The `ffmerge-onnx` command line: it parses and prints; the work is in pipeline.py. Choices and their
help come from the registries they live in. Errors become one clear line and a documented exit code."""

from __future__ import annotations

import contextlib
import errno
import json
import signal
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from . import errors
from .fsutil import check_report, write_text
from .merging.align import ALIGNERS, ANCHORS
from .merging.methods import METHODS
from .merging.methods.delta import DELTA
from .onnx.build import SIMPLIFIER_CHOICES
from .onnx.precision import PRECISIONS
from .quality.finetune import OBJECTIVES, SCHEDULES, TRAINABLE
from .quality.goal import ON_MISS
from .quality.search import SEARCH_MODES
from .runtime import MODES

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Merge Transformer FF sublayers and ship them as smaller ONNX models.",
)
console = Console(stderr=True)


def _choice(name: str, names) -> type[Enum]:
    return Enum(name, {n: n for n in names}, type=str)


def _help(lead: str, registry) -> str:
    described = "; ".join(f"{k}: {v.help if hasattr(v, 'help') else v}" for k, v in registry.items())
    return f"{lead} {described}."


Anchor = _choice("Anchor", ANCHORS)
Align = _choice("Align", ALIGNERS)
Method = _choice("Method", METHODS)
AUTO_METHOD = {"auto": "each window merged with every method but delta and scored on validation data; the best wins"}
MergeMethod = _choice("MergeMethod", [*AUTO_METHOD, *METHODS])
Objective = _choice("Objective", OBJECTIVES)
Train = _choice("Train", TRAINABLE)
Schedule = _choice("Schedule", SCHEDULES)
Mode = _choice("Mode", MODES)
Simplifier = _choice("Simplifier", SIMPLIFIER_CHOICES)
SearchMode = _choice("SearchMode", SEARCH_MODES)
Precision = _choice("Precision", PRECISIONS)
OnMiss = _choice("OnMiss", ON_MISS)

PrecisionOpt = Annotated[
    Precision, typer.Option("--precision", help=_help("Weights after the graph passes.", PRECISIONS))
]
BlockSizeOpt = Annotated[int, typer.Option("--block-size", help="int8, int4: weights per scale (power of 2, >= 16).")]
AccuracyOpt = Annotated[
    int | None,
    typer.Option(
        "--accuracy-level", help="int8, int4: MatMulNBits compute type (4: int8 activations; int8's default)."
    ),
]

Out = Annotated[Path, typer.Option("-o", "--output", help="Output folder.")]
ModelArg = Annotated[
    str | None, typer.Argument(help="Model folder, .gguf file or hub id (default: built-in all-MiniLM-L6-v2).")
]
LayersOpt = Annotated[
    str | None,
    typer.Option(
        "--layers",
        "--windows",
        help="Window(s) to merge, inclusive: 3-5 or 0-2,6-8; auto: found for --reduction (the default when it is given).",
    ),
]
ReductionOpt = Annotated[
    float | None,
    typer.Option(
        "--reduction",
        help="Remove at least this fraction of the parameters: the windows (one to three) are ranked by neuron "
        "alignment and confirmed on validation data.",
    ),
]
ValidationOpt = Annotated[
    Path | None,
    typer.Option(
        "--validation",
        help="Data the automatic choices are scored on (default: the built-in validation split; never the "
        "--eval-data).",
    ),
]
ValTokensOpt = Annotated[int, typer.Option("--validation-tokens", help="Token budget for validation data.")]
TopOpt = Annotated[int, typer.Option("--top", help="Window sets scored on validation data with --reduction.")]
MinutesOpt = Annotated[
    float,
    typer.Option(
        "--recovery-minutes",
        help="Recovery fine-tune for this many minutes of training (with --finetune-steps: whichever ends first).",
    ),
]
AdapterOpt = Annotated[
    Path | None,
    typer.Option(
        "--adapter",
        help="JSON adapter describing the model's stacks and FF projections (start from `inspect --adapter-out`); "
        "default: the reviewed one for its type, else one inferred from the model.",
    ),
]


def _use_adapter(path: Path | None) -> None:
    if path is not None:
        from .families.adapter import use_adapter

        use_adapter(path)


StackOpt = Annotated[
    str | None,
    typer.Option(
        "--stack",
        help="Which stack the window is in: encoder or decoder of a seq2seq model, stage<i> of a Swin-style model "
        "(`inspect` lists them; default: every stack).",
    ),
]
AnchorOpt = Annotated[Anchor, typer.Option("--anchor", help=_help("Layer the others are aligned to.", ANCHORS))]
AlignOpt = Annotated[Align, typer.Option("--align", help=_help("Neuron alignment.", ALIGNERS))]
MethodOpt = Annotated[Method, typer.Option("--method", help=_help("How aligned FF tensors become one.", METHODS))]
AutoMethodOpt = Annotated[
    MergeMethod,
    typer.Option("--method", help=_help("How aligned FF tensors become one.", {**AUTO_METHOD, **METHODS})),
]
CalOpt = Annotated[
    Path | None, typer.Option("--calibration", help="Text file/folder, image folder, or .pt/.safetensors tensors.")
]
TokensOpt = Annotated[int, typer.Option("--calibration-tokens", help="Token budget for calibration.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")]
RemoteOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow code from the model folder to run (off by default).")
]
StepsOpt = Annotated[int, typer.Option("--finetune-steps", help="Recovery fine-tune steps after merging (0: none).")]
LrOpt = Annotated[float, typer.Option("--lr", help="Fine-tune learning rate.")]
FtDataOpt = Annotated[
    Path | None,
    typer.Option("--finetune-data", help="Fine-tune text/tensors (default: built-in BBC calibration split)."),
]
FtTokensOpt = Annotated[int, typer.Option("--finetune-tokens", help="Tokens of fine-tune data.")]
ObjectiveOpt = Annotated[
    Objective | None,
    typer.Option("--finetune-objective", help=_help("Recovery objective (default: the task's).", OBJECTIVES)),
]
TrainOpt = Annotated[Train, typer.Option("--finetune-train", help=_help("What the fine-tune trains.", TRAINABLE))]
FtBatchOpt = Annotated[
    int | None,
    typer.Option(
        "--finetune-batch",
        help="Rows per recovery step (0: the data's batches: 8 texts of 256 tokens, 16 images). Default: 2 "
        "for causal LMs, or one per process if there are more; the data's batches otherwise. Small steps "
        "recover more in a --recovery-minutes budget (SmolLM2, 5 min: 2 rows 98 steps, perplexity 25.9; "
        "8 rows 22 steps, 31.5).",
    ),
]
ScheduleOpt = Annotated[
    Schedule, typer.Option("--finetune-schedule", help=_help("Learning rate after warmup.", SCHEDULES))
]
ShardOpt = Annotated[
    bool,
    typer.Option(
        "--shard",
        help="Under torchrun: recover with FSDP2, each process holding a shard of the weights, gradients and "
        "optimizer state (default: DDP, a whole copy per process). See docs/scale.md.",
    ),
]


DeltaRankOpt = Annotated[
    int | None,
    typer.Option("--delta-rank", help="--method delta: rank of each layer's correction of each projection."),
]
DeltaBudgetOpt = Annotated[
    float | None,
    typer.Option(
        "--delta-budget",
        help="--method delta: the corrections' size as a fraction of the merged-away FF parameters (default 0.25).",
    ),
]


def _method_params(method, delta_rank, delta_budget) -> dict:
    if delta_rank is None and delta_budget is None:
        return {}
    if method.value != DELTA.name:
        raise errors.InputError("--delta-rank and --delta-budget go with --method delta.")
    if delta_rank is not None and delta_budget is not None:
        raise errors.InputError("Give --delta-rank or --delta-budget, not both.")
    if delta_rank is not None and delta_rank < 0:
        raise errors.InputError(f"--delta-rank must be 0 or more; got {delta_rank}.")
    return {"rank": delta_rank} if delta_rank is not None else {"rank": -1, "budget": delta_budget}


def _merge_and_recovery(a: dict) -> tuple:
    """MergeOptions and RecoveryOptions from the options `merge` and `convert` share (their locals)."""
    from .pipeline import MergeOptions, RecoveryOptions

    merge = MergeOptions(
        layers=a["layers"],
        stack=a["stack"],
        anchor=a["anchor"].value,
        align=a["align"].value,
        method=a["method"].value,
        method_params=_method_params(a["method"], a["delta_rank"], a["delta_budget"]),
        calibration=a["calibration"],
        calibration_tokens=a["calibration_tokens"],
        reduction=a["reduction"],
        validation=a["validation"],
        validation_tokens=a["validation_tokens"],
        top=a["top"],
    )
    recovery = RecoveryOptions(
        steps=a["finetune_steps"],
        lr=a["lr"],
        data=a["finetune_data"],
        tokens=a["finetune_tokens"],
        objective=a["finetune_objective"].value if a["finetune_objective"] else None,
        train=a["finetune_train"].value,
        schedule=a["finetune_schedule"].value,
        minutes=a["recovery_minutes"],
        shard=a["shard"],
        rows=a["finetune_batch"],
    )
    return merge, recovery


def _log(text: str) -> None:
    console.print(text)


@app.command("merge")
def merge_cmd(
    model: ModelArg = None,
    output: Out = Path("merged"),
    layers: LayersOpt = None,
    stack: StackOpt = None,
    anchor: AnchorOpt = Anchor.first,
    align: AlignOpt = Align.correlation,
    calibration: CalOpt = None,
    calibration_tokens: TokensOpt = 10_000,
    method: AutoMethodOpt = MergeMethod.auto,
    reduction: ReductionOpt = None,
    validation: ValidationOpt = None,
    validation_tokens: ValTokensOpt = 10_000,
    top: TopOpt = 3,
    delta_rank: DeltaRankOpt = None,
    delta_budget: DeltaBudgetOpt = None,
    finetune_steps: StepsOpt = 0,
    recovery_minutes: MinutesOpt = 0.0,
    lr: LrOpt = 5e-5,
    finetune_data: FtDataOpt = None,
    finetune_tokens: FtTokensOpt = 50_000,
    finetune_objective: ObjectiveOpt = None,
    finetune_train: TrainOpt = Train.all,
    finetune_batch: FtBatchOpt = None,
    finetune_schedule: ScheduleOpt = Schedule.constant,
    shard: ShardOpt = False,
    overwrite: OverwriteOpt = False,
    trust_remote_code: RemoteOpt = False,
    adapter: AdapterOpt = None,
):
    """Merge a window of adjacent FF sublayers and save the tied model (each shared tensor once).

    Seq2seq models without --stack merge the same indices in encoder and decoder."""
    _use_adapter(adapter)
    from .pipeline import run_merge

    result, before = run_merge(
        model,
        output,
        *_merge_and_recovery(locals()),
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
        log=_log,
    )
    for w in result.manifest.windows:
        scores = ", ".join(f"{k}: {v:.3f}" for k, v in w.scores.items())
        console.print(f"{w.stack} {w.start}-{w.end} (anchor {w.anchor_layer}) matched correlation {scores}")
    console.print(f"parameters {before:,} -> {result.model.num_parameters():,}; wrote {output}")


@app.command("analyze")
def analyze_cmd(
    model: ModelArg = None,
    calibration: CalOpt = None,
    output: Out = Path("analysis"),
    calibration_tokens: TokensOpt = 10_000,
    overwrite: OverwriteOpt = False,
    trust_remote_code: RemoteOpt = False,
    adapter: AdapterOpt = None,
):
    """Layer-by-layer FF similarity (mean matched correlation, linear CKA) as JSON and PNG heatmaps."""
    _use_adapter(adapter)
    from .pipeline import run_analyze

    run_analyze(
        model,
        output,
        calibration=calibration,
        calibration_tokens=calibration_tokens,
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
        log=_log,
    )
    console.print(f"wrote {output}/similarity.json and heatmaps")


@app.command("convert")
def convert_cmd(
    model: ModelArg = None,
    output: Out = Path("out"),
    layers: LayersOpt = None,
    stack: StackOpt = None,
    anchor: AnchorOpt = Anchor.first,
    align: AlignOpt = Align.correlation,
    calibration: CalOpt = None,
    calibration_tokens: TokensOpt = 10_000,
    permutations: Annotated[
        Mode, typer.Option("--permutations", help=_help("Where permutations go.", MODES))
    ] = Mode.fold,
    simplifier: Annotated[
        Simplifier, typer.Option("--simplifier", help=_help("Simplifier.", SIMPLIFIER_CHOICES))
    ] = Simplifier.onnxslim,
    no_simplify: Annotated[bool, typer.Option("--no-simplify", help="Skip the simplifier.")] = False,
    providers: Annotated[str, typer.Option("--providers", help="cpu and/or cuda, comma separated.")] = "cpu",
    external_data: Annotated[
        bool, typer.Option("--external-data", help="Weights in a .data file at any size.")
    ] = False,
    kv_cache: Annotated[
        bool,
        typer.Option(
            "--kv-cache", help="Decoders take past_key_values.* and return present.* (optimum's with-past layout)."
        ),
    ] = False,
    method: AutoMethodOpt = MergeMethod.auto,
    reduction: ReductionOpt = None,
    validation: ValidationOpt = None,
    validation_tokens: ValTokensOpt = 10_000,
    top: TopOpt = 3,
    delta_rank: DeltaRankOpt = None,
    delta_budget: DeltaBudgetOpt = None,
    finetune_steps: StepsOpt = 0,
    recovery_minutes: MinutesOpt = 0.0,
    lr: LrOpt = 5e-5,
    finetune_data: FtDataOpt = None,
    finetune_tokens: FtTokensOpt = 50_000,
    finetune_objective: ObjectiveOpt = None,
    finetune_train: TrainOpt = Train.all,
    finetune_batch: FtBatchOpt = None,
    finetune_schedule: ScheduleOpt = Schedule.constant,
    shard: ShardOpt = False,
    no_reference: Annotated[
        bool, typer.Option("--no-reference", help="Do not keep the merged checkpoint in OUT/reference.")
    ] = False,
    no_prepack: Annotated[
        bool,
        typer.Option(
            "--no-prepack",
            help="Write session.disable_prepacking=1: only for onnxruntime < 1.23, which packs a shared weight once "
            "per reader. Slower; saves nothing on 1.23 and newer.",
        ),
    ] = False,
    no_compare: Annotated[
        bool, typer.Option("--no-compare", help="Skip the side-by-side measurement against the original model.")
    ] = False,
    max_loss: Annotated[
        float | None,
        typer.Option(
            "--max-loss",
            help="Quality goal: the exported model may lose at most this fraction of the original's quality on "
            "the evaluation data (perplexity, accuracy, embedding cosine or BLEU); missed: nothing is written, exit 1.",
        ),
    ] = None,
    eval_data: Annotated[
        Path | None,
        typer.Option(
            "--eval-data",
            help="Held-out data for --max-loss (default: the built-in BBC test split for text, Fashion-MNIST test "
            "images for image classifiers; translation and text classification need a TSV file).",
        ),
    ] = None,
    on_miss: Annotated[
        OnMiss, typer.Option("--on-miss", help=_help("When --max-loss is missed:", ON_MISS))
    ] = OnMiss.nothing,
    precision: PrecisionOpt = Precision.fp32,
    block_size: BlockSizeOpt = 32,
    accuracy_level: AccuracyOpt = None,
    overwrite: OverwriteOpt = False,
    trust_remote_code: RemoteOpt = False,
    adapter: AdapterOpt = None,
):
    """Merge, export to ONNX with one shared initializer per merged FF, simplify and validate."""
    _use_adapter(adapter)
    from .pipeline import ExportOptions, convert
    from .runtime import parse_providers

    export_options = ExportOptions(
        mode=permutations.value,
        simplifier=Simplifier.none.value if no_simplify else simplifier.value,
        external_data=external_data,
        kv_cache=kv_cache,
        prepack=not no_prepack,
        keep_reference=not no_reference,
        providers=parse_providers(providers),
        compare=not no_compare,
        precision=precision.value,
        block_size=block_size,
        accuracy_level=accuracy_level,
        max_loss=max_loss,
        eval_data=eval_data,
        on_miss=on_miss.value,
    )
    report = convert(
        model,
        output,
        *_merge_and_recovery(locals()),
        export_options,
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
        log=_log,
    )
    _print_report(report)
    kept = "reference/, " if not no_reference else ""
    console.print(f"wrote {output} (report.md, report.json, model files, {kept}ffmerge.json)")
    if not report.get("quality", {}).get("ok", True):
        from .quality.goal import QualityGoalMissed

        raise QualityGoalMissed(
            f"quality goal missed: {output} holds the best model found (--on-miss best), marked so in report.md and "
            f"report.json; {report['quality']['advice']}."
        )


def _print_report(report: dict) -> None:
    from rich.markup import escape

    from .onnx.validate import side_by_side_lines

    for c in report["checks"]:
        color = {"pass": "green", "fail": "red", "skipped": "yellow"}[c["status"]]
        reason = f" ({c['detail']['reason']})" if "reason" in c["detail"] else ""
        console.print(f"[{color}]{c['status']:>7}[/{color}] {escape(c['name'])}{escape(reason)}")
        d = c["detail"]
        if c["name"] == "sharing" and "duplicated_tensors" not in d:
            console.print(
                f"         file bytes {d['file_bytes']:,}, unique initializer bytes {d['unique_bytes']:,}, "
                f"copies {d['exact_copies']} exact + {d['permuted_copies']} permuted, wasting {d['wasted_bytes']:,} bytes"
            )
        elif c["name"] == "sharing":
            extra = (
                f", file/unique params {d['file_over_params']:.4f}, initializers/(params + buffers) "
                f"{d['initializers_over_params_and_buffers']:.4f}"
                if "file_over_params" in d
                else ""
            )
            console.print(
                f"         file bytes {d['file_bytes']:,}, duplicated tensors {d['duplicated_tensors']}{extra}"
            )
        if c["name"] == "memory_latency":
            console.print(
                f"         peak {d['peak'] / 2**20:.1f} MB, steady {d['steady'] / 2**20:.1f} MB (trimmed "
                f"{d['steady_trimmed'] / 2**20:.1f}, recipe {d['steady_recipe'] / 2**20:.1f}), {d['latency_ms']:.2f} ms"
            )
        for key in ("error", "fix"):
            if key in d and c["status"] == "fail":
                console.print(f"         {key}: {escape(str(d[key]))}")
        if c["status"] == "fail" and "rows" in d and isinstance(d["rows"], list):
            for r in d["rows"]:
                if not r.get("ok"):
                    console.print(f"         {escape(str(r))}")
    if "side_by_side" in report:
        for line in side_by_side_lines(report["side_by_side"]):
            console.print(escape(line), soft_wrap=True)
    if "quality" in report:
        from .quality.goal import goal_lines

        for line in goal_lines(report["quality"]):
            console.print(escape(line), soft_wrap=True)


@app.command("inspect")
def inspect_cmd(
    model: ModelArg = None,
    adapter_out: Annotated[
        Path | None, typer.Option("--adapter-out", help="Write the adapter used (reviewed, yours or inferred) as JSON.")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the description as JSON here.")] = None,
    trust_remote_code: RemoteOpt = False,
    adapter: AdapterOpt = None,
):
    """The model's family, stacks, FF projections, per-layer FF parameters and what merging k layers removes.
    Reads the config only (no weights)."""
    from rich.table import Table

    from .families.builtin import builtin_models
    from .families.describe import describe

    _use_adapter(adapter)
    spec = model or "all-MiniLM-L6-v2"
    inputs = [builtin_models().get(spec, spec)]
    for target in (adapter_out, json_out):
        if target is not None:
            check_report(target, inputs)
    data, used = describe(spec, trust_remote_code=trust_remote_code)
    console.print(
        f"[bold]{data['model_type']}[/bold] ({data['class']}): family {data['family']}, adapter {data['adapter']}, "
        f"task {data['task']}, {data['layout']} layout, bias {data['bias']}, gated {data['gated']}"
        + (f" (fused: {' then '.join(data['fused'])} in one matrix)" if data["fused"] else "")
        + ", "
        f"{data['params']:,} parameters"
    )
    for stack, d in data["stacks"].items():
        projections = ", ".join(f"{k} {v['path']} {v['shape']}" for k, v in d["projections"].items())
        console.print(f"{stack}: {d['path']} x {d['layers']} {d['block']}; FF width {d['d_ff']}; {projections}")
        table = Table("k merged", "parameters removed", "of the model")
        for k, r in d["merge_removes"].items():
            table.add_row(k, f"{r['params']:,}", f"{r['fraction']:.1%}")
        console.print(table)
    if adapter_out is not None:
        write_text(adapter_out, json.dumps(used.to_json(), indent=1), inputs)
        console.print(f"wrote the adapter to {adapter_out}; pass it back with --adapter {adapter_out}")
    if json_out is not None:
        write_text(json_out, json.dumps(data, indent=2), inputs)


@app.command("evaluate")
def evaluate_cmd(
    model: Annotated[str, typer.Argument(help="Model, merged folder, convert folder or .onnx file.")],
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Text file or folder (default: built-in BBC news test split); for image classifiers a folder of "
            "class subfolders (default: Fashion-MNIST test); for text classifiers a TSV file of text<TAB>label "
            "lines; for translation a TSV file of source<TAB>reference lines.",
        ),
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option("--reference", help="Original model, for embedding cosine (default: the manifest's source)."),
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Perplexity: tokens of text to score.")] = 20_000,
    window: Annotated[
        int | None, typer.Option("--window", help="Perplexity window (default: 512, or the model's positions).")
    ] = None,
    stride: Annotated[int | None, typer.Option("--stride", help="Default: window - 1.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result as JSON here.")] = None,
):
    """Perplexity (causal LMs), embedding cosine to the original (encoders), accuracy (text and
    image classifiers) or BLEU and chrF (translation), on PyTorch or ONNX."""
    from .quality.evaluate import evaluate

    if data is not None and not data.exists():
        raise errors.InputError(
            f"{data} does not exist. Give a text file, a folder of .txt files or of class subfolders."
        )
    inputs = [model, data, reference]
    if json_out:
        check_report(json_out, inputs)  # before the work, not after it
    result = evaluate(model, data=data, reference=reference, max_tokens=max_tokens, window=window, stride=stride)
    console.print(f"{result['metric']}: [bold]{result['value']:.4f}[/bold]")
    if "chrF" in result:
        console.print(f"chrF: [bold]{result['chrF']:.4f}[/bold]")
    if json_out:
        write_text(json_out, json.dumps(result, indent=2), inputs)


@app.command("search")
def search_cmd(
    model: ModelArg = None,
    merge_count: Annotated[int | None, typer.Option("--merge-count", help="k: FF sublayers merged into one.")] = None,
    reduction: Annotated[
        float | None,
        typer.Option(
            "--reduction", help="Remove at least this fraction of all parameters, e.g. 0.1 (the fewest layers that do)."
        ),
    ] = None,
    mode: Annotated[SearchMode, typer.Option("--mode", help=_help("Search.", SEARCH_MODES))] = SearchMode.full,
    top: Annotated[int, typer.Option("--top")] = 3,
    stack: StackOpt = None,
    anchor: AnchorOpt = Anchor.first,
    method: MethodOpt = Method.average,
    delta_rank: DeltaRankOpt = None,
    delta_budget: DeltaBudgetOpt = None,
    calibration: CalOpt = None,
    validation: Annotated[
        Path | None,
        typer.Option("--validation", help="Validation text/tensors (default: built-in BBC validation split)."),
    ] = None,
    calibration_tokens: TokensOpt = 10_000,
    validation_tokens: ValTokensOpt = 10_000,
    output: Out = Path("search"),
    overwrite: OverwriteOpt = False,
    trust_remote_code: RemoteOpt = False,
    adapter: AdapterOpt = None,
):
    """Find the best window of k adjacent FF sublayers (paper 3.4) and write search.json + search.png."""
    _use_adapter(adapter)
    from .pipeline import run_search

    result = run_search(
        model,
        output,
        merge_count=merge_count,
        reduction=reduction,
        mode=mode.value,
        top=top,
        stack=stack,
        anchor=anchor.value,
        method=method.value,
        method_params=_method_params(method, delta_rank, delta_budget),
        calibration=calibration,
        validation=validation,
        calibration_tokens=calibration_tokens,
        validation_tokens=validation_tokens,
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
        log=_log,
    )
    name = result["score_name"]
    for r in result["rows"]:
        score_text = f"{r['score']:.4f}" if r["score"] is not None else "-"
        console.print(f"  {r['start']:>3}-{r['end']:<3} alignment {r['align_score']:.3f}  {name} {score_text}")
    best = result["best"]
    console.print(f"best window of {result['k']}: [bold]{best[0]}-{best[1]}[/bold]; wrote {output}")


@app.command("validate")
def validate_cmd(
    path: Annotated[
        Path, typer.Argument(help="A folder written by convert, any other folder with a model.onnx, or an .onnx file.")
    ],
    reference: Annotated[
        Path | None,
        typer.Option(
            "--reference",
            help="convert folders: the merged checkpoint (default PATH/reference); other models: an ONNX model "
            "(file or folder) whose outputs must match.",
        ),
    ] = None,
    providers: Annotated[str, typer.Option("--providers", help="cpu and/or cuda, comma separated.")] = "cpu",
    feeds: Annotated[
        Path | None, typer.Option("--feeds", help="Other models: inputs as an .npz file (default: generated).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON here.")] = None,
    no_compare: Annotated[bool, typer.Option("--no-compare", help="Skip the memory and latency measurements.")] = False,
):
    """Check outputs, sharing, memory and latency; exit 0 only if everything passes (1 if a check fails)."""
    from .onnx.validate import INFO, validate
    from .onnx.validate_graph import validate_graph
    from .runtime import parse_providers

    if not path.exists():
        raise errors.InputError(f"{path} does not exist. Give a folder written by convert or an .onnx file.")
    names = parse_providers(providers)
    inputs = [path, reference, feeds]
    if json_out:
        check_report(json_out, inputs)
    if path.is_dir() and (path / INFO).is_file():
        from .quality.textcheck import check_text_quality

        report = validate(path, reference=reference, providers=names, side_by_side=not no_compare, log=_log,
                          text_check=check_text_quality)  # fmt: skip
    else:
        report = validate_graph(path, reference=reference, providers=names, feeds_file=feeds,
                                measure_memory=not no_compare)  # fmt: skip
    _print_report(report)
    if json_out:
        write_text(json_out, json.dumps(report, indent=2), inputs)
    if not report["ok"]:
        raise errors.ValidationFailed("validation failed")


@app.command("quantize")
def quantize_cmd(
    folder: Annotated[Path, typer.Argument(help="A folder written by convert (with its reference/).")],
    output: Out = Path("out-quantized"),
    precision: PrecisionOpt = Precision.int8,
    block_size: BlockSizeOpt = 32,
    accuracy_level: AccuracyOpt = None,
    providers: Annotated[str, typer.Option("--providers", help="cpu and/or cuda, comma separated.")] = "cpu",
    no_compare: Annotated[
        bool, typer.Option("--no-compare", help="Skip the side-by-side measurement against the original model.")
    ] = False,
    overwrite: OverwriteOpt = False,
):
    """A convert folder at another precision (fp16, bf16, int8, int4), every merged FF still stored once; validated
    against the fp32 merged reference and measured against the original at the same precision."""
    from .pipeline import ExportOptions, run_quantize
    from .runtime import parse_providers

    options = ExportOptions(precision=precision.value, block_size=block_size, accuracy_level=accuracy_level,
                            providers=parse_providers(providers), compare=not no_compare)  # fmt: skip
    report = run_quantize(folder, output, options, overwrite=overwrite, log=_log)
    _print_report(report)
    console.print(f"wrote {output} ({precision.value})")


@app.command("share")
def share_cmd(
    path: Annotated[Path, typer.Argument(help="An ONNX model.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .onnx file.")],
    simplifier: Annotated[Simplifier, typer.Option("--simplifier")] = Simplifier.none,
    overwrite: OverwriteOpt = False,
):
    """Without a manifest: share initializers that are equal or equal up to a permutation."""
    from .onnx.build import share_file

    counts = share_file(path, output, simplifier=simplifier.value, overwrite=overwrite)
    console.print(
        f"shared {counts.get('duplicates_shared', 0)} exact and {counts.get('permuted_shared', 0)} permuted copies; "
        f"{counts['bytes_before']:,} -> {counts['bytes_after']:,} bytes; wrote {counts['output']}"
    )


def _resources(e: BaseException) -> str | None:
    """What ran out, for errors libraries raise without a MemoryError or ENOSPC errno."""
    text = str(e)
    if (
        isinstance(e, MemoryError)
        or type(e).__name__ == "OutOfMemoryError"
        or (isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower()))
    ):
        return "memory"
    if (
        (isinstance(e, OSError) and e.errno == errno.ENOSPC)
        or "No space left on device" in text
        or "os error 28" in text
    ):
        return "disk"
    return None


_signals: list[int] = []  # signals received during this run (click turns our exception into Abort)


def _on_sigterm(signum, frame):
    _signals.append(signum)
    raise errors.Terminated


def run(argv: list[str] | None = None) -> tuple[int, BaseException | None]:
    """Run the CLI; returns (exit code, the error that ended it or None). See errors.py."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    _signals.clear()
    try:
        code, err = _run(argv)
        if _signals and code == errors.EXIT_INTERRUPTED:
            return errors.EXIT_TERMINATED, err if isinstance(err, errors.Terminated) else errors.Terminated()
        return code, err
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        from .families.adapter import forget_user_adapters

        forget_user_adapters()  # --adapter holds for its command only


DISTRIBUTED_COMMANDS = ("merge", "convert")  # the ones that run under torchrun


def _run(argv: list[str] | None) -> tuple[int, BaseException | None]:
    from . import distributed

    if not distributed.launched():
        return _dispatch(argv)
    args = sys.argv[1:] if argv is None else argv
    command = next((a for a in args if not a.startswith("-")), None)
    if command not in DISTRIBUTED_COMMANDS:
        console.print(f"[red]error:[/red] under torchrun only {' and '.join(DISTRIBUTED_COMMANDS)} run; "
                      f"run {command or 'this command'} as one process.")  # fmt: skip
        return errors.EXIT_USAGE, None
    try:
        distributed.start()
        return _dispatch(argv)
    finally:
        distributed.stop()


@contextlib.contextmanager
def _quiet_unless_main():
    """Under torchrun only rank 0 prints progress and reports; every rank prints its own errors."""
    from .distributed import world

    console.quiet = not world().main
    try:
        yield
    finally:
        console.quiet = False


def _dispatch(argv: list[str] | None) -> tuple[int, BaseException | None]:
    try:
        with _quiet_unless_main():
            rv = app(args=argv, standalone_mode=False)
        if rv == errors.EXIT_INTERRUPTED:  # typer turns Ctrl-C into a return value of 130
            raise KeyboardInterrupt
    except errors.FFMergeError as e:
        console.print(f"[red]error:[/red] {e}")
        return e.exit_code, e
    except errors.Terminated as e:
        console.print("[yellow]terminated[/yellow] (SIGTERM): no output was written")
        return errors.EXIT_TERMINATED, e
    except KeyboardInterrupt as e:
        if _signals:
            console.print("[yellow]terminated[/yellow] (SIGTERM): no output was written")
        else:
            console.print("[yellow]interrupted[/yellow]: no output was written")
        return errors.EXIT_INTERRUPTED, e
    except typer.Exit as e:
        return e.exit_code, None
    except (typer.BadParameter, typer.Abort) as e:
        console.print(f"[red]error:[/red] {e}")
        return errors.EXIT_USAGE, e
    except Exception as e:  # noqa: BLE001
        from .distributed import peer_failed

        if peer_failed(e):
            from rich.markup import escape

            first = escape(str(e).splitlines()[0] if str(e) else type(e).__name__)
            console.print(f"[red]error:[/red] another process of this torchrun job failed ({first}); see its error "
                          "above. No output was written.")  # fmt: skip
            return errors.EXIT_PEER, e
        kind = _resources(e)
        if kind == "memory":
            console.print(
                "[red]error:[/red] out of memory. Lower --calibration-tokens, merge a smaller model, "
                "or use a machine with more memory; no output was written."
            )
            return errors.EXIT_RESOURCES, e
        if kind == "disk":
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            console.print(
                f"[red]error:[/red] no space left on the device{where}; free disk space. No output was written."
            )
            return errors.EXIT_RESOURCES, e
        if isinstance(e, OSError):
            where = f": {e.filename}" if e.filename else ""
            console.print(f"[red]error:[/red] {e.strerror or e}{where}. No output was written.")
            return errors.EXIT_USAGE, e
        # click usage errors (typer vendors click, so match by shape)
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            return errors.EXIT_USAGE, e
        import traceback

        traceback.print_exc()
        console.print(
            f"[red]internal error[/red] ({type(e).__name__}): this is a bug in ffmerge-onnx; "
            "please report it with the traceback above. No output was written."
        )
        return errors.EXIT_INTERNAL, e
    return errors.EXIT_OK, None


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps typed errors to exit codes (see errors.py)."""
    return run(argv)[0]


def entry() -> None:
    sys.exit(main())
