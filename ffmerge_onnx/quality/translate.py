"""Greedy translation: one loop for a PyTorch encoder-decoder and its ONNX export."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import InputError
from ..merging.data import nonblank_lines
from ..progress import track


def greedy_ids(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int = 64) -> list[list[int]]:
    """Greedy decoding, the same loop for PyTorch and ONNX: the generated ids of each source
    (without the start token, up to and including end of sequence)."""
    hidden = model.encode(ids, mask)
    n = ids.shape[0]
    dec = torch.full((n, 1), model.ids.start, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = model.decode(dec, mask, hidden)[:, -1].float()
        if model.ids.forbid:
            logits[:, list(model.ids.forbid)] = -math.inf
        nxt = logits.argmax(-1).masked_fill(done, model.ids.eos)
        dec = torch.cat([dec, nxt[:, None]], dim=1)
        done |= nxt == model.ids.eos
        if bool(done.all()):
            break
    out = []
    for row in dec[:, 1:].tolist():
        out.append(row[: row.index(model.ids.eos) + 1] if model.ids.eos in row else row)
    return out


def translate(
    model, tokenizer, sources: list[str], *, batch_size: int = 8, max_new_tokens: int = 128, progress: bool = True
) -> list[str]:
    out = []
    for i in track(range(0, len(sources), batch_size), "translating", enabled=progress):
        enc = tokenizer(sources[i : i + batch_size], return_tensors="pt", padding=True, truncation=True)
        ids = greedy_ids(model, enc["input_ids"], enc["attention_mask"], max_new_tokens)
        out += tokenizer.batch_decode(ids, skip_special_tokens=True)
    return out


def read_pairs(path: Path) -> tuple[list[str], list[str]]:
    """Source and reference sentences from a TSV file: `source<TAB>reference` per line."""
    sources, refs = [], []
    for n, line in nonblank_lines(path, "sentence pairs"):
        parts = line.split("\t")
        if len(parts) != 2:
            raise InputError(f"{path}:{n}: expected `source<TAB>reference`, got {len(parts)} fields.")
        sources.append(parts[0])
        refs.append(parts[1])
    return sources, refs
