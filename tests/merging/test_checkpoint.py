"""save_merged / load_merged and the manifest: a full fingerprint, paths kept inside the folder, types
checked, windows that match the ties, and configs checked against the checkpoint before allocation."""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

import pytest
import tiny_models as tm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from ffmerge_onnx import Window, merge
from ffmerge_onnx.errors import CorruptModelError, InputError, ManifestError, UnsafeModelError
from ffmerge_onnx.families.loading import load_model
from ffmerge_onnx.merging import load_merged, save_merged
from ffmerge_onnx.merging.manifest import Manifest, fingerprint

FAST = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    tm.build("gpt2").save_pretrained(root / "plain")
    model = load_model(str(root / "plain"))
    save_merged(merge(model, [Window("decoder", 1, 2)], align="none", progress=False), root / "merged")
    return root


def test_fingerprint_covers_every_byte_of_every_tensor():
    model = tm.build("gpt2")
    before = fingerprint(model)
    w = model.transformer.h[3].mlp.c_proj.weight
    assert w.numel() > 256
    with torch.no_grad():
        w.view(-1)[-1] = torch.nextafter(w.view(-1)[-1], torch.tensor(1.0))  # one ulp, the tensor's last element
    assert fingerprint(model) != before


def test_one_changed_byte_at_the_end_of_the_checkpoint_is_caught(saved, tmp_path):
    folder = shutil.copytree(saved / "merged", tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    key = max(state, key=lambda k: state[k].numel())
    flat = state[key].view(-1)
    flat[-1] = torch.nextafter(flat[-1], torch.tensor(1.0))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ManifestError, match="fingerprint"):
        load_merged(folder)


def test_a_manifest_without_a_fingerprint_is_refused(saved, tmp_path):
    folder = shutil.copytree(saved / "merged", tmp_path / "m")
    data = json.loads((folder / "ffmerge.json").read_text())
    del data["fingerprint"]
    (folder / "ffmerge.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="fingerprint"):
        load_merged(folder)


@pytest.mark.parametrize("name", ["../../cal.pt", "/etc/passwd", "..", "", "a/b.safetensors", "x\\..\\y", "a\0b"])
def test_permutations_file_must_be_a_plain_name_in_the_folder(saved, tmp_path, name):
    folder = shutil.copytree(saved / "merged", tmp_path / "m")
    data = json.loads((folder / "ffmerge.json").read_text())
    data["permutations_file"] = name
    (folder / "ffmerge.json").write_text(json.dumps(data))
    with pytest.raises(UnsafeModelError):
        load_merged(folder)
    result = load_merged(saved / "merged")
    result.manifest.permutations_file = name
    with pytest.raises(UnsafeModelError):  # and nothing is written outside the output folder
        save_merged(result, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_windows_that_do_not_match_the_ties_are_refused(saved, tmp_path):
    folder = shutil.copytree(saved / "merged", tmp_path / "m")
    data = json.loads((folder / "ffmerge.json").read_text())
    data["windows"][0].update(start=2, end=3)
    (folder / "ffmerge.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="tie"):
        load_merged(folder)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@FAST
@given(data=st.data())
def test_any_json_in_a_manifest_field_loads_or_gets_a_manifest_error(saved, data):
    """Property: replacing, dropping or adding one field (also inside a window) never raises anything
    but a typed manifest error."""
    base = json.loads((saved / "merged" / "ffmerge.json").read_text())
    where = base if data.draw(st.booleans()) else base["windows"][0]
    key = data.draw(st.sampled_from([*where, "extra"]))
    if data.draw(st.booleans()) and key in where:
        del where[key]
    else:
        where[key] = data.draw(JSON)
    try:
        Manifest.from_dict(base)
    except (ManifestError, UnsafeModelError):
        pass


SIZES = ["n_layer", "n_embd", "n_inner", "n_head", "vocab_size", "n_positions"]


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(SIZES), value=st.one_of(st.integers(-3, 300), st.integers(10**6, 2**63 - 1)))
def test_config_sizes_are_checked_against_the_checkpoint_before_allocation(saved, tmp_path_factory, key, value):
    """Property: any size in config.json loads the model it describes or is refused quickly with a typed
    error; nothing is built from sizes the checkpoint does not have."""
    folder = tmp_path_factory.mktemp("cfg")
    shutil.copytree(saved / "plain", folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    try:
        model = load_model(str(folder))
    except (CorruptModelError, InputError):
        pass
    else:
        assert getattr(model.config, key) == value
        want = load_file(str(folder / "model.safetensors"))
        got = model.state_dict()
        assert all(tuple(got[k].shape) == tuple(v.shape) for k, v in want.items() if k in got)
    assert time.perf_counter() - start < 20


def test_a_checkpoint_header_that_lies_is_refused_before_allocation(saved, tmp_path):
    folder = shutil.copytree(saved / "plain", tmp_path / "m")
    raw = (folder / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"] = [0, 2**40]
    blob = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
    with pytest.raises(CorruptModelError):
        load_model(str(folder))


def test_merging_a_merged_result_keeps_the_earlier_window(tmp_path):
    """merge() on a MergeResult adds windows: both stay in the manifest and tied after save and load."""
    first = merge(tm.build("gpt2"), [Window("decoder", 0, 1)], align="none", progress=False)
    both = merge(first, [Window("decoder", 2, 3)], align="none", progress=False)
    assert [(w.start, w.end) for w in both.manifest.windows] == [(0, 1), (2, 3)]
    save_merged(both, tmp_path / "m")
    loaded = load_merged(tmp_path / "m")
    h = loaded.model.transformer.h
    assert h[0].mlp.c_fc.weight is h[1].mlp.c_fc.weight and h[2].mlp.c_fc.weight is h[3].mlp.c_fc.weight
    assert h[1].mlp.c_fc.weight is not h[2].mlp.c_fc.weight


def _mapped_files(tensor: torch.Tensor) -> set[str]:
    """The files whose memory mapping holds the tensor's bytes (none: the heap)."""
    start = tensor.untyped_storage().data_ptr()
    found = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= start < high and len(fields) == 6:
            found.add(fields[5])
    return found


def test_a_merged_checkpoint_loads_memory_mapped_tied_and_copy_on_write(tmp_path):
    tm.build("llama").save_pretrained(tmp_path / "plain")  # rotary frequencies: a buffer computed, not stored
    result = merge(load_model(str(tmp_path / "plain")), [Window("decoder", 1, 2)], align="none", progress=False)
    save_merged(result, tmp_path / "merged")
    weights = tmp_path / "merged" / "model.safetensors"
    before = weights.read_bytes()
    model = load_merged(tmp_path / "merged").model
    mlp = [model.model.layers[i].mlp.up_proj for i in (1, 2)]
    assert mlp[0].weight is mlp[1].weight  # the tie is the same Parameter
    for name, p in model.named_parameters():
        assert _mapped_files(p) == {str(weights)}, name  # the file's pages, not a heap copy
        assert p.requires_grad
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, result.model(ids).logits)
        mlp[1].weight.mul_(2.0)  # a changed weight is copied on write: the file stays as it was
    assert mlp[0].weight is mlp[1].weight
    assert weights.read_bytes() == before
