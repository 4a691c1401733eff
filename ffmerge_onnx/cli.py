"""The `ffmerge-onnx` command line. Errors become one clear line and a documented exit code."""

from __future__ import annotations

import copy
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from . import errors

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Merge Transformer FF sublayers and ship them as smaller ONNX models.")
console = Console(stderr=True)


class Stack(str, Enum):
    encoder = "encoder"
    decoder = "decoder"


class Anchor(str, Enum):
    first = "first"
    middle = "middle"
    last = "last"


class Align(str, Enum):
    correlation = "correlation"
    none = "none"


ModelArg = Annotated[Optional[str], typer.Argument(help="Model folder, .gguf file or hub id (default: built-in all-MiniLM-L6-v2).")]
LayersOpt = Annotated[Optional[str], typer.Option("--layers", help="Window(s) to merge, inclusive: 3-5 or 0-2,6-8.")]
StackOpt = Annotated[Optional[Stack], typer.Option("--stack", help="Which stack the window is in (default: the model's only or last stack).")]
AnchorOpt = Annotated[Anchor, typer.Option("--anchor", help="Layer of the window the others are aligned to.")]
AlignOpt = Annotated[Align, typer.Option("--align", help="correlation (paper) or none (vanilla merge).")]


class Method(str, Enum):
    average = "average"
    regmean = "regmean"
    refit = "refit"
    sequential = "sequential"


class Schedule(str, Enum):
    constant = "constant"
    linear = "linear"


MethodOpt = Annotated[Method, typer.Option("--method", help="average (paper), regmean, refit (least-squares output projection), or sequential (refit on the drifted inputs of the merged model).")]
CalOpt = Annotated[Optional[Path], typer.Option("--calibration", help="Text file/folder, image folder, or .pt/.safetensors tensors.")]
TokensOpt = Annotated[int, typer.Option("--calibration-tokens", help="Token budget for calibration.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")]
RemoteOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow code from the model folder to run (off by default).")]
StepsOpt = Annotated[int, typer.Option("--finetune-steps", help="Recovery fine-tune steps after merging (0: none).")]
LrOpt = Annotated[float, typer.Option("--lr", help="Fine-tune learning rate.")]
FtDataOpt = Annotated[Optional[Path], typer.Option("--finetune-data", help="Fine-tune text/tensors (default: built-in BBC calibration split).")]
FtTokensOpt = Annotated[int, typer.Option("--finetune-tokens", help="Tokens of fine-tune data.")]
ObjectiveOpt = Annotated[Optional[str], typer.Option("--finetune-objective", help="lm (causal LM default), classify (labelled images), kl (match the original's output distributions), kl+layers (kl plus every layer's output against the original's matching layer; causal LMs) or distill (hidden states; encoder default).")]
TrainOpt = Annotated[str, typer.Option("--finetune-train", help="all, merged (only the shared FF tensors) or merged+norms.")]
ScheduleOpt = Annotated[Schedule, typer.Option("--finetune-schedule", help="Learning rate after warmup: constant, or linear (falls to zero at the last step).")]


def _load(model: Optional[str], trust_remote_code: bool):
    from .builtin import default_model
    from .modeling import load_model, load_preprocessor

    spec = model or default_model()
    console.print(f"loading [bold]{model or 'built-in all-MiniLM-L6-v2'}[/bold]")
    return spec, load_model(spec, trust_remote_code=trust_remote_code), load_preprocessor(spec)


def _calibration(path: Optional[Path], model, pre, tokens: int, needed: bool, split: str = "calibration"):
    from .builtin import bbc_articles
    from .data import load_calibration

    if path is None:
        if not needed:
            return None
        import tempfile

        from .adapters import task_of
        from .builtin import write_calibration_images, write_calibration_text

        folder = Path(tempfile.mkdtemp(prefix="ffmerge-cal-"))
        if task_of(model) == "image-classification":
            path = write_calibration_images(folder, split)
            console.print(f"{split}: built-in Fashion-MNIST train images ({tokens} tokens)")
        else:
            if not bbc_articles():
                raise errors.CalibrationError("No calibration data: pass --calibration PATH.")
            path = write_calibration_text(folder, split)
            console.print(f"{split}: built-in BBC news text ({tokens} tokens)")
    return load_calibration(path, model=model, tokenizer=pre, processor=pre, budget=tokens)


