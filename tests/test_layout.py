"""The package's design, checked: layers import only downwards, no import cycles, the pipeline order
and every choice list written once, research code out of the package."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ffmerge_onnx"
# lowest first; a module may import from its own layer and the ones before it
LAYERS = [
    {"_version", "errors", "progress", "fsutil", "runtime", "distributed"},
    {"families"},
    {"merging"},
    {"onnx"},
    {"quality"},
    {"pipeline"},
    {"cli", "__init__"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every ffmerge_onnx module a file imports, at any depth of the file (functions included)."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ffmerge_onnx")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("ffmerge_onnx"):
                names = {f"{target}.{a.name}" for a in node.names}  # `from . import x` may name a module
                found |= names
                if node.module or not all(_is_module(n) for n in names):
                    found.add(target)  # `from .. import distributed` reads that module, not the package
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_layers_import_only_downwards():
    upward = [
        f"{a} -> {b}"
        for a, targets in graph().items()
        for b in targets
        if a != "ffmerge_onnx" and layer_of(b) > layer_of(a)
    ]
    assert not upward, upward


def test_no_import_cycles():
    g = graph()
    # a package's __init__ re-exports its modules; importing it from one of them is the only allowed loop
    edges = {a: {b for b in bs if not a.startswith(b + ".")} for a, bs in g.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle.extend(path[path.index(nxt) :] + [node, nxt] if nxt in path else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, path + [node]):
                return True
        state[node] = 2
        return False

    for n in sorted(edges):
        if state.get(n) is None and visit(n, []):
            break
    assert not cycle, " -> ".join(cycle)


def test_research_code_is_not_in_the_package():
    source = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    for name in ("similarity_spearman", "lee_corpus", "shakespeare"):
        assert name not in source, name


@pytest.mark.parametrize(
    "registry,command,option",
    [
        ("ffmerge_onnx.merging.methods:METHODS", "merge", "--method"),
        ("ffmerge_onnx.merging.align:ANCHORS", "merge", "--anchor"),
        ("ffmerge_onnx.merging.align:ALIGNERS", "convert", "--align"),
        ("ffmerge_onnx.quality.finetune:OBJECTIVES", "merge", "--finetune-objective"),
        ("ffmerge_onnx.quality.finetune:TRAINABLE", "convert", "--finetune-train"),
        ("ffmerge_onnx.quality.finetune:SCHEDULES", "merge", "--finetune-schedule"),
        ("ffmerge_onnx.quality.search:SEARCH_MODES", "search", "--mode"),
        ("ffmerge_onnx.runtime:MODES", "convert", "--permutations"),
        ("ffmerge_onnx.onnx.passes.simplify:SIMPLIFIERS", "convert", "--simplifier"),
    ],
)
def test_every_choice_list_is_written_once_and_the_cli_offers_it(registry, command, option, capsys):
    import importlib

    from ffmerge_onnx.cli import main

    module, name = registry.split(":")
    names = list(getattr(importlib.import_module(module), name))
    cli_source = re.sub(r'Path\("[^"]*"\)', "", (PACKAGE / "cli.py").read_text())  # default folder names
    # the CLI does not spell the choices out (defaults are written as Enum members)
    assert not [n for n in names if f'"{n}"' in cli_source or f"'{n}'" in cli_source], names
    assert main([command, option, "no-such-choice"]) == 2
    refusal = " ".join(capsys.readouterr().err.split())
    assert all(f"'{n}'" in refusal for n in names), refusal


def test_the_pipeline_order_is_written_once():
    """Only pipeline.py calls the steps in order; the CLI calls pipeline functions only."""
    cli_source = (PACKAGE / "cli.py").read_text()
    for step in ("merge(", "recover(", "save_merged(", "build(", "validate(tmp"):
        assert f" {step}" not in cli_source and f"={step}" not in cli_source, step
    build_source = (PACKAGE / "onnx" / "build.py").read_text()
    assert build_source.count("FoldWeightTransposes()") == 1  # the pass order: graph_passes only
