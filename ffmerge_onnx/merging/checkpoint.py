"""save_merged / load_merged: a tied model on disk stores each shared tensor once.

safetensors refuses tensors that share memory. We write one canonical key per distinct
tensor and record every other key as an alias in the manifest; loading fills the aliases
and re-ties them to the very same Parameter objects. The weights are the file's memory-mapped pages
(copy-on-write): loading reads nothing into the heap, and a tensor changed later is copied then.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CorruptModelError, InputError, ManifestError
from ..families import adapter_for
from ..families.adapter import bind, read_adapter, registry
from ..families.loading import check_config, empty_model
from ..fsutil import atomic_dir, check_target
from .manifest import Manifest, fingerprint, load_permutations
from .merge import MergeResult, restore_deltas
from .windows import Window, check_windows

WEIGHTS_NAME = "model.safetensors"
ADAPTER_NAME = "adapter.json"  # the structure of a model no reviewed adapter describes


def _storage_key(t: torch.Tensor):
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def canonical_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to write, alias -> canonical key) for the model's state dict."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = _storage_key(t) if t.numel() else ("empty", name)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = t.detach().contiguous()
    return tensors, aliases


def save_merged(result: MergeResult, folder, *, preprocessor=None, overwrite: bool = False) -> Path:
    """Write config, weights (each shared tensor once), manifest and permutations."""
    if not isinstance(result, MergeResult):
        raise InputError(
            f"save_merged takes the MergeResult that merge() or drop_layers() return, not {type(result).__name__}."
        )
    folder = Path(folder)
    model, manifest = result.model, result.manifest
    tensors, aliases = canonical_state(model)
    manifest.aliases = aliases
    check_target(folder, overwrite, [manifest.source])
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        model.config.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "ffmerge": "1"})
        manifest.save(tmp, result.permutations)
        adapter = adapter_for(model)
        if adapter.name not in registry():  # a user's or an inferred adapter travels with the folder
            (tmp / ADAPTER_NAME).write_text(json.dumps(adapter.to_json(), indent=1))
        if preprocessor is not None:
            preprocessor.save_pretrained(tmp)
    return folder


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, canonical in aliases.items():
        if alias in params and canonical in params:
            module_path, _, attr = alias.rpartition(".")
            module = model.get_submodule(module_path) if module_path else model
            setattr(module, attr, params[canonical])


def load_merged(folder, *, device: str = "cpu") -> MergeResult:
    """Rebuild the tied model written by save_merged; ties are the same Parameter objects."""
    folder = Path(folder)
    manifest = Manifest.load(folder)
    recorded = read_adapter(folder / ADAPTER_NAME) if (folder / ADAPTER_NAME).is_file() else None
    weights = folder / WEIGHTS_NAME
    if not weights.exists():
        raise InputError(f"{folder} has no {WEIGHTS_NAME}; was it written by save_merged()?")
    from safetensors import SafetensorError
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
        if config.model_type != manifest.model_type:
            raise ManifestError(
                f"{folder}: config.json is a {config.model_type!r} model, its manifest a {manifest.model_type!r} one."
            )
        check_config(config, folder, recorded)
        model = empty_model(config)
        if recorded is not None:
            bind(model, recorded)
        state = load_file(str(weights), device=device)  # memory-mapped on the CPU
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise CorruptModelError(
            f"Cannot read the merged checkpoint in {folder} ({type(e).__name__}: {str(e)[:200]}); re-run the merge."
        ) from e
    restore_deltas(model, adapter_for(model), manifest.windows)
    for alias, canonical in manifest.aliases.items():
        if canonical not in state:
            raise ManifestError(f"Manifest alias {alias} -> {canonical}, but {canonical} is not in {WEIGHTS_NAME}.")
        state[alias] = state[canonical]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ManifestError(f"The weights in {folder} do not fit its config: {str(e)[:300]}") from e
    _retie(model, manifest.aliases)
    model.eval()
    if fingerprint(model) != manifest.fingerprint:
        raise ManifestError(
            f"The weights in {folder} do not match its manifest's fingerprint; the folder was changed "
            "after it was written. Re-run the merge."
        )
    _check_windows(model, manifest, folder)
    return MergeResult(model, manifest, load_permutations(folder, manifest))


def _check_windows(model: nn.Module, manifest: Manifest, folder: Path) -> None:
    """The manifest's windows are the model's ties: each window's layers share one FF, no other layer does."""
    adapter = adapter_for(model)
    try:
        check_windows(model, adapter, [Window(w.stack, w.start, w.end) for w in manifest.windows], allow_none=True)
    except InputError as e:
        raise ManifestError(f"The manifest in {folder} records windows the model cannot have: {e}") from e
    for stack in adapter.stacks:
        groups: dict[int, list[int]] = {}
        for i, layer in enumerate(adapter.layers(model, stack)):
            groups.setdefault(id(next(iter(adapter.ff_params(layer).values()))), []).append(i)
        tied = sorted(g for g in groups.values() if len(g) > 1)
        recorded = sorted(w.layers for w in manifest.windows if w.stack == stack)
        if tied != recorded:
            raise ManifestError(
                f"The manifest in {folder} records merged {stack} layers {recorded}, but the weights tie {tied}; "
                "the folder was changed after it was written. Re-run the merge."
            )