def _providers(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _merge_and_recover(m, windows, cal, spec, pre, *, anchor: str, align: str, method: str, steps: int, lr: float,
                       data: Optional[Path], tokens: int, objective: Optional[str], train: str,
                       schedule: str = "constant") -> None:
    """merge in place, then (with steps > 0) a recovery fine-tune against a copy of the original."""
    from .merge import merge

    original = copy.deepcopy(m) if steps else None
    merge(m, windows, anchor=anchor, align=align, calibration=cal, source=spec, method=method)
    if steps:
        _recover(m, original, pre, steps, lr, data, tokens, objective, train, schedule)


def _recover(m, original, pre, steps: int, lr: float, data: Optional[Path], tokens: int,
             objective: Optional[str], train: str, schedule: str = "constant") -> None:
    """Recovery fine-tune of the merged model in place (best state by the validation split)."""
    from .finetune import recover

    batches = list(_calibration(data, m, pre, tokens, needed=True))
    validation = list(_calibration(None, m, pre, min(tokens, 8_000), needed=True, split="validation"))
    result = recover(m, original, batches, validation, steps=steps, lr=lr, objective=objective, train=train,
                     schedule=schedule)
    name = m.ffmerge_manifest.finetune["score"]
    console.print(f"fine-tuned {steps} steps: {name} {result.history[0]['score']:.4f} -> {result.best_score:.4f} "
                  f"(best at step {result.best_step})")


def _windows(model, layers: Optional[str], stack: Optional[Stack]):
    from .adapters import adapter_for
    from .builtin import DEFAULT_LAYERS
    from .merge import parse_windows

    adapter = adapter_for(model)
    stack_name = stack.value if stack else adapter.stack_names()[-1]
    if stack is None and len(adapter.stacks) > 1:
        stack_names = adapter.stack_names()
        return [w for s in stack_names for w in parse_windows(layers or DEFAULT_LAYERS, s)]
    return parse_windows(layers or DEFAULT_LAYERS, stack_name)


@app.command("merge")
def merge_cmd(model: ModelArg = None, output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")] = Path("merged"),
              layers: LayersOpt = None, stack: StackOpt = None, anchor: AnchorOpt = Anchor.first,
              align: AlignOpt = Align.correlation, calibration: CalOpt = None, calibration_tokens: TokensOpt = 10_000,
              method: MethodOpt = Method.average,
              finetune_steps: StepsOpt = 0, lr: LrOpt = 5e-5, finetune_data: FtDataOpt = None,
              finetune_tokens: FtTokensOpt = 50_000, finetune_objective: ObjectiveOpt = None,
              finetune_train: TrainOpt = "all", finetune_schedule: ScheduleOpt = Schedule.constant,
              overwrite: OverwriteOpt = False, trust_remote_code: RemoteOpt = False):
    """Merge a window of adjacent FF sublayers and save the tied model (each shared tensor once).

    Seq2seq models without --stack merge the same indices in encoder and decoder."""
    from .storage import save_merged

    if output.exists() and not overwrite:
        raise errors.OutputExistsError(f"{output} already exists. Choose another -o or pass --overwrite.")
    spec, m, pre = _load(model, trust_remote_code)
    windows = _windows(m, layers, stack)
    cal = _calibration(calibration, m, pre, calibration_tokens,
                       needed=align is Align.correlation or method is not Method.average)
    before = m.num_parameters()
    _merge_and_recover(m, windows, cal, spec, pre, anchor=anchor.value, align=align.value, method=method.value,
                       steps=finetune_steps, lr=lr, data=finetune_data, tokens=finetune_tokens,
                       objective=finetune_objective, train=finetune_train, schedule=finetune_schedule.value)
    save_merged(m, output, preprocessor=pre, overwrite=overwrite)
    for w in m.ffmerge_manifest.windows:
        scores = ", ".join(f"{k}: {v:.3f}" for k, v in w.scores.items())
        console.print(f"{w.stack} {w.start}-{w.end} (anchor {w.anchor_layer}) matched correlation {scores}")
    console.print(f"parameters {before:,} -> {m.num_parameters():,}; wrote {output}")


@app.command("analyze")
def analyze_cmd(model: ModelArg = None, calibration: CalOpt = None,
                output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")] = Path("analysis"),
                calibration_tokens: TokensOpt = 10_000, overwrite: OverwriteOpt = False, trust_remote_code: RemoteOpt = False):
    """Layer-by-layer FF similarity (mean matched correlation, linear CKA) as JSON and PNG heatmaps."""
    from .analyze import similarity, write
    from .fsutil import atomic_dir

    if output.exists() and not overwrite:
        raise errors.OutputExistsError(f"{output} already exists. Choose another -o or pass --overwrite.")
    spec, m, pre = _load(model, trust_remote_code)
    cal = _calibration(calibration, m, pre, calibration_tokens, needed=True)
    result = similarity(m, cal)
    with atomic_dir(output, overwrite=overwrite) as tmp:
        write(result, tmp)
    console.print(f"wrote {output}/similarity.json and heatmaps")


class Mode(str, Enum):
    fold = "fold"
    gather = "gather"


class Simplifier(str, Enum):
    onnxslim = "onnxslim"
    onnxsim = "onnxsim"
    none = "none"


@app.command("convert")
def convert_cmd(model: ModelArg = None, output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")] = Path("out"),
                layers: LayersOpt = None, stack: StackOpt = None, anchor: AnchorOpt = Anchor.first,
                align: AlignOpt = Align.correlation, calibration: CalOpt = None, calibration_tokens: TokensOpt = 10_000,
                permutations: Annotated[Mode, typer.Option("--permutations", help="fold (default, no runtime cost) or gather.")] = Mode.fold,
                simplifier: Annotated[Simplifier, typer.Option("--simplifier")] = Simplifier.onnxslim,
                no_simplify: Annotated[bool, typer.Option("--no-simplify", help="Skip the simplifier.")] = False,
                providers: Annotated[str, typer.Option("--providers", help="cpu and/or cuda, comma separated.")] = "cpu",
                external_data: Annotated[bool, typer.Option("--external-data", help="Weights in a .data file at any size.")] = False,
                kv_cache: Annotated[bool, typer.Option("--kv-cache", help="Decoders take past_key_values.* and return present.* (optimum's with-past layout).")] = False,
                method: MethodOpt = Method.average,
                finetune_steps: StepsOpt = 0, lr: LrOpt = 5e-5, finetune_data: FtDataOpt = None,
                finetune_tokens: FtTokensOpt = 50_000, finetune_objective: ObjectiveOpt = None,
                finetune_train: TrainOpt = "all", finetune_schedule: ScheduleOpt = Schedule.constant,
                no_reference: Annotated[bool, typer.Option("--no-reference", help="Do not keep the merged checkpoint in OUT/reference.")] = False,
                no_compare: Annotated[bool, typer.Option("--no-compare", help="Skip the side-by-side unmerged export.")] = False,
                overwrite: OverwriteOpt = False, trust_remote_code: RemoteOpt = False):
    """Merge, export to ONNX with one shared initializer per merged FF, simplify and validate."""
    from .pipeline import ConvertOptions, convert

    if output.exists() and not overwrite:
        raise errors.OutputExistsError(f"{output} already exists. Choose another -o or pass --overwrite.")
    spec, m, pre = _load(model, trust_remote_code)
    windows = _windows(m, layers, stack)
    cal = _calibration(calibration, m, pre, calibration_tokens, needed=align is Align.correlation or method is not Method.average)
    _merge_and_recover(m, windows, cal, spec, pre, anchor=anchor.value, align=align.value, method=method.value,
                       steps=finetune_steps, lr=lr, data=finetune_data, tokens=finetune_tokens,
                       objective=finetune_objective, train=finetune_train, schedule=finetune_schedule.value)
    if permutations is Mode.gather:
        console.print("[yellow]note:[/yellow] mode gather needs the session settings in ort_session_settings.json "
                      "(ConstantFolding off); mode fold needs none.")
    options = ConvertOptions(mode=permutations.value, simplifier="none" if no_simplify else simplifier.value,
                             external_data=external_data, kv_cache=kv_cache, keep_reference=not no_reference,
                             providers=_providers(providers),
                             compare=not no_compare, overwrite=overwrite)
    report = convert(m, output, options, preprocessor=pre, log=lambda s: console.print(s))
    _print_report(report)
    console.print(f"wrote {output} (report.md, report.json, model files, {'reference/, ' if not no_reference else ''}ffmerge.json)")


def _print_report(report: dict) -> None:
    for c in report["checks"]:
        color = {"pass": "green", "fail": "red", "skipped": "yellow"}[c["status"]]
        console.print(f"[{color}]{c['status']:>7}[/{color}] {c['name']}")
        d = c["detail"]
        if c["name"] == "sharing":
            extra = (f", file/unique params {d['file_over_params']:.4f}, initializers/params "
                     f"{d['initializers_over_params']:.4f}") if "file_over_params" in d else ""
            console.print(f"         file bytes {d['file_bytes']:,}, duplicated tensors {d['duplicated_tensors']}{extra}")
        if c["name"] == "size_vs_unmerged":
            for part, r in d["parts"].items():
                console.print(f"         {part}: file saving/merged-away {r['file_saving_over_away']:.4f}, "
                              f"RSS saving/merged-away {r['rss_saving_over_away']:.3f}, latency ratio {r['latency_ratio']:.3f}")
        if c["status"] == "fail" and "rows" in d:
            for r in d["rows"]:
                if not r.get("ok"):
                    console.print(f"         {r}")


@app.command("evaluate")
def evaluate_cmd(model: Annotated[str, typer.Argument(help="Model, merged folder, convert folder or .onnx file.")],
                 data: Annotated[Optional[Path], typer.Option("--data", help="Text file or folder (default: built-in BBC news test split); for image classifiers a folder of class subfolders (default: Fashion-MNIST test); for text classifiers a TSV file of text<TAB>label lines; for translation a TSV file of source<TAB>reference lines.")] = None,
                 reference: Annotated[Optional[str], typer.Option("--reference", help="Original model, for embedding cosine (default: the manifest's source).")] = None,
                 max_tokens: Annotated[int, typer.Option("--max-tokens", help="Perplexity: tokens of text to score.")] = 20_000,
                 window: Annotated[int, typer.Option("--window")] = 512,
                 stride: Annotated[Optional[int], typer.Option("--stride", help="Default: window - 1.")] = None,
                 json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the result as JSON here.")] = None):
    """Perplexity (causal LMs), embedding cosine to the original (encoders), accuracy (text and
    image classifiers) or BLEU and chrF (translation), on PyTorch or ONNX."""
    import json

    from .evaluate import evaluate

    if data is not None and not data.exists():
        raise errors.InputError(f"{data} does not exist. Give a text file, a folder of .txt files or of class subfolders.")
    result = evaluate(model, data=data, reference=reference, max_tokens=max_tokens, window=window, stride=stride)
    console.print(f"{result['metric']}: [bold]{result['value']:.4f}[/bold]")
    if "chrF" in result:
        console.print(f"chrF: [bold]{result['chrF']:.4f}[/bold]")
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))


