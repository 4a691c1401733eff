"""Run calibration data through a model and stream FF statistics out of forward hooks.

A stream is named "<stack>.<layer>.<point>": point "pre" is the first projection's output
before the activation (the up projection for gated MLPs; its up block when gate and up are fused), "out" is the FF sublayer's output.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .. import distributed
from ..families import Adapter, adapter_for
from ..progress import track
from .data import Calibration, real_rows, token_mask
from .stats import Moments

DEFAULT_MAX_STAT_BYTES = 4 * 2**30
POINTS = {"pre": "in", "out": "out"}


@dataclass(frozen=True)
class Stream:
    stack: str
    layer: int
    point: str  # "pre" | "out"

    @property
    def key(self) -> str:
        return f"{self.stack}.{self.layer}.{self.point}"

    @classmethod
    def parse(cls, key: str) -> Stream:
        stack, layer, point = key.rsplit(".", 2)
        return cls(stack, int(layer), point)


def stream_dim(model: nn.Module, adapter: Adapter, s: Stream) -> int:
    layer = adapter.layers(model, s.stack)[s.layer]
    return adapter.ff_dim(layer) if s.point == "pre" else adapter.model_dim(layer)


def plan_passes(dims: dict[str, int], pairs: list[tuple[str, str]], max_bytes: int) -> list[list[tuple[str, str]]]:
    """Split pairs into groups whose statistics fit in max_bytes each (one data pass per group)."""
    groups: list[list[tuple[str, str]]] = [[]]
    used = 0
    for a, b in pairs:
        size = 8 * dims[a] * dims[b]
        if groups[-1] and used + size > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append((a, b))
        used += size
    return [g for g in groups if g]


class _Recorder:
    """Forward hooks that gather one batch's features for the streams of one pass."""

    def __init__(self, model: nn.Module, adapter: Adapter, streams: list[Stream]):
        self.features: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.handles = []
        self.modules: list[nn.Module] = []  # the forward may stop once all of these have run
        for s in streams:
            layer = adapter.layers(model, s.stack)[s.layer]
            module = adapter.projection(layer, POINTS[s.point])
            block = (adapter.up_block(), adapter.ff_dim(layer)) if s.point == "pre" and adapter.fused else None
            self.handles.append(module.register_forward_hook(self._hook(s, block)))
            self.modules.append(module)

    def _hook(self, s: Stream, block: tuple[int, int] | None):
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            if block is not None:  # a fused gate/up projection: its up block
                out = out[..., block[0] * block[1] : (block[0] + 1) * block[1]]
            mask = self.masks[s.stack]
            if mask is None:  # every position real
                self.features[s.key] = real_rows(out, None)
                return
            if out.dim() == 2 and out.shape[0] == mask.numel() and mask.dim() == 2:  # tokens flattened (OPT)
                out = out.reshape(*mask.shape, out.shape[-1])
            out = out.reshape(out.shape[0], -1, out.shape[-1]) if out.dim() > 2 else out.unsqueeze(0)
            if mask.shape != out.shape[:2]:
                raise RuntimeError(f"mask {tuple(mask.shape)} does not fit activations {tuple(out.shape)}")
            self.features[s.key] = out[mask]

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class _Stop(Exception):
    """Raised from a forward hook once the modules a caller reads have all run."""


