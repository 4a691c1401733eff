"""The `ffmerge-onnx` command line. Errors become one clear line and a documented exit code."""

from __future__ import annotations

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
CalOpt = Annotated[Optional[Path], typer.Option("--calibration", help="Text file/folder, image folder, or .pt/.safetensors tensors.")]
TokensOpt = Annotated[int, typer.Option("--calibration-tokens", help="Token budget for calibration.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")]
RemoteOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow code from the model folder to run (off by default).")]


def _load(model: Optional[str], trust_remote_code: bool):
    from .builtin import default_model
    from .modeling import load_model, load_preprocessor

    spec = model or default_model()
    console.print(f"loading [bold]{model or 'built-in all-MiniLM-L6-v2'}[/bold]")
    return spec, load_model(spec, trust_remote_code=trust_remote_code), load_preprocessor(spec)


def _calibration(path: Optional[Path], model, pre, tokens: int, needed: bool):
    from .builtin import bbc_articles
    from .data import load_calibration

    if path is None:
        if not needed:
            return None
        import tempfile

        from .builtin import write_calibration_text

        if not bbc_articles():
            raise errors.CalibrationError("No calibration data: pass --calibration PATH.")
        path = write_calibration_text(Path(tempfile.mkdtemp(prefix="ffmerge-cal-")))
        console.print(f"calibrating on built-in BBC news text ({tokens} tokens)")
    return load_calibration(path, model=model, tokenizer=pre, processor=pre, budget=tokens)


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
              overwrite: OverwriteOpt = False, trust_remote_code: RemoteOpt = False):
    """Merge a window of adjacent FF sublayers and save the tied model (each shared tensor once).

    Seq2seq models without --stack merge the same indices in encoder and decoder."""
    from .merge import merge
    from .storage import save_merged

    if output.exists() and not overwrite:
        raise errors.OutputExistsError(f"{output} already exists. Choose another -o or pass --overwrite.")
    spec, m, pre = _load(model, trust_remote_code)
    windows = _windows(m, layers, stack)
    cal = _calibration(calibration, m, pre, calibration_tokens, needed=align is Align.correlation)
    before = m.num_parameters()
    merge(m, windows, anchor=anchor.value, align=align.value, calibration=cal, source=spec)
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


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps typed errors to exit codes (see errors.py)."""
    try:
        app(args=argv, standalone_mode=False)
    except errors.FFMergeError as e:
        console.print(f"[red]error:[/red] {e}")
        return e.exit_code
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: no output was written")
        return errors.EXIT_INTERRUPTED
    except typer.Exit as e:
        return e.exit_code
    except (typer.BadParameter, typer.Abort) as e:
        console.print(f"[red]error:[/red] {e}")
        return errors.EXIT_USAGE
    except Exception as e:  # click usage errors (typer vendors click, so match by shape)
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            return errors.EXIT_USAGE
        raise
    return errors.EXIT_OK


def entry() -> None:
    sys.exit(main())
