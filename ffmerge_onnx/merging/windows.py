"""Windows: which adjacent FF sublayers of a stack merge into one."""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import pairwise

from torch import nn

from ..errors import WindowError
from ..families import Adapter


@dataclass(frozen=True)
class Window:
    """Layers start..end (inclusive) of one stack, merged into one FF sublayer."""

    stack: str
    start: int
    end: int

    @property
    def layers(self) -> list[int]:
        return list(range(self.start, self.end + 1))

    @property
    def size(self) -> int:
        return self.end - self.start + 1

    def prefix(self) -> str:
        """Stem of the stable names of the window's shared tensors."""
        return f"ffmerge.{self.stack}.w{self.start}_{self.end}"


def parse_windows(spec: str, stack: str) -> list[Window]:
    """'3-5' or '0-2,6-8' -> windows of one stack."""
    windows = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", part)
        if not m:
            raise WindowError(f"Bad layer range {part!r}: write A-B, e.g. --layers 3-5 (inclusive).")
        windows.append(Window(stack, int(m.group(1)), int(m.group(2))))
    return windows


def windows_for(adapter: Adapter, layers: str, stack: str | None) -> list[Window]:
    """Windows from a --layers spec: in `stack`, or (none given) in every stack of a seq2seq model
    (the same indices on both sides) and in the only stack otherwise."""
    stacks = [stack] if stack else adapter.stack_names()
    return [w for s in stacks for w in parse_windows(layers, s)]


def check_windows(model: nn.Module, adapter: Adapter, windows: list[Window], allow_none: bool = False) -> None:
    if not windows and not allow_none:
        raise WindowError("No window given: pass --layers A-B.")
    for w in windows:
        if w.stack not in adapter.stacks:
            raise WindowError(f"{adapter.name} models have stacks {adapter.stack_names()}; got {w.stack!r}.")
        n = adapter.num_layers(model, w.stack)
        if w.size < 2:
            if w.end < w.start:
                raise WindowError(f"Window {w.start}-{w.end} is reversed; write it as {w.end}-{w.start}.")
            raise WindowError(f"Window {w.start}-{w.end} has {max(w.size, 0)} layer(s); a merge needs at least 2.")
        if w.start < 0 or w.end >= n:
            raise WindowError(f"Window {w.start}-{w.end} is out of range: the {w.stack} has layers 0-{n - 1}.")
    by_stack: dict[str, list[Window]] = {}
    for w in windows:
        by_stack.setdefault(w.stack, []).append(w)
    for ws in by_stack.values():
        ws = sorted(ws, key=lambda w: w.start)
        for a, b in pairwise(ws):
            if b.start <= a.end:
                raise WindowError(f"Windows {a.start}-{a.end} and {b.start}-{b.end} overlap; windows must be disjoint.")
