"""Small ONNX graphs for the pass tests, written in ONNX's text format (no binary fixtures).

`ff_stack` writes k residual FF layers the way torch.onnx exports nn.Linear (MatMul with a
Transpose of the [out, in] weight), each node tagged with the module path the exporter records."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from ffmerge_onnx.onnx.passes.base import SCOPES


def tensor(name: str, a: np.ndarray) -> str:
    """One initializer in ONNX text: float[3, 2] name = {...}."""
    values = ", ".join(f"{v:.9g}" for v in np.asarray(a, np.float32).ravel())
    return f"float[{', '.join(map(str, a.shape))}] {name} = {{{values}}}"


def random_ff(d: int, d_ff: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w_in": rng.standard_normal((d_ff, d)).astype(np.float32),
        "b_in": rng.standard_normal(d_ff).astype(np.float32),
        "w_out": rng.standard_normal((d, d_ff)).astype(np.float32),
        "b_out": rng.standard_normal(d).astype(np.float32),
    }


def permuted(ff: dict[str, np.ndarray], perm: np.ndarray) -> dict[str, np.ndarray]:
    """The same FF with its hidden units in another order (the same function)."""
    return {"w_in": ff["w_in"][perm], "b_in": ff["b_in"][perm], "w_out": ff["w_out"][:, perm], "b_out": ff["b_out"]}


def ff_stack(layers: list[dict[str, np.ndarray]]) -> str:
    """x -> for each layer: x + W_out^T relu(W_in^T x + b_in) + b_out, in ONNX text."""
    d = layers[0]["w_in"].shape[1]
    inits, body, cur = [], [], "x"
    for i, ff in enumerate(layers):
        inits += [tensor(f"l{i}_{k}", v) for k, v in ff.items()]
        body += [
            f"t_in{i} = Transpose(l{i}_w_in)",
            f"h{i} = MatMul({cur}, t_in{i})",
            f"hb{i} = Add(h{i}, l{i}_b_in)",
            f"a{i} = Relu(hb{i})",
            f"t_out{i} = Transpose(l{i}_w_out)",
            f"o{i} = MatMul(a{i}, t_out{i})",
            f"ob{i} = Add(o{i}, l{i}_b_out)",
            f"x{i + 1} = Add({cur}, ob{i})",
        ]
        cur = f"x{i + 1}"
    body.append(f"y = Identity({cur})")
    return (
        '<ir_version: 10, opset_import: ["" : 18]>\n'
        f"ff (float[N, {d}] x) => (float[N, {d}] y)\n"
        f"<{', '.join(inits)}>\n"
        "{\n  " + "\n  ".join(body) + "\n}\n"
    )


def layer_scopes(n_layers: int) -> dict[str, str]:
    """Output name -> module path, as torch.onnx records it: fc1 / fc2 of layers.<i>.mlp."""
    scopes = {}
    for i in range(n_layers):
        for out in (f"t_in{i}", f"h{i}", f"hb{i}"):
            scopes[out] = f"layers.{i}.mlp.fc1"
        for out in (f"t_out{i}", f"o{i}", f"ob{i}"):
            scopes[out] = f"layers.{i}.mlp.fc2"
    return scopes


def parse(text: str, scopes: dict[str, str] | None = None) -> ir.Model:
    """An onnx_ir model from ONNX text; nodes are named after their first output and carry `scopes`."""
    model = ir.from_proto(onnx.parser.parse_model(text))
    for node in model.graph:
        node.name = node.outputs[0].name
        if scopes and node.name in scopes:
            node.metadata_props[SCOPES] = str([scopes[node.name]])
    return model


def run(model: ir.Model, x: np.ndarray, entries: dict[str, str] | None = None) -> np.ndarray:
    so = ort.SessionOptions()
    for k, v in (entries or {}).items():
        so.add_session_config_entry(k, v)
    proto = ir.serde.serialize_model(model)
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def ff_targets(ff: dict[str, np.ndarray], layers=(0, 1)):
    """ShareMerged targets for one merged FF (PyTorch layout) read by fc1 / fc2 of the given layers."""
    from ffmerge_onnx.onnx.passes import Target

    roles = {
        "w_in": ("fc_in.weight", "fc1", 0),
        "b_in": ("fc_in.bias", "fc1", 0),
        "w_out": ("fc_out.weight", "fc2", 1),
        "b_out": ("fc_out.bias", "fc2", None),
    }
    return [
        Target(f"ffmerge.decoder.w0_1.{role}", ff[key], axis, [f"layers.{i}.mlp.{module}" for i in layers])
        for key, (role, module, axis) in roles.items()
    ]


def k_copies(k: int, d: int = 4, d_ff: int = 6, seed: int = 0) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """k layers storing equal copies of one FF (an untied export of a merged model), transposes folded."""
    from ffmerge_onnx.onnx.passes import FoldWeightTransposes

    ff = random_ff(d, d_ff, seed)
    model = parse(ff_stack([ff] * k), layer_scopes(k))
    return FoldWeightTransposes()(model).model, ff


def shared_pair(d: int = 4, d_ff: int = 6, seed: int = 0) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """Two layers reading one shared FF under its stable names (after ShareMerged)."""
    from ffmerge_onnx.onnx.passes import ShareMerged

    model, ff = k_copies(2, d, d_ff, seed)
    return ShareMerged(ff_targets(ff))(model).model, ff


def shared_weight_model(path, d: int = 1024, d_ff: int = 4096, layers: int = 6, seed: int = 0) -> None:
    """`layers` residual FF blocks that all read one shared pair of weights (MatMul + Relu + MatMul),
    written with onnx.helper: d x d_ff floats are too many to write out as text."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w_in = numpy_helper.from_array((rng.standard_normal((d, d_ff)) / d**0.5).astype(np.float32), "w_in")
    w_out = numpy_helper.from_array((rng.standard_normal((d_ff, d)) / d_ff**0.5).astype(np.float32), "w_out")
    nodes, cur = [], "x"
    for i in range(layers):
        nodes += [
            helper.make_node("MatMul", [cur, "w_in"], [f"h{i}"]),
            helper.make_node("Relu", [f"h{i}"], [f"a{i}"]),
            helper.make_node("MatMul", [f"a{i}", "w_out"], [f"o{i}"]),
            helper.make_node("Add", [cur, f"o{i}"], [f"x{i + 1}"]),
        ]
        cur = f"x{i + 1}"
    graph = helper.make_graph(
        nodes,
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
        [helper.make_tensor_value_info(cur, TensorProto.FLOAT, ["n", d])],
        [w_in, w_out],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def session(model: ir.Model) -> ort.InferenceSession:
    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
