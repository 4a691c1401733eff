"""The versioned JSON manifest written next to every merged model."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from ..errors import ManifestError, UnsafeModelError

MANIFEST_NAME = "ffmerge.json"
PERMUTATIONS_NAME = "permutations.safetensors"
SCHEMA_VERSION = 2  # 2: the fingerprint covers every byte of every tensor and is required
MAX_MANIFEST_BYTES = 64 * 2**20


@dataclass
class WindowRecord:
    stack: str
    start: int
    end: int  # inclusive
    anchor_layer: int
    align: str
    scores: dict[str, float]  # layer -> mean matched correlation with the anchor
    shared: dict[str, str]  # role -> stable name, e.g. "ffmerge.decoder.w3_5.fc_in.weight"
    method: str = "average"  # how the aligned FF tensors were combined (methods.METHODS)
    params: dict = field(default_factory=dict)  # the method's parameters
    deltas: dict[str, int | list[int]] = field(default_factory=dict)  # projection -> rank (or one per layer)

    @property
    def layers(self) -> list[int]:
        return list(range(self.start, self.end + 1))


@dataclass
class Manifest:
    source: str
    adapter: str
    model_type: str
    method: str  # "merge" | "drop" | "none" (an unchanged baseline)
    stacks: dict[str, int]  # stack -> number of layers after the change
    windows: list[WindowRecord] = field(default_factory=list)
    dropped: dict[str, list[int]] = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    finetune: dict = field(default_factory=dict)  # recovery fine-tune, if any
    fingerprint: str = ""
    aliases: dict[str, str] = field(default_factory=dict)  # state-dict key -> canonical key
    tool_version: str = __version__
    schema_version: int = SCHEMA_VERSION
    permutations_file: str = PERMUTATIONS_NAME

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data) -> Manifest:
        if not isinstance(data, dict):
            raise ManifestError(f"A manifest is a JSON object, not a JSON {type(data).__name__}; re-run the merge.")
        version = data.get("schema_version")
        if version is None:
            raise ManifestError(
                "The manifest has no schema_version; it was not written by ffmerge-onnx. Re-run the merge."
            )
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"The manifest has schema version {version!r}; this version of ffmerge-onnx reads version "
                f"{SCHEMA_VERSION} only. Re-run `ffmerge-onnx merge` with this version."
            )
        data = dict(data)
        raw_windows = data.pop("windows", [])
        if not isinstance(raw_windows, list) or not all(isinstance(w, dict) for w in raw_windows):
            raise ManifestError("The manifest's windows must be a list of objects; re-run the merge.")
        try:
            manifest = cls(windows=[WindowRecord(**w) for w in raw_windows], **data)
        except TypeError as e:
            raise ManifestError(f"The manifest has unexpected or missing fields ({e}); re-run the merge.") from e
        manifest.check()
        return manifest

    def check(self) -> None:
        """Field types, a full fingerprint, and a permutations file that stays inside the folder."""
        for f in fields(self):
            if f.name != "windows" and not isinstance(getattr(self, f.name), _TYPES[f.name]):
                raise ManifestError(f"The manifest's {f.name} has the wrong type; re-run the merge.")
        for w in self.windows:
            for f in fields(w):
                if not isinstance(getattr(w, f.name), _WINDOW_TYPES[f.name]):
                    raise ManifestError(f"A manifest window's {f.name} has the wrong type; re-run the merge.")
        for owner, maps in [(self, _MAP_VALUES), *((w, _WINDOW_MAP_VALUES) for w in self.windows)]:
            for name, kind in maps.items():
                if not all(isinstance(k, str) and isinstance(v, kind) for k, v in getattr(owner, name).items()):
                    raise ManifestError(f"The manifest's {name} must map names to {kind}; re-run the merge.")
        for w in self.windows:
            for projection, ranks in w.deltas.items():
                per_layer = ranks if isinstance(ranks, list) else [ranks] * len(w.layers)
                if len(per_layer) != len(w.layers) or not all(isinstance(r, int) and r >= 0 for r in per_layer):
                    raise ManifestError(
                        f"The manifest's {projection} correction ranks must be one rank or one per window layer "
                        f"({len(w.layers)}); got {ranks!r}. Re-run the merge."
                    )
        if len(self.fingerprint) != FINGERPRINT_CHARS:
            raise ManifestError(
                "The manifest has no full fingerprint of its weights, so nothing ties it to them; re-run the merge."
            )
        name = self.permutations_file
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise UnsafeModelError(
                f"The manifest names its permutations file {name!r}; only a plain file name inside the "
                "model's folder is allowed. Refusing to read or write it; re-run the merge."
            )

    def save(self, folder: Path, permutations: dict[str, torch.Tensor] | None = None) -> None:
        self.check()
        (folder / MANIFEST_NAME).write_text(self.to_json())
        if permutations:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in permutations.items()}, str(folder / self.permutations_file))

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        path = Path(folder) / MANIFEST_NAME
        if not path.exists():
            raise ManifestError(f"No {MANIFEST_NAME} in {folder}: is this a folder written by ffmerge-onnx?")
        if not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{path} is not a manifest file (a folder, or over {MAX_MANIFEST_BYTES:,} bytes).")
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ManifestError(f"{path} is not valid UTF-8 JSON ({type(e).__name__}); re-run the merge.") from e
        return cls.from_dict(data)


def load_permutations(folder: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    folder = Path(folder).resolve()
    path = (folder / manifest.permutations_file).resolve()
    if path.parent != folder:  # a symlink out of the folder
        raise UnsafeModelError(
            f"{manifest.permutations_file} in {folder} points outside the folder; refusing to read it."
        )
    if not path.exists():
        return {}
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        perms = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ManifestError(f"Cannot read the permutations in {path} ({type(e).__name__}); re-run the merge.") from e
    for key, p in perms.items():
        if (
            p.dim() != 1
            or p.dtype not in (torch.int64, torch.int32)
            or not torch.equal(torch.sort(p).values, torch.arange(p.numel(), dtype=p.dtype))
        ):
            raise ManifestError(f"{path}: {key} is not a permutation; re-run the merge.")
    return perms


def perm_key(stack: str, layer: int) -> str:
    return f"{stack}.{layer}"


FINGERPRINT_CHARS = 64


def fingerprint(model: nn.Module) -> str:
    """SHA-256 of every tensor's name, shape, dtype and every byte: ties a manifest to its weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        if t.numel():
            h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


_TYPES = {
    "source": str, "adapter": str, "model_type": str, "method": str, "stacks": dict, "windows": list,
    "dropped": dict, "calibration": dict, "finetune": dict, "fingerprint": str, "aliases": dict,
    "tool_version": str, "schema_version": int, "permutations_file": str,
}  # fmt: skip
_WINDOW_TYPES = {
    "stack": str, "start": int, "end": int, "anchor_layer": int, "align": str, "scores": dict, "shared": dict,
    "method": str, "params": dict, "deltas": dict,
}  # fmt: skip
_MAP_VALUES = {"stacks": int, "aliases": str}
_WINDOW_MAP_VALUES = {"scores": (int, float), "shared": str, "deltas": (int, list)}
