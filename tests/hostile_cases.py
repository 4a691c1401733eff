"""Bad and hostile inputs for every command and the Python API: (description, builder, expected error).

A builder gets a fresh case folder and returns CLI arguments, or a callable for the Python API. It may
write its own inputs into the folder; the test checks that nothing in it (nor in the shared inputs)
changes and that no output, temporary folder or lock file is left. `expected` is the error class the
run must end with (its exit code follows), or None for a usage error the option parser reports."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import tiny_models as tm
import torch
from safetensors.torch import load_file, save_file

from ffmerge_onnx import Window, errors, merge
from ffmerge_onnx.merging import load_merged, save_merged

E = errors


def _bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)  # fixed: the table must not change


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    out = change(data)
    path.write_text(json.dumps(data if out is None else out))


def cases(root: Path) -> list[tuple[str, object, type | None]]:
    gpt2, tok, cal, text = root / "gpt2", root / "gpt2tok", root / "cal.pt", root / "text.txt"
    merged, converted = root / "merged", root / "converted"

    def out(c):
        return str(c / "out")

    def m(*extra, model=gpt2, calibration=cal, cmd="merge", o=None):
        return [cmd, str(model), "-o", o or "out", "--calibration", str(calibration), "--calibration-tokens", "200",
                *extra]  # fmt: skip

    def conv(*extra, **kw):
        return m("--layers", "1-2", *extra, cmd="convert", **kw)

    def search(*extra, model=gpt2):
        return ["search", str(model), "-o", "out", "--calibration", str(cal), "--validation", str(cal),
                "--calibration-tokens", "200", "--validation-tokens", "200", *extra]  # fmt: skip

    def evaluate(*extra, model=tok, data=text):
        return ["evaluate", str(model), "--data", str(data), "--max-tokens", "200", *extra]

    def adapter(c, **changes) -> str:
        """A GPT-2 adapter file with some fields changed."""
        data = {"name": "x", "model_types": ["gpt2"], "task": "causal-lm", "stacks": {"decoder": ["h"]},
                "ff": {"in": ["mlp.c_fc"], "out": ["mlp.c_proj"]}, "layout": "conv1d", "bias": True,
                "config_keys": {"num_layers": {"decoder": "n_layer"}}, **changes}  # fmt: skip
        return str(write(c, "a.json", json.dumps(data)))

    def write(c, name, data: bytes | str):
        p = c / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return p

    def tensors(c, name, obj):
        torch.save(obj, c / name)
        return c / name

    # -- model folders the user brings ------------------------------------------------
    def model_copy(c):
        return _copy(gpt2, c / "m")

    def config_edit(change):
        def build(c):
            d = model_copy(c)
            _edit_json(d / "config.json", change)
            return m("--layers", "1-2", model=d)

        return build

    def config_bytes(data):
        def build(c):
            d = model_copy(c)
            (d / "config.json").write_bytes(data)
            return m(model=d)

        return build

    def weights(change):
        def build(c):
            d = model_copy(c)
            w = d / "model.safetensors"
            w.write_bytes(change(w.read_bytes()))
            return m("--layers", "1-2", model=d)

        return build

    def huge_header(c):
        d = model_copy(c)
        (d / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
        return m(model=d)

    def header_lies(c):
        d = model_copy(c)
        raw = (d / "model.safetensors").read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8 : 8 + n])
        key = next(k for k in header if k != "__metadata__")
        header[key]["shape"] = [10**6, 10**6]
        blob = json.dumps(header).encode()
        (d / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
        return m(model=d)

    def no_weights(c):
        d = model_copy(c)
        (d / "model.safetensors").unlink()
        return m(model=d)

    def pickle_bin(c):
        d = model_copy(c)
        state = load_file(str(d / "model.safetensors"))
        (d / "model.safetensors").unlink()

        class Evil:
            def __reduce__(self):
                return (os.system, ("echo pwned > " + str(c / "pwned"),))

        torch.save({**state, "evil": Evil()}, d / "pytorch_model.bin")
        return m(model=d)

    def random_bin(c):
        d = model_copy(c)
        (d / "model.safetensors").unlink()
        (d / "pytorch_model.bin").write_bytes(_bytes(4096))
        return m(model=d)

    def index_escape(c):
        d = model_copy(c)
        (d / "model.safetensors").rename(d / "part.safetensors")
        keys = load_file(str(d / "part.safetensors"))
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": dict.fromkeys(keys, "../../gpt2/model.safetensors")})
        )
        return m(model=d)

    def gguf(data):
        def build(c):
            return m(model=write(c, "m.gguf", data))

        return build

    def remote_code(c):
        d = model_copy(c)
        _edit_json(d / "config.json", lambda cfg: cfg.update(model_type="custom_thing", auto_map={
            "AutoConfig": "modeling.CustomConfig"}))  # fmt: skip
        return m(model=d)

    def model_is_file(c):
        return m(model=write(c, "model.txt", "hello"))

    def t5(c):
        import transformers as T

        cfg = T.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=50)
        T.T5Model(cfg).save_pretrained(c / "t5")
        return m("--align", "none", model=c / "t5")

    # -- merged folders (written by `merge`) ------------------------------------------
    def merged_copy(c):
        return _copy(merged, c / "mg")

    def manifest_edit(change, cmd="validate"):
        def build(c):
            d = merged_copy(c)
            _edit_json(d / "ffmerge.json", change)
            return ["evaluate", str(d), "--data", str(text)] if cmd == "evaluate" else m(model=d, cmd="merge")

        return build

    def manifest_bytes(data):
        def build(c):
            d = merged_copy(c)
            (d / "ffmerge.json").write_bytes(data)
            return m(model=d)

        return build

    def perm_symlink(c):
        d = merged_copy(c)
        secret = write(c, "secret.safetensors", b"")
        save_file({"x": torch.arange(3)}, str(secret))
        (d / "permutations.safetensors").unlink()
        os.symlink(secret, d / "permutations.safetensors")
        return m(model=d)

    def perm_file(data_or_tensors):
        def build(c):
            d = merged_copy(c)
            p = d / "permutations.safetensors"
            if isinstance(data_or_tensors, bytes):
                p.write_bytes(data_or_tensors)
            else:
                save_file(data_or_tensors, str(p))
            return m(model=d)

        return build

    def merged_weights_changed(c):
        d = merged_copy(c)
        state = load_file(str(d / "model.safetensors"))
        key = max(state)
        state[key] = state[key] + 1e-3
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        return m(model=d)

    def merged_config_mismatch(c):
        d = merged_copy(c)
        _edit_json(d / "config.json", lambda cfg: cfg.update(n_embd=64))
        return m(model=d)

    def merged_overlap(c):
        return m("--layers", "2-3", model=merged_copy(c))

    # -- converted folders (written by `convert`) -------------------------------------
    def conv_copy(c):
        return _copy(converted, c / "conv")

    def validate_after(change):
        def build(c):
            d = conv_copy(c)
            change(d, c)
            return ["validate", str(d), "--no-compare"]

        return build

    def truncate(name, keep=0.5):
        def change(d, c):
            data = (d / name).read_bytes()
            (d / name).write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[:-100])

        return change

    def set_manifest(data: bytes):
        def change(d, c):
            (d / "reference" / "ffmerge.json").write_bytes(data)

        return change

    def edit_ref_manifest(change_fn):
        def change(d, c):
            _edit_json(d / "reference" / "ffmerge.json", change_fn)

        return change

    def escaping(location):
        def change(d, c):
            from test_hardening import external_model

            external_model(d, location)

        return change

    # -- Python API ---------------------------------------------------------------------
    def api_model():
        return tm.build("gpt2")

    def api_nan(c):
        model = api_model()
        with torch.no_grad():
            model.transformer.h[2].mlp.c_fc.weight[0, 0] = float("nan")
        return lambda: merge(model, [Window("decoder", 1, 2)], align="none", progress=False)

    def api_twice(c):
        model = api_model()
        merge(model, [Window("decoder", 0, 1)], align="none", progress=False)
        return lambda: merge(model, [Window("decoder", 2, 3)], align="none", progress=False)

    def api_overlap(c):
        result = merge(api_model(), [Window("decoder", 0, 1)], align="none", progress=False)
        return lambda: merge(result, [Window("decoder", 1, 2)], align="none", progress=False)

    def api(fn):
        return lambda c: fn

    def api_save_into_input(c):
        from ffmerge_onnx.families.loading import load_model

        result = merge(load_model(str(gpt2)), [Window("decoder", 0, 1)], align="none", progress=False)
        return lambda: save_merged(result, gpt2, overwrite=True)

    def api_load_traversal(c):
        d = merged_copy(c)
        _edit_json(d / "ffmerge.json", lambda x: x.update(permutations_file="../../cal.pt"))
        return lambda: load_merged(d)

    def busy(argv_fn):
        def build(c):
            import fcntl

            from ffmerge_onnx.fsutil import _lock_path

            target = (c / "out").resolve()
            fd = os.open(_lock_path(target), os.O_RDWR | os.O_CREAT)
            fcntl.flock(fd, fcntl.LOCK_EX)  # another run holds it (a separate open file, as another process)
            c.joinpath(".held").write_text(str(fd))
            return argv_fn(c)

        return build

    return [
        # model arguments
        ("model path does not exist", lambda c: m(model=c / "nope"), E.InputError),
        ("model path is a file, not a folder", model_is_file, E.InputError),
        ("model folder without config.json", lambda c: m(model=(c / "m").mkdir() or c / "m"), E.InputError),
        ("a one-layer T5: no repeated blocks to merge", t5, E.UnsupportedArchitectureError),
        ("config.json is not JSON", config_bytes(b"{not json"), E.InputError),
        ("config.json is binary", config_bytes(_bytes(512)), E.InputError),
        ("config.json is a JSON list", config_bytes(b"[1, 2]"), E.InputError),
        ("config.json without model_type", config_edit(lambda cfg: cfg.pop("model_type")), E.InputError),
        ("config asks for remote code", remote_code, E.InputError),
        ("config declares 10^9 layers", config_edit(lambda cfg: cfg.update(n_layer=10**9)), E.CorruptModelError),
        (
            "config declares fewer layers than the weights",
            config_edit(lambda cfg: cfg.update(n_layer=2)),
            E.CorruptModelError,
        ),
        ("config width differs from the weights", config_edit(lambda cfg: cfg.update(n_embd=64)), E.CorruptModelError),
        (
            "config FF width differs from the weights",
            config_edit(lambda cfg: cfg.update(n_inner=1000)),
            E.CorruptModelError,
        ),
        ("config vocabulary of 10^12", config_edit(lambda cfg: cfg.update(vocab_size=10**12)), E.CorruptModelError),
        ("config positions of 10^12", config_edit(lambda cfg: cfg.update(n_positions=10**12)), E.CorruptModelError),
        ("weights truncated to half", weights(lambda b: b[: len(b) // 2]), E.CorruptModelError),
        ("weights missing their last 100 bytes", weights(lambda b: b[:-100]), E.CorruptModelError),
        ("weights file empty", weights(lambda b: b""), E.CorruptModelError),
        ("weights file random bytes", weights(lambda b: _bytes(len(b))), E.CorruptModelError),
        ("weights header declares 1 TB", huge_header, E.CorruptModelError),
        ("weights header lies about a shape", header_lies, E.CorruptModelError),
        ("no weights file", no_weights, E.InputError),
        ("pickle checkpoint that runs code", pickle_bin, E.UnsafeModelError),
        ("pickle checkpoint of random bytes", random_bin, E.InputError),
        ("weights index points outside the folder", index_escape, E.UnsafeModelError),
        ("GGUF file that does not exist", lambda c: m(model=c / "m.gguf"), E.InputError),
        ("GGUF file of random bytes", gguf(_bytes(4096)), E.InputError),
        ("GGUF header truncated", gguf(b"GGUF\x03\x00\x00\x00\x10"), E.InputError),
        ("GGUF file empty", gguf(b""), E.InputError),
        # windows
        ("window out of range", lambda c: m("--layers", "2-9"), E.WindowError),
        ("windows overlap", lambda c: m("--layers", "0-1,1-2"), E.WindowError),
        ("window of one layer", lambda c: m("--layers", "2-2"), E.WindowError),
        ("window reversed", lambda c: m("--layers", "3-1"), E.WindowError),
        ("--layers empty", lambda c: m("--layers", ""), E.WindowError),
        ("--layers not a range", lambda c: m("--layers", "a-b"), E.WindowError),
        ("--layers open range", lambda c: m("--layers", "1-"), E.WindowError),
        ("--layers negative start", lambda c: m("--layers", "-1-2"), E.WindowError),
        ("--layers trailing comma", lambda c: m("--layers", "1-2,"), E.WindowError),
        ("--layers huge numbers", lambda c: m("--layers", "1-99999999999999999999"), E.WindowError),
        ("--stack that the model lacks", lambda c: m("--layers", "1-2", "--stack", "encoder"), E.WindowError),
        # options
        ("--calibration-tokens 0", lambda c: m("--layers", "1-2", "--calibration-tokens", "0"), E.CalibrationError),
        (
            "--calibration-tokens negative",
            lambda c: m("--layers", "1-2", "--calibration-tokens", "-5"),
            E.CalibrationError,
        ),
        ("--calibration-tokens not a number", lambda c: m("--calibration-tokens", "many"), None),
        ("--method unknown", lambda c: m("--method", "magic"), None),
        ("--align unknown", lambda c: m("--align", "magic"), None),
        ("--anchor unknown", lambda c: m("--anchor", "magic"), None),
        ("--delta-rank without --method delta", lambda c: m("--layers", "1-2", "--delta-rank", "2"), E.InputError),
        (
            "--delta-rank negative",
            lambda c: m("--layers", "1-2", "--method", "delta", "--delta-rank", "-1"),
            E.InputError,
        ),
        (
            "--delta-rank and --delta-budget together",
            lambda c: m("--layers", "1-2", "--method", "delta", "--delta-rank", "1", "--delta-budget", "0.1"),
            E.InputError,
        ),
        (
            "--delta-budget above 1",
            lambda c: m("--layers", "1-2", "--method", "delta", "--delta-budget", "1.5"),
            E.InputError,
        ),
        (
            "--delta-budget negative",
            lambda c: m("--layers", "1-2", "--method", "delta", "--delta-budget", "-0.1"),
            E.InputError,
        ),
        ("--finetune-steps negative", lambda c: m("--layers", "1-2", "--finetune-steps", "-1"), E.InputError),
        (
            "--finetune-batch negative",
            lambda c: m("--layers", "1-2", "--finetune-steps", "2", "--finetune-batch", "-1"),
            E.InputError,
        ),
        (
            "--lr zero with fine-tuning",
            lambda c: m("--layers", "1-2", "--finetune-steps", "2", "--lr", "0"),
            E.InputError,
        ),
        (
            "--finetune-tokens 0",
            lambda c: m("--layers", "1-2", "--finetune-steps", "2", "--finetune-tokens", "0"),
            E.InputError,
        ),
        (
            "--finetune-data missing",
            lambda c: m("--layers", "1-2", "--finetune-steps", "2", "--finetune-data", str(c / "nope.txt")),
            E.CalibrationError,
        ),
        ("unknown option", lambda c: m("--frobnicate"), None),
        ("unknown command", lambda c: ["melt", str(gpt2)], None),
        # calibration data
        (
            "calibration path does not exist",
            lambda c: m("--layers", "1-2", calibration=c / "nope.pt"),
            E.CalibrationError,
        ),
        ("calibration file empty", lambda c: m(calibration=write(c, "empty.txt", "")), E.CalibrationError),
        ("calibration folder empty", lambda c: m(calibration=(c / "d").mkdir() or c / "d"), E.CalibrationError),
        (
            "calibration shorter than the token budget",
            lambda c: m(calibration=tensors(c, "short.pt", torch.randint(3, 90, (1, 8)))),
            E.CalibrationError,
        ),
        ("calibration images for a text model", lambda c: m(calibration=_image_folder(c)), E.CalibrationError),
        ("calibration WAV folder for a text model", lambda c: m(calibration=_wav_folder(c)), E.CalibrationError),
        (
            "calibration float tensors for a text model",
            lambda c: m(calibration=tensors(c, "px.pt", torch.randn(4, 3, 8, 8))),
            E.CalibrationError,
        ),
        ("calibration .pt that runs code when unpickled", lambda c: m(calibration=_evil_pt(c)), E.CalibrationError),
        (
            "calibration .pt truncated",
            lambda c: m(calibration=write(c, "t.pt", cal.read_bytes()[:100])),
            E.CalibrationError,
        ),
        (
            "calibration .pt of random bytes",
            lambda c: m(calibration=write(c, "r.pt", _bytes(2048))),
            E.CalibrationError,
        ),
        (
            "calibration .safetensors of random bytes",
            lambda c: m(calibration=write(c, "r.safetensors", _bytes(2048))),
            E.CalibrationError,
        ),
        (
            "calibration .npy of random bytes",
            lambda c: m(calibration=write(c, "r.npy", _bytes(2048))),
            E.CalibrationError,
        ),
        ("calibration .pt holding a list", lambda c: m(calibration=tensors(c, "l.pt", [1, 2, 3])), E.CalibrationError),
        (
            "calibration .pt holding a dict of strings",
            lambda c: m(calibration=tensors(c, "s.pt", {"input_ids": "hello"})),
            E.CalibrationError,
        ),
        ("calibration .pt holding an empty dict", lambda c: m(calibration=tensors(c, "e.pt", {})), E.CalibrationError),
        (
            "calibration token ids beyond the vocabulary",
            lambda c: m(calibration=tensors(c, "v.pt", torch.full((16, 16), 10**6))),
            E.CalibrationError,
        ),
        (
            "calibration negative token ids",
            lambda c: m(calibration=tensors(c, "n.pt", torch.full((16, 16), -3))),
            E.CalibrationError,
        ),
        (
            "calibration token ids as a 1-D tensor",
            lambda c: m(calibration=tensors(c, "1d.pt", torch.randint(3, 90, (300,)))),
            E.CalibrationError,
        ),
        (
            "calibration rows longer than the model's positions",
            lambda c: m(calibration=tensors(c, "long.pt", torch.randint(3, 90, (2, 4096)))),
            E.CalibrationError,
        ),
        (
            "calibration tensors of unequal batch sizes",
            lambda c: m(
                calibration=tensors(
                    c, "u.pt", {"input_ids": torch.randint(3, 90, (16, 16)), "attention_mask": torch.ones(3, 16)}
                )
            ),
            E.CalibrationError,
        ),
        (
            "calibration text that is binary",
            lambda c: m(model=tok, calibration=write(c, "b.txt", _bytes(4096))),
            E.CalibrationError,
        ),
        ("calibration text in UTF-16", lambda c: m(model=tok, calibration=_utf16(c)), E.CalibrationError),
        (
            "calibration text, model has no tokenizer",
            lambda c: m(calibration=write(c, "t.txt", "w5 " * 300)),
            E.CalibrationError,
        ),
        (
            "calibration text too short for the budget",
            lambda c: m(model=tok, calibration=write(c, "s.txt", "w5 w6")),
            E.CalibrationError,
        ),
        (
            "calibration folder of binary .txt files",
            lambda c: m(model=tok, calibration=write(c, "d/a.txt", _bytes(2048)).parent),
            E.CalibrationError,
        ),
        # outputs
        (
            "output folder exists",
            lambda c: m("--layers", "1-2", o=str((c / "out").mkdir() or c / "out")),
            E.OutputExistsError,
        ),
        (
            "output is a file that exists",
            lambda c: m("--layers", "1-2", o=str(write(c, "out", "x"))),
            E.OutputExistsError,
        ),
        (
            "-o the model folder itself, --overwrite",
            lambda c: m("--layers", "1-2", "--overwrite", o=str(gpt2)),
            E.InputError,
        ),
        (
            "-o the model's parent folder, --overwrite",
            lambda c: m("--layers", "1-2", "--overwrite", o=str(root)),
            E.InputError,
        ),
        ("-o inside the model folder", lambda c: m("--layers", "1-2", o=str(gpt2 / "out")), E.InputError),
        (
            "-o the calibration file, --overwrite",
            lambda c: m("--layers", "1-2", "--overwrite", o=str(cal)),
            E.InputError,
        ),
        ("-o . (the current folder), --overwrite", lambda c: m("--layers", "1-2", "--overwrite", o="."), E.InputError),
        ("-o /", lambda c: m("--layers", "1-2", "--overwrite", o="/"), E.InputError),
        ("-o under a file", lambda c: m("--layers", "1-2", o=str(write(c, "f", "x") / "out")), E.InputError),
        ("-o in a folder nobody can write", lambda c: m("--layers", "1-2", o="/proc/ffmerge-out"), E.InputError),
        ("-o name of 256 bytes", lambda c: m("--layers", "1-2", o="x" * 256), E.InputError),
        ("output locked by another run", busy(lambda c: m("--layers", "1-2")), E.OutputBusyError),
        ("convert: output locked by another run", busy(lambda c: conv()), E.OutputBusyError),
        # merged folders as MODEL
        ("merged folder: window overlaps the merged one", merged_overlap, E.WindowError),
        ("merged folder: weights changed after writing", merged_weights_changed, E.ManifestError),
        ("merged folder: config does not fit its weights", merged_config_mismatch, E.CorruptModelError),
        ("manifest is a JSON list", manifest_bytes(b"[]"), E.ManifestError),
        ("manifest is binary", manifest_bytes(_bytes(1024)), E.ManifestError),
        ("manifest is empty", manifest_bytes(b""), E.ManifestError),
        ("manifest nested 100000 deep", manifest_bytes(b"[" * 100000 + b"]" * 100000), E.ManifestError),
        ("manifest without schema_version", manifest_edit(lambda x: x.pop("schema_version")), E.ManifestError),
        ("manifest of schema 1 (older tool)", manifest_edit(lambda x: x.update(schema_version=1)), E.ManifestError),
        ("manifest schema_version as a string", manifest_edit(lambda x: x.update(schema_version="2")), E.ManifestError),
        ("manifest without a fingerprint", manifest_edit(lambda x: x.pop("fingerprint")), E.ManifestError),
        ("manifest with an empty fingerprint", manifest_edit(lambda x: x.update(fingerprint="")), E.ManifestError),
        (
            "manifest with a sampled (old) fingerprint",
            manifest_edit(lambda x: x.update(fingerprint="0" * 32)),
            E.ManifestError,
        ),
        ("manifest with a wrong fingerprint", manifest_edit(lambda x: x.update(fingerprint="0" * 64)), E.ManifestError),
        (
            "manifest permutations_file ../../cal.pt",
            manifest_edit(lambda x: x.update(permutations_file="../../cal.pt")),
            E.UnsafeModelError,
        ),
        (
            "manifest permutations_file /etc/passwd",
            manifest_edit(lambda x: x.update(permutations_file="/etc/passwd")),
            E.UnsafeModelError,
        ),
        (
            "manifest permutations_file empty",
            manifest_edit(lambda x: x.update(permutations_file="")),
            E.UnsafeModelError,
        ),
        (
            "manifest permutations_file '..'",
            manifest_edit(lambda x: x.update(permutations_file="..")),
            E.UnsafeModelError,
        ),
        (
            "manifest permutations_file a number",
            manifest_edit(lambda x: x.update(permutations_file=7)),
            E.ManifestError,
        ),
        ("permutations file is a symlink out of the folder", perm_symlink, E.UnsafeModelError),
        ("permutations file of random bytes", perm_file(_bytes(512)), E.ManifestError),
        (
            "permutations file holding no permutation",
            perm_file({"decoder.1": torch.zeros(48, dtype=torch.long)}),
            E.ManifestError,
        ),
        ("manifest windows not a list", manifest_edit(lambda x: x.update(windows={"a": 1})), E.ManifestError),
        (
            "manifest window with one correction rank for a 2-layer window",
            manifest_edit(lambda x: x["windows"][0].update(deltas={"in": [1]})),
            E.ManifestError,
        ),
        (
            "manifest window without its fields",
            manifest_edit(lambda x: x.update(windows=[{"stack": "decoder"}])),
            E.ManifestError,
        ),
        (
            "manifest window start as a string",
            manifest_edit(lambda x: x["windows"][0].update(start="1")),
            E.ManifestError,
        ),
        ("manifest with an unknown field", manifest_edit(lambda x: x.update(surprise=1)), E.ManifestError),
        (
            "manifest model_type differs from config",
            manifest_edit(lambda x: x.update(model_type="llama")),
            E.ManifestError,
        ),
        (
            "manifest alias to a missing tensor",
            manifest_edit(lambda x: x["aliases"].update({"transformer.h.0.mlp.c_fc.weight": "nope"})),
            E.ManifestError,
        ),
        ("manifest stacks as a list", manifest_edit(lambda x: x.update(stacks=["decoder"])), E.ManifestError),
        (
            "evaluate: manifest permutations_file ../../cal.pt",
            manifest_edit(lambda x: x.update(permutations_file="../../cal.pt"), cmd="evaluate"),
            E.UnsafeModelError,
        ),
        ("a convert folder as MODEL", lambda c: m(model=conv_copy(c)), E.InputError),
        # convert
        ("convert: --permutations unknown", lambda c: ["convert", "--permutations", "zip"], None),
        ("convert: --simplifier unknown", lambda c: conv("--simplifier", "magic"), None),
        ("convert: --providers unknown", lambda c: conv("--providers", "tpu"), E.InputError),
        ("convert: --providers empty", lambda c: conv("--providers", ""), E.InputError),
        (
            "convert: gather with delta corrections",
            lambda c: conv("--method", "delta", "--delta-rank", "1", "--permutations", "gather"),
            E.InputError,
        ),
        ("convert: model does not exist", lambda c: conv(model=c / "nope"), E.InputError),
        ("convert: -o the model folder, --overwrite", lambda c: conv("--overwrite", o=str(gpt2)), E.InputError),
        (
            "convert: -o the folder holding the calibration file, --overwrite",
            lambda c: conv("--overwrite", calibration=_tensor_folder(c), o=str(c / "cal")),
            E.InputError,
        ),
        ("convert: --precision unknown", lambda c: conv("--precision", "int3"), None),
        (
            "convert: --block-size not a power of 2",
            lambda c: conv("--precision", "int4", "--block-size", "24"),
            E.InputError,
        ),
        ("convert: --block-size 0", lambda c: conv("--precision", "int4", "--block-size", "0"), E.InputError),
        ("convert: --max-loss 1.5", lambda c: conv("--max-loss", "1.5"), E.InputError),
        ("convert: --max-loss -0.1", lambda c: conv("--max-loss", "-0.1"), E.InputError),
        (
            "convert: --eval-data does not exist",
            lambda c: conv("--max-loss", "0.1", "--eval-data", str(c / "nope.txt")),
            E.InputError,
        ),
        # automatic windows, method and recovery (quality/plan.py)
        ("merge: --reduction 1.5", lambda c: m("--reduction", "1.5"), E.InputError),
        ("merge: --reduction needing every layer", lambda c: m("--reduction", "0.6"), E.WindowError),
        ("merge: --layers auto without --reduction", lambda c: m("--layers", "auto"), E.InputError),
        (
            "merge: --reduction above what --layers removes",
            lambda c: m("--layers", "1-2", "--reduction", "0.3"),
            E.InputError,
        ),
        (
            "merge: --reduction with --method delta",
            lambda c: m("--reduction", "0.1", "--method", "delta"),
            E.InputError,
        ),
        ("merge: --validation does not exist", lambda c: m("--validation", str(c / "nope.txt")), E.CalibrationError),
        ("merge: --top 0", lambda c: m("--reduction", "0.1", "--top", "0"), E.InputError),
        ("merge: --recovery-minutes -1", lambda c: m("--recovery-minutes", "-1"), E.InputError),
        (
            "convert: --eval-data is the --calibration data",
            lambda c: conv("--max-loss", "0.1", "--eval-data", str(cal)),
            E.InputError,
        ),
        ("convert: --on-miss unknown", lambda c: conv("--on-miss", "maybe"), None),
        # user adapters
        ("--adapter does not exist", lambda c: m("--adapter", str(c / "nope.json")), E.InputError),
        ("--adapter is binary", lambda c: m("--adapter", str(write(c, "a.json", _bytes(256)))), E.InputError),
        ("--adapter is a JSON list", lambda c: m("--adapter", str(write(c, "a.json", "[1, 2]"))), E.InputError),
        ("--adapter lacks fields", lambda c: m("--adapter", str(write(c, "a.json", '{"name": "x"}'))), E.InputError),
        (
            "--adapter with a layout of neither kind",
            lambda c: m("--adapter", adapter(c, layout="diagonal")),
            E.InputError,
        ),
        (
            "--adapter naming projections the model lacks",
            lambda c: m("--layers", "1-2", "--adapter", adapter(c, ff={"in": ["mlp.nope"], "out": ["mlp.c_proj"]})),
            E.UnsupportedArchitectureError,
        ),
        ("inspect: model does not exist", lambda c: ["inspect", str(c / "nope")], E.InputError),
        # quantize
        (
            "quantize: a model folder, not a convert folder",
            lambda c: ["quantize", str(gpt2), "-o", out(c)],
            E.InputError,
        ),
        (
            "quantize: a convert folder without its reference",
            lambda c: ["quantize", str(_without_reference(conv_copy(c))), "-o", out(c)],
            E.InputError,
        ),
        (
            "quantize: -o the convert folder itself, --overwrite",
            lambda c: ["quantize", str(conv_copy(c)), "-o", str(c / "conv"), "--overwrite"],
            E.InputError,
        ),
        (
            "quantize: onnx_export.json is binary",
            lambda c: ["quantize", str(_with(conv_copy(c), "onnx_export.json", _bytes(64))), "-o", out(c)],
            E.InputError,
        ),
        ("quantize: --precision unknown", lambda c: ["quantize", str(converted), "--precision", "int3"], None),
        # search
        ("search: --top 0", lambda c: search("--merge-count", "2", "--mode", "aligned", "--top", "0"), E.InputError),
        ("search: --top -1", lambda c: search("--merge-count", "2", "--top", "-1"), E.InputError),
        ("search: neither --merge-count nor --reduction", lambda c: search(), E.InputError),
        (
            "search: both --merge-count and --reduction",
            lambda c: search("--merge-count", "2", "--reduction", "0.1"),
            E.InputError,
        ),
        ("search: --merge-count 1", lambda c: search("--merge-count", "1"), E.WindowError),
        ("search: --merge-count 0", lambda c: search("--merge-count", "0"), E.WindowError),
        ("search: --merge-count above the layers", lambda c: search("--merge-count", "99"), E.WindowError),
        ("search: --reduction 0", lambda c: search("--reduction", "0"), E.WindowError),
        ("search: --reduction 1.5", lambda c: search("--reduction", "1.5"), E.WindowError),
        ("search: --reduction negative", lambda c: search("--reduction", "-0.2"), E.WindowError),
        ("search: --reduction more than the FFs hold", lambda c: search("--reduction", "0.95"), E.WindowError),
        ("search: --mode unknown", lambda c: search("--merge-count", "2", "--mode", "magic"), None),
        (
            "search: --validation missing",
            lambda c: search("--merge-count", "2", "--validation", str(c / "no.pt")),
            E.CalibrationError,
        ),
        (
            "search: --validation-tokens 0",
            lambda c: search("--merge-count", "2", "--validation-tokens", "0"),
            E.CalibrationError,
        ),
        (
            "search: -o the model folder, --overwrite",
            lambda c: ["search", str(gpt2), "--merge-count", "2", "-o", str(gpt2), "--overwrite"],
            E.InputError,
        ),
        # analyze
        ("analyze: model does not exist", lambda c: ["analyze", str(c / "nope"), "-o", out(c)], E.InputError),
        (
            "analyze: calibration missing",
            lambda c: ["analyze", str(gpt2), "-o", out(c), "--calibration", str(c / "no.pt")],
            E.CalibrationError,
        ),
        (
            "analyze: -o inside the model folder",
            lambda c: ["analyze", str(gpt2), "-o", str(gpt2 / "x"), "--calibration", str(cal)],
            E.InputError,
        ),
        # evaluate
        ("evaluate: --window beyond the model's positions", lambda c: evaluate("--window", "100000"), E.InputError),
        ("evaluate: --window 1", lambda c: evaluate("--window", "1"), E.InputError),
        ("evaluate: --window negative", lambda c: evaluate("--window", "-5"), E.InputError),
        ("evaluate: --stride 0", lambda c: evaluate("--window", "16", "--stride", "0"), E.InputError),
        ("evaluate: --max-tokens 0", lambda c: evaluate("--max-tokens", "0"), E.InputError),
        ("evaluate: data is binary", lambda c: evaluate(data=write(c, "b.txt", _bytes(4096))), E.CalibrationError),
        ("evaluate: data file empty", lambda c: evaluate(data=write(c, "e.txt", "")), E.CalibrationError),
        ("evaluate: data path missing", lambda c: evaluate(data=c / "nope.txt"), E.InputError),
        (
            "evaluate: data folder without text",
            lambda c: evaluate(data=(c / "d").mkdir() or c / "d"),
            E.CalibrationError,
        ),
        ("evaluate: model does not exist", lambda c: evaluate(model=c / "nope"), E.InputError),
        (
            "evaluate: random bytes as .onnx",
            lambda c: evaluate(model=write(c, "x.onnx", _bytes(4096))),
            E.CorruptModelError,
        ),
        (
            "evaluate: onnx_export.json is a list",
            lambda c: evaluate(model=_with(conv_copy(c), "onnx_export.json", b"[]")),
            E.InputError,
        ),
        ("evaluate: model without tokenizer", lambda c: evaluate(model=gpt2), E.InputError),
        # validate
        ("validate: path does not exist", lambda c: ["validate", str(c / "nope")], E.InputError),
        ("validate: folder with no model in it", lambda c: ["validate", str(c)], E.InputError),
        ("validate: a text file", lambda c: ["validate", str(write(c, "a.txt", "hello"))], E.InputError),
        (
            "validate: random bytes as .onnx",
            lambda c: ["validate", str(write(c, "a.onnx", _bytes(999)))],
            E.CorruptModelError,
        ),
        ("validate: truncated model.onnx", validate_after(truncate("model.onnx")), E.CorruptModelError),
        ("validate: model.onnx empty", validate_after(truncate("model.onnx", 0)), E.CorruptModelError),
        ("validate: truncated external data file", validate_after(truncate("model.onnx.data", 1)), E.CorruptModelError),
        (
            "validate: external data file missing",
            validate_after(lambda d, c: (d / "model.onnx.data").unlink()),
            E.CorruptModelError,
        ),
        (
            "validate: external data at ../../etc/passwd",
            validate_after(escaping("../../etc/passwd")),
            E.UnsafeModelError,
        ),
        ("validate: external data at an absolute path", validate_after(escaping("/etc/passwd")), E.UnsafeModelError),
        ("validate: reference weights changed after writing", validate_after(_bump_reference), E.ManifestError),
        ("validate: reference manifest is a JSON list", validate_after(set_manifest(b"[]")), E.ManifestError),
        ("validate: reference manifest is binary", validate_after(set_manifest(_bytes(300))), E.ManifestError),
        (
            "validate: reference permutations_file escapes",
            validate_after(edit_ref_manifest(lambda x: x.update(permutations_file="../../../cal.pt"))),
            E.UnsafeModelError,
        ),
        (
            "validate: reference folder missing",
            validate_after(lambda d, c: shutil.rmtree(d / "reference")),
            E.InputError,
        ),
        (
            "validate: reference of another model",
            lambda c: ["validate", str(conv_copy(c)), "--no-compare", "--reference", str(gpt2)],
            E.InputError,
        ),
        (
            "validate: onnx_export.json is binary",
            validate_after(lambda d, c: _with(d, "onnx_export.json", _bytes(99))),
            E.InputError,
        ),
        (
            "validate: session settings are binary",
            validate_after(lambda d, c: _with(d, "ort_session_settings.json", _bytes(99))),
            E.InputError,
        ),
        (
            "validate: a graph that crashes onnxruntime's optimizer (LayerNormalization without bias)",
            validate_after(_layernorm_without_bias),
            E.CorruptModelError,
        ),
        (
            "validate: --json onto the model file",
            lambda c: ["validate", str(_plain_onnx(c)), "--json", str(c / "p" / "model.onnx")],
            E.InputError,
        ),
        (
            "validate: --json onto a folder",
            lambda c: ["validate", str(_plain_onnx(c)), "--json", str((c / "j").mkdir() or c / "j")],
            E.InputError,
        ),
        ("evaluate: --json onto the data file", lambda c: evaluate("--json", str(text)), E.InputError),
        (
            "validate: --providers unknown",
            lambda c: ["validate", str(conv_copy(c)), "--providers", "tpu"],
            E.InputError,
        ),
        (
            "validate: --feeds missing",
            lambda c: ["validate", str(_plain_onnx(c)), "--feeds", str(c / "no.npz")],
            E.InputError,
        ),
        (
            "validate: --feeds random bytes",
            lambda c: ["validate", str(_plain_onnx(c)), "--feeds", str(write(c, "f.npz", _bytes(256)))],
            E.InputError,
        ),
        (
            "validate: --feeds with the wrong input names",
            lambda c: ["validate", str(_plain_onnx(c)), "--feeds", str(_npz(c, y=np.ones((1, 4), np.float32)))],
            E.InputError,
        ),
        (
            "validate: --reference random bytes",
            lambda c: ["validate", str(_plain_onnx(c)), "--reference", str(write(c, "r.onnx", _bytes(256)))],
            E.CorruptModelError,
        ),
        # share
        (
            "share: random bytes as .onnx",
            lambda c: ["share", str(write(c, "x.onnx", _bytes(4096))), "-o", str(c / "y.onnx")],
            E.CorruptModelError,
        ),
        ("share: input missing", lambda c: ["share", str(c / "x.onnx"), "-o", str(c / "y.onnx")], E.InputError),
        ("share: input is a folder", lambda c: ["share", str(c), "-o", str(c / "y.onnx")], E.InputError),
        (
            "share: output would overwrite the input",
            lambda c: ["share", str(_plain_onnx(c)), "-o", str(c / "p" / "model.onnx"), "--overwrite"],
            E.InputError,
        ),
        (
            "share: -o an existing folder, --overwrite",
            lambda c: ["share", str(_plain_onnx(c)), "-o", str((c / "o").mkdir() or c / "o"), "--overwrite"],
            E.InputError,
        ),
        ("share: -o without .onnx", lambda c: ["share", str(_plain_onnx(c)), "-o", str(c / "y.txt")], E.InputError),
        (
            "share: output exists",
            lambda c: ["share", str(_plain_onnx(c)), "-o", str(write(c, "y.onnx", "x"))],
            E.OutputExistsError,
        ),
        (
            "share: -o the input's external data file, --overwrite",
            lambda c: ["share", str(_plain_onnx(c)), "-o", str(c / "p" / "model.onnx.data"), "--overwrite"],
            E.InputError,
        ),
        (
            "share: external data escaping the folder",
            lambda c: ["share", str(_escaping_onnx(c)), "-o", str(c / "y.onnx")],
            E.UnsafeModelError,
        ),
        # Python API
        ("API: merge() of a string", api(lambda: merge("gpt2", [Window("decoder", 0, 1)])), E.InputError),
        (
            "API: merge() with a Window, not a list",
            lambda c: lambda: merge(api_model(), Window("decoder", 0, 1), align="none"),
            E.InputError,
        ),
        (
            "API: merge() with tuples for windows",
            lambda c: lambda: merge(api_model(), [(0, 1)], align="none"),
            E.InputError,
        ),
        (
            "API: merge() with text as calibration",
            lambda c: lambda: merge(api_model(), [Window("decoder", 0, 1)], calibration="some text"),
            E.InputError,
        ),
        ("API: merge() with no windows", lambda c: lambda: merge(api_model(), [], align="none"), E.WindowError),
        (
            "API: merge() with an unknown method",
            lambda c: lambda: merge(api_model(), [Window("decoder", 0, 1)], align="none", method="magic"),
            E.InputError,
        ),
        (
            "API: merge() with an unknown parameter",
            lambda c: lambda: merge(api_model(), [Window("decoder", 0, 1)], align="none", params={"x": 1}),
            E.InputError,
        ),
        ("API: merge() of weights with NaN", api_nan, E.InputError),
        ("API: merge() of a module merged before", api_twice, E.InputError),
        ("API: merge() on a result, overlapping window", api_overlap, E.WindowError),
        (
            "API: merge() without calibration for correlation",
            lambda c: lambda: merge(api_model(), [Window("decoder", 0, 1)]),
            E.CalibrationError,
        ),
        ("API: save_merged() of a module", lambda c: lambda: save_merged(api_model(), c / "o"), E.InputError),
        ("API: save_merged() onto the model folder, overwrite=True", api_save_into_input, E.InputError),
        ("API: load_merged() of a plain model", lambda c: lambda: load_merged(gpt2), E.ManifestError),
        ("API: load_merged() of a missing folder", lambda c: lambda: load_merged(c / "nope"), E.ManifestError),
        ("API: load_merged() with a traversing permutations_file", api_load_traversal, E.UnsafeModelError),
    ]


def _layernorm_without_bias(d: Path, c: Path) -> None:
    import onnx

    m = onnx.load(str(d / "model.onnx"), load_external_data=False)
    node = next(n for n in m.graph.node if n.op_type == "LayerNormalization")
    node.input[2] = ""  # legal ONNX (the bias is optional); onnxruntime 1.32's fusions segfault on it
    onnx.save(m, str(d / "model.onnx"))


def _without_reference(folder: Path) -> Path:
    shutil.rmtree(folder / "reference")
    return folder


def _with(folder: Path, name: str, data: bytes) -> Path:
    (folder / name).write_bytes(data)
    return folder


def _image_folder(c: Path) -> Path:
    from PIL import Image

    (c / "img").mkdir()
    Image.new("RGB", (8, 8)).save(c / "img" / "a.png")
    return c / "img"


def _wav_folder(c: Path) -> Path:
    (c / "wav").mkdir()
    (c / "wav" / "a.wav").write_bytes(b"RIFF")  # never read: the model takes text
    return c / "wav"


def _evil_pt(c: Path) -> Path:
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(c / "pwned"),))

    torch.save({"input_ids": Evil()}, c / "evil.pt")
    return c / "evil.pt"


def _utf16(c: Path) -> Path:
    (c / "u16.txt").write_bytes(("w5 w6 " * 300).encode("utf-16"))
    return c / "u16.txt"


def _tensor_folder(c: Path) -> Path:
    (c / "cal").mkdir()
    torch.save(torch.randint(3, tm.VOCAB, (16, 16)), c / "cal" / "x.pt")
    return c / "cal" / "x.pt"


def _bump_reference(d: Path, c: Path) -> None:
    state = load_file(str(d / "reference" / "model.safetensors"))
    key = next(k for k in state if k.endswith("intermediate.dense.bias"))
    state[key] = state[key] + 1.0
    save_file(state, str(d / "reference" / "model.safetensors"), metadata={"format": "pt"})


def _plain_onnx(c: Path) -> Path:
    from test_hardening import external_model

    folder = c / "p"
    model = external_model(folder, "model.onnx.data")
    (folder / "model.onnx.data").write_bytes(np.ones((4, 4), np.float32).tobytes())
    return model


def _escaping_onnx(c: Path) -> Path:
    from test_hardening import external_model

    return external_model(c / "e", "../../etc/passwd")


def _npz(c: Path, **arrays) -> Path:
    np.savez(c / "feeds.npz", **arrays)
    return c / "feeds.npz"
