"""`validate` on ONNX graphs exported elsewhere: copies found with their bytes, parity with a reference,
exit codes and JSON for CI."""

import json

import numpy as np
import onnx
import pytest
import tiny_graphs as tg

from ffmerge_onnx import errors
from ffmerge_onnx.cli import main, run
from ffmerge_onnx.onnx.build import share_file
from ffmerge_onnx.onnx.validate_graph import feeds, validate_graph
from ffmerge_onnx.runtime import open_session

D, D_FF = 32, 64  # weights of 2,048 elements: above the 1,024-element threshold of what counts as a weight


@pytest.fixture
def graphs(tmp_path):
    """k=2 equal copies of an FF (what the paper's code saves), and the same with the copies shared."""
    ff = tg.random_ff(D, D_FF, seed=0)
    onnx.save(onnx.parser.parse_model(tg.ff_stack([ff, ff])), str(tmp_path / "copies.onnx"))
    share_file(tmp_path / "copies.onnx", tmp_path / "shared.onnx")
    return tmp_path / "copies.onnx", tmp_path / "shared.onnx"


def statuses(report):
    return {c["name"]: c["status"] for c in report["checks"]}


def test_copies_are_found_with_the_bytes_they_waste(graphs):
    copies, shared = graphs
    report = validate_graph(copies, measure_memory=False)
    sharing = next(c for c in report["checks"] if c["name"] == "sharing")["detail"]
    assert statuses(report) == {"load[cpu]": "pass", "sharing": "fail"} and not report["ok"]
    assert sharing["exact_copies"] == 2 and sharing["permuted_copies"] == 0
    assert sharing["wasted_bytes"] == 2 * D * D_FF * 4  # one copy of W_in and of W_out
    assert sharing["unique_bytes"] == sharing["initializer_bytes"] - sharing["wasted_bytes"]
    assert "ffmerge-onnx share" in sharing["fix"]
    fixed = validate_graph(shared, reference=copies, measure_memory=False)
    assert fixed["ok"] and statuses(fixed)["outputs_vs_reference"] == "pass"


def test_parity_with_a_reference_fails_on_other_weights(graphs, tmp_path):
    copies, _ = graphs
    other = tg.random_ff(D, D_FF, seed=1)
    onnx.save(onnx.parser.parse_model(tg.ff_stack([other, other])), str(tmp_path / "other.onnx"))
    report = validate_graph(tmp_path / "other.onnx", reference=copies, measure_memory=False)
    parity = next(c for c in report["checks"] if c["name"] == "outputs_vs_reference")
    assert parity["status"] == "fail" and parity["detail"]["rows"][0]["max_abs"] > 1.0


def test_generated_inputs_follow_the_signature(graphs):
    copies, _ = graphs
    data = feeds(open_session(copies, "cpu", {}))
    assert list(data) == ["x"] and data["x"].shape == (16, D) and data["x"].dtype == np.float32


def test_cli_exit_codes_json_and_memory(graphs, tmp_path):
    copies, shared = graphs
    assert main(["validate", str(copies), "--no-compare", "--json", str(tmp_path / "r.json")]) == errors.EXIT_VALIDATION
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is False
    np.savez(tmp_path / "inputs.npz", x=np.ones((3, D), np.float32))
    assert (
        main(["validate", str(shared), "--feeds", str(tmp_path / "inputs.npz"), "--json", str(tmp_path / "s.json")])
        == 0
    )
    report = json.loads((tmp_path / "s.json").read_text())
    memory = next(c for c in report["checks"] if c["name"] == "memory_latency")["detail"]
    assert memory["inputs"] == {"x": [3, D]} and memory["latency_ms"] > 0 and memory["peak"] >= 0
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    code, err = run(["validate", str(tmp_path / "bad.onnx")])
    assert code == errors.EXIT_USAGE and isinstance(err, errors.CorruptModelError)
    assert main(["validate", str(tmp_path / "nowhere.onnx")]) == errors.EXIT_USAGE