@contextmanager
def _stopping_after(modules: list[nn.Module]):
    """The forward ends (with _Stop) as soon as every module in `modules` has run: the layers after the
    last one a caller reads, and the head, are never computed. Hooks added here run after the caller's."""
    pending = {id(m) for m in modules}
    seen: set[int] = set()

    def hook(module, _inputs, _output):
        seen.add(id(module))
        if seen >= pending:
            raise _Stop

    handles = [m.register_forward_hook(hook) for m in {id(m): m for m in modules}.values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_batch(model: nn.Module, batch: dict[str, torch.Tensor], stop_after: list[nn.Module] | None = None) -> None:
    """One forward pass for its hooks' sake; with `stop_after`, it ends once those modules have run."""
    kwargs = dict(batch)
    if getattr(model.config, "is_decoder", False) or hasattr(model, "generate"):
        kwargs.setdefault("use_cache", False)
    with _stopping_after(stop_after or []):
        try:
            try:
                model(**kwargs)
            except TypeError:
                kwargs.pop("use_cache", None)
                model(**kwargs)
        except _Stop:
            pass


def tokens_per_item(model: nn.Module, batch: dict[str, torch.Tensor], stack: str) -> int:
    if "pixel_values" in batch:
        return adapter_for(model).image_tokens(model.config)
    if "input_values" in batch:  # a waveform: frames of the conv feature encoder
        return adapter_for(model).audio_frames(model.config, batch["input_values"].shape[1])
    if "input_features" in batch and stack == "encoder":  # a spectrogram: the encoder's positions
        return adapter_for(model).spectrogram_positions(model.config)
    key = "decoder_input_ids" if stack == "decoder" and "decoder_input_ids" in batch else "input_ids"
    return batch[key].shape[1]


@torch.no_grad()
def collect(
    model: nn.Module,
    adapter: Adapter,
    calibration: Calibration,
    pairs: list[tuple[str, str]],
    *,
    max_bytes: int = DEFAULT_MAX_STAT_BYTES,
    progress: bool = True,
) -> list[Moments]:
    """Moments for every pair of stream keys, in as few data passes as memory allows. Under torchrun each
    rank reads its share of the batches and the sums are added across ranks (every rank gets the total)."""
    keys = sorted({k for p in pairs for k in p})
    dims = {k: stream_dim(model, adapter, Stream.parse(k)) for k in keys}
    was_training = model.training
    model.eval()
    results = []
    groups = plan_passes(dims, pairs, max_bytes)
    for i, group in enumerate(groups):
        streams = [Stream.parse(k) for k in sorted({k for p in group for k in p})]
        by_stack: dict[str, Moments] = {}  # encoder and decoder see different tokens
        for stack in {s.stack for s in streams}:
            pairs_here = [(a, b) for a, b in group if Stream.parse(a).stack == stack]
            if any(Stream.parse(b).stack != stack for _, b in pairs_here):
                raise ValueError("a pair must not cross stacks")
            by_stack[stack] = Moments({s.key: dims[s.key] for s in streams if s.stack == stack}, pairs_here)
        recorder = _Recorder(model, adapter, streams)
        try:
            label = "calibrating" + (f" (pass {i + 1}/{len(groups)})" if len(groups) > 1 else "")
            for batch in track(distributed.shard(calibration.batches), label, enabled=progress):
                recorder.features.clear()
                for stack in by_stack:
                    recorder.masks[stack] = token_mask(batch, stack, tokens_per_item(model, batch, stack), model.config)
                run_batch(model, batch, stop_after=recorder.modules)
                for stack, moments in by_stack.items():
                    moments.update({k: recorder.features[k] for k in moments.dims})
        finally:
            recorder.close()
        for moments in by_stack.values():
            sum_over_ranks(moments)
        results.extend(by_stack.values())
    model.train(was_training)
    return results


def sum_over_ranks(moments: Moments) -> None:
    """Add every rank's statistics in place (they are sums, so the total is what one process would get)."""
    if not distributed.world().active:
        return
    n = torch.tensor([moments.n], dtype=torch.int64)
    distributed.all_reduce_sum(n)
    moments.n = int(n.item())
    for t in [*moments.sum.values(), *moments.sumsq.values(), *moments.cross.values()]:
        distributed.all_reduce_sum(t)


def find(moments: list[Moments], a: str, b: str) -> Moments:
    for m in moments:
        if (a, b) in m.cross:
            return m
    raise KeyError((a, b))
