"""The versioned JSON manifest written next to every merged model."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from ..errors import ManifestError

MANIFEST_NAME = "ffmerge.json"
PERMUTATIONS_NAME = "permutations.safetensors"
SCHEMA_VERSION = 1


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
    deltas: dict[str, int] = field(default_factory=dict)  # projection -> rank of each layer's correction

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
    def from_dict(cls, data: dict) -> Manifest:
        try:
            if data.get("schema_version") != SCHEMA_VERSION:
                raise ManifestError(
                    f"Manifest schema {data.get('schema_version')} is not {SCHEMA_VERSION}; "
                    "re-run `ffmerge-onnx merge` with this version of the tool."
                )
            windows = [WindowRecord(**w) for w in data.pop("windows", [])]
            return cls(windows=windows, **data)
        except TypeError as e:
            raise ManifestError(f"Manifest has unexpected or missing fields: {e}") from e

    def save(self, folder: Path, permutations: dict[str, torch.Tensor] | None = None) -> None:
        (folder / MANIFEST_NAME).write_text(self.to_json())
        if permutations:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in permutations.items()}, str(folder / self.permutations_file))

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        path = Path(folder) / MANIFEST_NAME
        if not path.exists():
            raise ManifestError(f"No {MANIFEST_NAME} in {folder}: is this a folder written by ffmerge-onnx?")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path} is not valid JSON ({e}).") from e
        return cls.from_dict(data)


def load_permutations(folder: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    path = Path(folder) / manifest.permutations_file
    if not path.exists():
        return {}
    from safetensors.torch import load_file

    return load_file(str(path))


def perm_key(stack: str, layer: int) -> str:
    return f"{stack}.{layer}"


def fingerprint(model: nn.Module) -> str:
    """Hash of the structure and of a sample of every weight: ties a manifest to its model."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel():
            h.update(t.detach().reshape(-1)[:256].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:32]