@app.command("search")
def search_cmd(model: ModelArg = None,
               merge_count: Annotated[Optional[int], typer.Option("--merge-count", help="k: FF sublayers merged into one.")] = None,
               reduction: Annotated[Optional[float], typer.Option("--reduction", help="Fraction of all parameters to remove, e.g. 0.1.")] = None,
               mode: Annotated[str, typer.Option("--mode", help="full: score every position; aligned: score the best --top by alignment.")] = "full",
               top: Annotated[int, typer.Option("--top")] = 3,
               stack: StackOpt = None, anchor: AnchorOpt = Anchor.first, method: MethodOpt = Method.average,
               calibration: CalOpt = None,
               validation: Annotated[Optional[Path], typer.Option("--validation", help="Validation text/tensors (default: built-in BBC validation split).")] = None,
               calibration_tokens: TokensOpt = 10_000,
               validation_tokens: Annotated[int, typer.Option("--validation-tokens")] = 10_000,
               output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")] = Path("search"),
               overwrite: OverwriteOpt = False, trust_remote_code: RemoteOpt = False):
    """Find the best window of k adjacent FF sublayers (paper 3.4) and write search.json + search.png."""
    from .fsutil import atomic_dir
    from .search import default_score, merge_count_for, search, write

    if (merge_count is None) == (reduction is None):
        raise errors.InputError("Give exactly one of --merge-count K or --reduction FRACTION.")
    if mode not in ("full", "aligned"):
        raise errors.InputError("--mode is full or aligned.")
    if output.exists() and not overwrite:
        raise errors.OutputExistsError(f"{output} already exists. Choose another -o or pass --overwrite.")
    spec, m, pre = _load(model, trust_remote_code)
    from .adapters import adapter_for

    stacks = [stack.value] if stack else adapter_for(m).stack_names()
    k = merge_count if merge_count is not None else merge_count_for(m, reduction, stacks)
    cal = _calibration(calibration, m, pre, calibration_tokens, needed=True)
    val = _calibration(validation, m, pre, validation_tokens, needed=True, split="validation")
    score, higher, name = default_score(m, val)
    result = search(m, k, cal, score, higher_is_better=higher, stacks=stacks, mode=mode, top=top, anchor=anchor.value,
                    method=method.value, progress=True)
    result.update(model=spec, score_name=name)
    with atomic_dir(output, overwrite=overwrite) as tmp:
        write(result, tmp)
    for r in result["rows"]:
        score_text = f"{r['score']:.4f}" if r["score"] is not None else "-"
        console.print(f"  {r['start']:>3}-{r['end']:<3} alignment {r['align_score']:.3f}  {name} {score_text}")
    console.print(f"best window of {k}: [bold]{result['best'][0]}-{result['best'][1]}[/bold]; wrote {output}")


