"""What `ffmerge-onnx inspect` shows: a model's family and where its adapter comes from, its stacks, the FF
projections found, per-layer FF parameters and what merging k adjacent layers would remove. Reads the
config only: the model is built on the meta device, no weight is loaded."""

from __future__ import annotations

import torch

from .adapter import Adapter, adapter_for, registered, registry
from .loading import load_config, model_class


def source_of(adapter: Adapter) -> str:
    if adapter.name.startswith("inferred:"):
        return "inferred"
    return "reviewed" if registry().get(adapter.name) is adapter else "user (--adapter)"


def describe(spec: str, *, trust_remote_code: bool = False) -> tuple[dict, Adapter]:
    """(the description as JSON data, the adapter)."""
    config, _, _ = load_config(spec, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = model_class(config)._from_config(config)
    adapter = registered(config.model_type) or adapter_for(model)
    total = sum(p.numel() for p in model.parameters())
    stacks = {}
    for stack in adapter.stack_names():
        layers = adapter.layers(model, stack)
        first = layers[0]
        ff = sum(p.numel() for p in adapter.ff_params(first).values())
        projections = {}
        for proj in ("in", "gate", "out"):
            if adapter.projections.get(proj):
                module = adapter.projection(first, proj)
                projections[proj] = {"path": adapter.projection_path(first, proj), "shape": list(module.weight.shape)}
        stacks[stack] = {
            "path": adapter.stack_path(model, stack),
            "layers": len(layers),
            "block": type(first).__name__,
            "d_ff": adapter.ff_dim(first),
            "projections": projections,
            "ff_params_per_layer": ff,
            "layer_params": sum(p.numel() for p in first.parameters()),
            "merge_removes": {
                str(k): {"params": (k - 1) * ff, "fraction": (k - 1) * ff / total} for k in range(2, len(layers) + 1)
            },
        }
    data = {
        "model": spec,
        "model_type": config.model_type,
        "class": type(model).__name__,
        "family": adapter.name,
        "adapter": source_of(adapter),
        "task": adapter.task_of(model),
        "layout": adapter.layout,
        "bias": adapter.bias,
        "gated": adapter.gated or bool(adapter.fused),
        "fused": list(adapter.fused) if adapter.fused else None,  # gate and up in one `in` matrix, in this order
        "params": total,
        "stacks": stacks,
    }
    return data, adapter
