"""A projection that reads a window's shared weight plus its own layer's low-rank correction:

    y = x W_shared^T + b_shared + (x D^T) U^T + c       (D: [r, d_in], U: [d_out, r], c: [d_out])

`weight` and `bias` are the shared (tied) Parameters, so adapters, ties and the ONNX sharing passes
see the projection as before; `delta_down`, `delta_up` and `delta_bias` are this layer's own."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..families import Adapter

DELTA_NAMES = ("delta_down", "delta_up", "delta_bias")


class LowRankDelta(nn.Module):
    def __init__(self, layout: str, d_in: int, d_out: int, rank: int, bias: bool, dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.layout = layout  # of `weight`: "linear" [out, in] or "conv1d" [in, out]
        self.d_in, self.d_out = d_in, d_out
        self.weight = nn.Parameter(torch.empty((d_out, d_in) if layout == "linear" else (d_in, d_out), **kw))
        self.bias = nn.Parameter(torch.empty(d_out, **kw)) if bias else None
        self.delta_down = nn.Parameter(torch.zeros(rank, d_in, **kw))
        self.delta_up = nn.Parameter(torch.zeros(d_out, rank, **kw))
        self.delta_bias = nn.Parameter(torch.zeros(d_out, **kw)) if bias else None

    @property
    def rank(self) -> int:
        return self.delta_down.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "linear":
            y = F.linear(x, self.weight, self.bias)
        else:  # GPT-2's Conv1D
            y = x @ self.weight
            y = y + self.bias if self.bias is not None else y
        return y + F.linear(F.linear(x, self.delta_down), self.delta_up, self.delta_bias)

    def extra_repr(self) -> str:
        return f"{self.layout}, d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}"


def wrap(adapter: Adapter, layer: nn.Module, projection: str, rank: int) -> LowRankDelta:
    """Put a LowRankDelta (zero correction) where the layer's projection is, reading its Parameters."""
    module = adapter.projection(layer, projection)
    w = module.weight
    d_out, d_in = w.shape if adapter.layout == "linear" else (w.shape[1], w.shape[0])
    has_bias = getattr(module, "bias", None) is not None
    new = LowRankDelta(adapter.layout, d_in, d_out, rank, has_bias, dtype=w.dtype, device=w.device)
    new.weight = w
    if has_bias:
        new.bias = module.bias
    path = adapter.projection_path(layer, projection)
    parent_path, _, attr = path.rpartition(".")
    setattr(layer.get_submodule(parent_path) if parent_path else layer, attr, new)
    return new


def delta_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every layer's own correction tensors."""
    return [p for m in model.modules() if isinstance(m, LowRankDelta) for p in m.parameters(recurse=False)
            if p is not m.weight and p is not m.bias]  # fmt: skip