@app.command("validate")
def validate_cmd(path: Annotated[Path, typer.Argument(help="Folder written by convert.")],
                 reference: Annotated[Optional[Path], typer.Option("--reference", help="Merged checkpoint folder (default PATH/reference).")] = None,
                 providers: Annotated[str, typer.Option("--providers")] = "cpu",
                 json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the report as JSON here.")] = None,
                 no_compare: Annotated[bool, typer.Option("--no-compare", help="Skip the side-by-side unmerged export.")] = False):
    """Check outputs, sharing, memory and latency; exit 0 only if everything passes."""
    import json

    from .validate import validate

    if not path.is_dir():
        raise errors.InputError(f"{path} is not a folder written by convert.")
    report = validate(path, reference=reference, providers=_providers(providers),
                      compare=not no_compare)
    _print_report(report)
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))
    if not report["ok"]:
        raise errors.ValidationFailed("validation failed")


@app.command("share")
def share_cmd(path: Annotated[Path, typer.Argument(help="An ONNX model.")],
              output: Annotated[Path, typer.Option("-o", "--output", help="Output .onnx file.")],
              simplifier: Annotated[Simplifier, typer.Option("--simplifier")] = Simplifier.none,
              overwrite: OverwriteOpt = False):
    """Without a manifest: share initializers that are equal or equal up to a permutation."""
    from .share_file import share_file

    counts = share_file(path, output, simplifier=simplifier.value, overwrite=overwrite)
    console.print(f"shared {counts.get('duplicates_shared', 0)} exact and {counts.get('permuted_shared', 0)} permuted copies; "
                  f"{counts['bytes_before']:,} -> {counts['bytes_after']:,} bytes; wrote {output}")


