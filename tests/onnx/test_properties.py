"""Property tests (hypothesis) on random small configurations, windows and permutations."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny_models as tm
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from ffmerge_onnx import Window, adapter_for, merge
from ffmerge_onnx.onnx.build import BuildOptions, build, share_file
from ffmerge_onnx.onnx.files import sharing
from ffmerge_onnx.onnx.validate import check_outputs
from ffmerge_onnx.runtime import session_settings

# exporting takes seconds: no shrinking, the failing example is printed as found
SLOW = settings(
    max_examples=4,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.slow
@SLOW
@given(
    model_type=st.sampled_from(["gpt2", "llama", "bert", "vit"]),
    start=st.integers(0, 2),
    size=st.integers(2, 4),
    mode=st.sampled_from(["fold", "gather"]),
    seed=st.integers(0, 2**16),
)
def test_rewrite_passes_preserve_outputs(model_type, start, size, mode, seed, tmp_path_factory):
    """Any window, either mode, any weights: the final ONNX matches PyTorch and stores each merged tensor once."""
    end = min(start + size - 1, 3)
    if end - start < 1:
        start = end - 1
    model = tm.build(model_type, seed=seed)
    adapter = adapter_for(model)
    result = merge(
        model, [Window(adapter.stack_names()[-1], start, end)], calibration=tm.calibration(model), progress=False
    )
    folder = tmp_path_factory.mktemp("prop")
    build(result, folder, BuildOptions(mode=mode))
    assert sharing(folder / "model.onnx")["duplicated_tensors"] == 0
    check = check_outputs(folder, model, "cpu", session_settings(mode)["session_config_entries"])
    assert check.status == "pass", check.detail


def _ff_stack(weights: list[tuple[np.ndarray, np.ndarray]]) -> onnx.ModelProto:
    """x -> [MatMul(W_in) -> Relu -> MatMul(W_out) + residual] per layer."""
    nodes, inits, cur = [], [], "x"
    for i, (w_in, w_out) in enumerate(weights):
        inits += [numpy_helper.from_array(w_in, f"l{i}.in"), numpy_helper.from_array(w_out, f"l{i}.out")]
        nodes += [
            helper.make_node("MatMul", [cur, f"l{i}.in"], [f"h{i}"]),
            helper.make_node("Relu", [f"h{i}"], [f"a{i}"]),
            helper.make_node("MatMul", [f"a{i}", f"l{i}.out"], [f"o{i}"]),
            helper.make_node("Add", [cur, f"o{i}"], [f"y{i}"]),
        ]
        cur = f"y{i}"
    d = weights[0][0].shape[0]
    g = helper.make_graph(
        nodes,
        "ff",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
        [helper.make_tensor_value_info(cur, TensorProto.FLOAT, ["n", d])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    d=st.integers(16, 32),
    hidden=st.integers(64, 128),  # >= 1024 elements: weights, not constants
    k=st.integers(2, 4),
    seed=st.integers(0, 2**16),
    identical=st.booleans(),
)
def test_detect_finds_planted_permutations(d, hidden, k, seed, identical, tmp_path_factory):
    """k layers store one FF, each in its own random neuron order: share finds every copy, output unchanged."""
    rng = np.random.default_rng(seed)
    w_in = rng.standard_normal((d, hidden)).astype(np.float32)
    w_out = rng.standard_normal((hidden, d)).astype(np.float32)
    weights = []
    for i in range(k):
        p = np.arange(hidden) if identical or i == 0 else rng.permutation(hidden)
        weights.append((w_in[:, p].copy(), w_out[p, :].copy()))
    folder = tmp_path_factory.mktemp("detect")
    onnx.save(_ff_stack(weights), str(folder / "m.onnx"))
    counts = share_file(folder / "m.onnx", folder / "s.onnx")
    planted_exact = sum(1 for i in range(1, k) if identical) * 2
    assert counts.get("duplicates_shared", 0) + counts.get("permuted_shared", 0) == 2 * (k - 1)
    assert counts.get("duplicates_shared", 0) >= planted_exact
    assert sharing(folder / "s.onnx")["duplicated_tensors"] == 0
    x = rng.standard_normal((5, d)).astype(np.float32)
    a = ort.InferenceSession(str(folder / "m.onnx")).run(None, {"x": x})[0]
    b = ort.InferenceSession(str(folder / "s.onnx")).run(None, {"x": x})[0]
    np.testing.assert_array_equal(a, b)
    assert (folder / "s.onnx").stat().st_size < (folder / "m.onnx").stat().st_size


@pytest.fixture(scope="module")
def exported_bert(tmp_path_factory):
    model = tm.build("bert")
    result = merge(model, [Window("encoder", 1, 2)], calibration=tm.calibration(model), progress=False)
    folder = tmp_path_factory.mktemp("bert")
    build(result, folder, BuildOptions())
    clean = check_outputs(folder, model, "cpu", {})
    assert clean.status == "pass"
    return model, folder, clean


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(factor=st.one_of(st.floats(0.0, 0.9), st.floats(1.1, 50.0)), position=st.integers(0, 31))
def test_validate_flags_perturbations_above_tolerance_only(exported_bert, factor, position, tmp_path_factory):
    """Add delta to one hidden feature of the exported output: validate fails iff delta exceeds the tolerance."""
    model, folder, clean = exported_bert
    rows = clean.detail["rows"]
    tol_min = min(r["tolerance"] for r in rows)
    tol_max = max(r["tolerance"] for r in rows)
    noise = max(r["max_abs"] for r in rows)
    delta = factor * (tol_min - noise) if factor < 1 else factor * tol_max + noise
    m = onnx.load(str(folder / "model.onnx"))
    out = m.graph.output[0]
    bump = np.zeros(32, np.float32)
    bump[position] = delta
    m.graph.initializer.append(numpy_helper.from_array(bump, "bump"))
    for n in m.graph.node:
        n.output[:] = [f"{o}.raw" if o == out.name else o for o in n.output]
        n.input[:] = [f"{i}.raw" if i == out.name else i for i in n.input]
    m.graph.node.append(helper.make_node("Add", [f"{out.name}.raw", "bump"], [out.name]))
    target = tmp_path_factory.mktemp("bumped")
    onnx.save(m, str(target / "model.onnx"))
    check = check_outputs(target, model, "cpu", {})
    assert (check.status == "pass") == (factor < 1), (factor, delta, tol_min, tol_max)
