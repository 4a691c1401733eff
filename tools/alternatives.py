"""Alternatives a user would compare merging with (research baselines, not shipped in the package).

Block-influence layer drop (ShortGPT, Men et al. 2024): each layer's influence is 1 minus the mean cosine
between the hidden state entering it and the one leaving it, over the calibration tokens; the `count`
layers of least influence go, wherever they are.

Linear block replacement (the ReplaceMe / LLM-Streamline family): remove layers a..b of a stack and
put one linear map in their place, fitted by least squares on the calibration residual stream: the
hidden state entering layer a, [h, 1], onto the hidden state leaving layer b. No training. It adds
d^2 + d parameters; the model's code is not changed: the map runs as a forward pre-hook on the first
layer after the gap (or as a forward hook on the last layer before it, when the gap ends the stack).

Skip corrections (a probe of what a merge plus per-layer linear maps can recover, not a shipped method):
after a merge, each layer of the window gets its own d x d map from its FF input to its FF output,
fitted by least squares to the residual stream's drift from the original, layer by layer."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ffmerge_onnx import adapter_for, drop_layers
from ffmerge_onnx.merging.calibration import run_batch
from ffmerge_onnx.merging.data import Calibration, token_mask

RIDGE = 1e-6


class LinearMap(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(h, self.weight, self.bias)


def layer_inputs(model: nn.Module, calibration: Calibration, stack: str) -> list[dict[int, torch.Tensor]]:
    """Per batch: the hidden state (real tokens, float64) entering every layer of the stack, and leaving
    the last one (index n)."""
    adapter = adapter_for(model)
    layers = adapter.layers(model, stack)
    out, current, handles = [], {}, []

    def grab(i):
        def pre(_m, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            current[i] = _tokens(h, current["mask"])

        return pre

    def last(_m, _args, output):
        h = output[0] if isinstance(output, tuple) else output
        current[len(layers)] = _tokens(h, current["mask"])

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(grab(i), with_kwargs=True))
    handles.append(layers[-1].register_forward_hook(last))
    try:
        for _ in _each_batch(model, calibration, stack, current):
            out.append({k: v for k, v in current.items() if k != "mask"})
            current.clear()
    finally:
        for h in handles:
            h.remove()
    return out


def _each_batch(model: nn.Module, calibration: Calibration, stack: str, state: dict):
    """Run the model on every calibration batch (no gradients), yielding after each; while it runs,
    state["mask"] is the batch's real-token mask (None for images) for hooks to read."""
    with torch.no_grad():
        for batch in calibration.batches:
            first = batch.get("input_ids", batch.get("pixel_values"))
            state["mask"] = token_mask(batch, stack, first.shape[1]) if first.dim() == 2 else None
            run_batch(model, batch)
            yield


