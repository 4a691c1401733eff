"""Fuzz `validate` and `share` with mutated and truncated ONNX files, `load_merged` with mutated
manifests, and `load_model` with mutated configs.

Every case must end in a pass, a failed validation report, or a typed ffmerge error; an
uncaught exception is a crash and a case over --timeout seconds a hang. Prints the counts;
exits 1 on any crash or hang.

    .venv/bin/python tools/fuzz_onnx.py --cases 200 --seed 0
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import shutil
import signal
import sys
import tempfile
import traceback
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang


def tiny_converted(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models as tm

    from ffmerge_onnx import Window, merge
    from ffmerge_onnx.pipeline import ExportOptions, export

    model = tm.build("bert")
    result = merge(model, [Window("encoder", 1, 3)], calibration=tm.calibration(model), progress=False)
    export(result, folder, ExportOptions(compare=False, external_data=True), log=lambda s: None)
    return folder


def byte_mutation(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    b = bytearray(data)
    kind = rng.choice(["flip", "truncate", "zero", "insert", "duplicate"])
    if kind == "flip":
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        b = b[: rng.randrange(len(b))]
    elif kind == "zero":
        i = rng.randrange(len(b))
        b[i : i + rng.randint(1, 256)] = bytes(min(len(b) - i, 256))[: len(b[i : i + 256])]
    elif kind == "insert":
        i = rng.randrange(len(b))
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        i, j = sorted(rng.randrange(len(b)) for _ in range(2))
        b[j:j] = b[i : i + 64]
    return kind, bytes(b)


def proto_mutation(model: onnx.ModelProto, rng: random.Random) -> str:
    g = model.graph
    kind = rng.choice(["dims", "dtype", "location", "offset", "drop_node", "rename_input", "drop_initializer", "attr"])
    inits = list(g.initializer)
    if kind == "dims" and inits:
        t = rng.choice(inits)
        if t.dims:
            t.dims[rng.randrange(len(t.dims))] = rng.choice([0, 1, 3, 2**31 - 1, 10**12])
    elif kind == "dtype" and inits:
        rng.choice(inits).data_type = rng.randint(0, 25)
    elif kind in ("location", "offset"):
        ext = [t for t in inits if t.external_data]
        if ext:
            t = rng.choice(ext)
            for e in t.external_data:
                if kind == "location" and e.key == "location":
                    e.value = rng.choice(
                        [
                            "../../etc/passwd",
                            "/etc/passwd",
                            "missing.bin",
                            "",
                            "model.onnx",
                            "sub/../../x",
                            "model.onnx.data\x00x",
                        ]
                    )
                if kind == "offset" and e.key in ("offset", "length"):
                    e.value = str(rng.choice([-1, 0, 3, 2**40, 10**6]))
    elif kind == "drop_node" and g.node:
        del g.node[rng.randrange(len(g.node))]
    elif kind == "rename_input" and g.node:
        n = rng.choice(list(g.node))
        if n.input:
            n.input[rng.randrange(len(n.input))] = rng.choice(["", "nope", g.input[0].name])
    elif kind == "drop_initializer" and inits:
        del g.initializer[rng.randrange(len(inits))]
    elif kind == "attr":
        nodes = [n for n in g.node if n.attribute]
        if nodes:
            a = rng.choice(nodes).attribute[0]
            if a.type == onnx.AttributeProto.INT:
                a.i = rng.choice([-(2**40), -1, 0, 7, 2**40])
            else:
                a.name = "bogus"
    return kind


HOSTILE_VALUES = [None, True, -1, 0, 2**63, 10**9, 1.5, float("nan"), "", "..", "../../etc/passwd", "/etc/passwd",
                  "x" * 10_000, [], [1, "a"], {}, {"a": {"b": []}}]  # fmt: skip


def json_mutation(data, rng: random.Random) -> str:
    """Change, drop or add one value somewhere in a JSON object (in place); returns what it did."""
    node, path = data, []
    while isinstance(node, (dict, list)) and node and rng.random() < 0.6:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        if not isinstance(node[key], (dict, list)) or not node[key]:
            break
        node, path = node[key], [*path, str(key)]
    if not isinstance(node, (dict, list)) or not node:
        return "none"
    key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
    kind = rng.choice(["set", "drop", "add"]) if isinstance(node, dict) else "set"
    if kind == "drop":
        del node[key]
    elif kind == "add":
        node[f"extra{rng.randrange(9)}"] = rng.choice(HOSTILE_VALUES)
    else:
        node[key] = rng.choice(HOSTILE_VALUES)
    return f"{kind} {'/'.join([*path, str(key)])}"


def tiny_merged(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models as tm

    from ffmerge_onnx import Window, merge
    from ffmerge_onnx.families.loading import load_model
    from ffmerge_onnx.merging import save_merged

    tm.build("gpt2").save_pretrained(folder / "plain")
    model = load_model(str(folder / "plain"))
    save_merged(merge(model, [Window("decoder", 1, 2)], align="none", progress=False), folder / "merged")
    return folder


def run_json_case(target: str, folder: Path) -> str:
    from ffmerge_onnx.errors import FFMergeError
    from ffmerge_onnx.families.loading import load_model
    from ffmerge_onnx.merging import load_merged

    try:
        if target == "manifest":
            load_merged(folder)
        else:
            load_model(str(folder))
        return "pass"
    except FFMergeError as e:
        return type(e).__name__


def run_case(target: str, folder: Path, work: Path) -> str:
    from ffmerge_onnx.errors import FFMergeError
    from ffmerge_onnx.onnx.build import share_file
    from ffmerge_onnx.onnx.validate import validate

    try:
        if target == "validate":
            report = validate(folder, side_by_side=False)
            return "pass" if report["ok"] else "validation failed"
        share_file(folder / "model.onnx", work / "shared.onnx", overwrite=True)
        return "pass"
    except FFMergeError as e:
        return type(e).__name__


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=100, help="cases per target (validate, share, manifest, config)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=60)
    ap.add_argument("--verbose", action="store_true", help="name each case before running it")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    signal.signal(signal.SIGALRM, _alarm)
    targets = ("validate", "share", "manifest", "config")
    outcomes: dict[str, collections.Counter] = {t: collections.Counter() for t in targets}
    crashes = []
    with tempfile.TemporaryDirectory(prefix="ffmerge-fuzz-") as tmp:
        tmp = Path(tmp)
        base = tiny_converted(tmp / "base")
        original = (base / "model.onnx").read_bytes()
        saved = tiny_merged(tmp / "saved")
        for i in range(a.cases * len(targets)):
            target = targets[i % len(targets)]
            case = tmp / "case"
            shutil.rmtree(case, ignore_errors=True)
            if target in ("manifest", "config"):
                shutil.copytree(saved / ("merged" if target == "manifest" else "plain"), case)
                name = "ffmerge.json" if target == "manifest" else "config.json"
                raw = (case / name).read_bytes()
                if rng.random() < 0.25:
                    kind, data = byte_mutation(raw, rng)
                else:
                    obj = json.loads(raw)
                    kind = json_mutation(obj, rng)
                    data = json.dumps(obj).encode()
                (case / name).write_bytes(data)
            else:
                shutil.copytree(base, case)
                if rng.random() < 0.5:
                    kind, data = byte_mutation(original, rng)
                    (case / "model.onnx").write_bytes(data)
                else:
                    model = onnx.load_from_string(original)
                    kind = proto_mutation(model, rng)
                    (case / "model.onnx").write_bytes(model.SerializeToString())
                if rng.random() < 0.15:  # damage the external data file too
                    d = (case / "model.onnx.data").read_bytes()
                    (case / "model.onnx.data").write_bytes(d[: rng.randrange(len(d))])
                    kind += "+data"
            if a.verbose:  # the last line names the case if the process dies on it
                print(f"case {i} {target} {kind}", file=sys.stderr, flush=True)
            signal.alarm(a.timeout)
            try:
                if target in ("manifest", "config"):
                    outcome = run_json_case(target, case)
                else:
                    outcome = run_case(target, case, tmp)
            except Hang:
                outcome = "HANG"
                crashes.append((i, target, kind, "hang"))
            except Exception as e:  # noqa: BLE001 - this is what the fuzzer looks for
                outcome = "CRASH " + type(e).__name__
                crashes.append((i, target, kind, traceback.format_exc()))
            finally:
                signal.alarm(0)
            outcomes[target][outcome] += 1
    for target, counts in outcomes.items():
        print(f"{target}: {sum(counts.values())} cases: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    print(
        f"cases tried {a.cases * len(targets)}; crashes {sum(1 for c in crashes if c[3] != 'hang')}; "
        f"hangs {sum(1 for c in crashes if c[3] == 'hang')}"
    )
    for i, target, kind, tb in crashes[:5]:
        print(f"--- case {i} ({target}, {kind}):\n{tb}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