def run(argv: list[str] | None = None) -> tuple[int, BaseException | None]:
    """Run the CLI; returns (exit code, the error that ended it or None). See errors.py."""
    import errno

    try:
        rv = app(args=argv, standalone_mode=False)
        if rv == errors.EXIT_INTERRUPTED:  # typer turns Ctrl-C into a return value of 130
            raise KeyboardInterrupt
    except errors.FFMergeError as e:
        console.print(f"[red]error:[/red] {e}")
        return e.exit_code, e
    except KeyboardInterrupt as e:
        console.print("[yellow]interrupted[/yellow]: no output was written")
        return errors.EXIT_INTERRUPTED, e
    except MemoryError as e:
        console.print("[red]error:[/red] out of memory. Lower --calibration-tokens, merge a smaller model, "
                      "or use a machine with more memory; no output was written.")
        return errors.EXIT_RESOURCES, e
    except OSError as e:
        if e.errno == errno.ENOSPC:
            console.print(f"[red]error:[/red] no space left on the device ({e.filename}); free disk space. "
                          "No output was written.")
            return errors.EXIT_RESOURCES, e
        console.print(f"[red]error:[/red] {e}")
        return errors.EXIT_USAGE, e
    except typer.Exit as e:
        return e.exit_code, None
    except (typer.BadParameter, typer.Abort) as e:
        console.print(f"[red]error:[/red] {e}")
        return errors.EXIT_USAGE, e
    except Exception as e:  # noqa: BLE001
        # click usage errors (typer vendors click, so match by shape)
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            return errors.EXIT_USAGE, e
        import traceback

        traceback.print_exc()
        console.print(f"[red]internal error[/red] ({type(e).__name__}): this is a bug in ffmerge-onnx; "
                      "please report it with the traceback above. No output was written.")
        return errors.EXIT_INTERNAL, e
    return errors.EXIT_OK, None


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps typed errors to exit codes (see errors.py)."""
    return run(argv)[0]


def entry() -> None:
    sys.exit(main())