def _tokens(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[tokens, d] float64: the real tokens of a text batch, every patch of an image batch."""
    return (h[mask] if mask is not None else h.reshape(-1, h.shape[-1])).double()


def fit_map(inputs: list[dict[int, torch.Tensor]], start: int, end: int) -> LinearMap:
    """Least squares [h_start, 1] -> h_{end + 1} over every calibration token, ridge RIDGE x mean diagonal."""
    return _least_squares(torch.cat([b[start] for b in inputs]), torch.cat([b[end + 1] for b in inputs]))[0]


def _least_squares(x: torch.Tensor, y: torch.Tensor, kind: type[LinearMap] = LinearMap) -> tuple[LinearMap, float]:
    """The map [x, 1] -> y by least squares (ridge RIDGE x mean diagonal) and the fraction of y it leaves."""
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    gram = x1.T @ x1
    lam = RIDGE * float(gram.diagonal().mean())
    sol = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), x1.T @ y)  # [d_in + 1, d_out]
    left = float((y - x1 @ sol).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30))
    return kind(sol[:-1].T.float().contiguous(), sol[-1].float().contiguous()), left


def replace_block(model: nn.Module, stack: str, start: int, end: int, linear: LinearMap) -> nn.Module:
    """Drop layers start..end and run `linear` where they were (in place); returns the model."""
    adapter = adapter_for(model)
    n = adapter.num_layers(model, stack)
    drop_layers(model, stack, list(range(start, end + 1)))
    layers = adapter.layers(model, stack)
    model.ffmerge_linear = linear  # registered as a submodule: counted by num_parameters()
    if end + 1 < n:

        def pre(_m, args, kwargs):
            if args:
                return (linear(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": linear(kwargs["hidden_states"])}

        layers[start].register_forward_pre_hook(pre, with_kwargs=True)
    else:

        def post(_m, _args, output):
            if isinstance(output, tuple):
                return (linear(output[0]), *output[1:])
            return linear(output)

        layers[start - 1].register_forward_hook(post)
    return model


def best_replacement(
    model: nn.Module,
    stack: str,
    count: int,
    calibration: Calibration,
    score: Callable[[nn.Module], float],
    *,
    higher_is_better: bool,
) -> dict:
    """Every run of `count` adjacent layers replaced in turn and scored; the best position and its rows."""
    n = adapter_for(model).num_layers(model, stack)
    inputs = layer_inputs(model, calibration, stack)
    rows = []
    for a in range(n - count + 1):
        trial = replace_block(copy.deepcopy(model), stack, a, a + count - 1, fit_map(inputs, a, a + count - 1))
        rows.append({"start": a, "end": a + count - 1, "score": float(score(trial))})
        del trial
    best = (max if higher_is_better else min)(rows, key=lambda r: r["score"])
    return {"rows": rows, "best": [best["start"], best["end"]], "inputs": inputs}


def block_influence(inputs: list[dict[int, torch.Tensor]], n: int) -> list[float]:
    """ShortGPT's BI per layer: 1 - mean cosine(h entering layer i, h leaving it) over every token."""
    out = []
    for i in range(n):
        cos = torch.cat([nn.functional.cosine_similarity(b[i], b[i + 1], dim=-1) for b in inputs])
        out.append(float(1 - cos.mean()))
    return out


def influence_drop(model: nn.Module, stack: str, count: int, calibration: Calibration) -> dict:
    """The `count` layers of least block influence dropped (from a copy); the model, the layers and every BI."""
    n = adapter_for(model).num_layers(model, stack)
    bi = block_influence(layer_inputs(model, calibration, stack), n)
    dropped = sorted(sorted(range(n), key=lambda i: bi[i])[:count])
    return {"model": drop_layers(copy.deepcopy(model), stack, dropped).model, "dropped": dropped, "influence": bi}


class SkipCorrection(LinearMap):
    """A layer's own linear map from its FF input to its FF output: out_projection(h) + x W^T + b."""

    seen: torch.Tensor | None = None  # the FF input of the current forward

    def remember(self, _m, args):
        self.seen = args[0]

    def add(self, _m, _args, output):
        return output + self(self.seen)


def _ff_rows(model: nn.Module, stack: str, i: int, calibration: Calibration):
    """Real tokens of layer i, float64: its FF input and the hidden state it leaves behind."""
    adapter = adapter_for(model)
    layer = adapter.layers(model, stack)[i]
    xs, hs, state = [], [], {}
    handles = [
        adapter.projection(layer, "in").register_forward_pre_hook(
            lambda _m, args: xs.append(_tokens(args[0], state["mask"]))
        ),
        layer.register_forward_hook(
            lambda _m, _a, out: hs.append(_tokens(out[0] if isinstance(out, tuple) else out, state["mask"]))
        ),
    ]
    try:
        for _ in _each_batch(model, calibration, stack, state):
            pass
    finally:
        for h in handles:
            h.remove()
    return torch.cat(xs), torch.cat(hs)


def skip_corrections(
    merged: nn.Module, original: nn.Module, stack: str, layers: list[int], calibration: Calibration
) -> list[float]:
    """Give each layer of `layers` (in order, in place) a SkipCorrection fitted by least squares: from the FF
    input the merged model really gives it, to the original's hidden state leaving the layer minus the
    merged one's (the residual stream's drift, attention included). d^2 + d parameters per layer. Returns
    each layer's unexplained fraction of the drift on the calibration tokens."""
    adapter = adapter_for(merged)
    target = layer_inputs(original, calibration, stack)
    left = []
    for i in layers:
        x, h = _ff_rows(merged, stack, i, calibration)
        skip, unexplained = _least_squares(x, torch.cat([b[i + 1] for b in target]) - h, SkipCorrection)
        left.append(unexplained)
        layer = adapter.layers(merged, stack)[i]
        layer.ffmerge_skip = skip  # a submodule: counted by num_parameters()
        adapter.projection(layer, "in").register_forward_pre_hook(skip.remember)
        adapter.projection(layer, "out").register_forward_hook(skip.add)
    return left
