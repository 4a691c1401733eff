"""Architecture adapters. What a family looks like is data (one JSON file per family beside this
module); this module only reads that data and resolves it on a loaded model or its config."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError

HOW_TO_ADD = (
    "Describe the model in a JSON adapter (stacks, FF projection paths, layout, bias, config keys; "
    "`ffmerge-onnx inspect MODEL --adapter-out FILE` writes the inferred one as a start) and pass "
    "it with --adapter FILE."
)
REQUIRED = ("name", "model_types", "task", "stacks", "ff", "layout", "bias", "config_keys")


@dataclass(frozen=True)
class Role:
    """One FF tensor: where it lives and which axis runs over the FF hidden units."""

    name: str  # e.g. "fc_in.weight"
    projection: str  # "in" | "gate" | "out"
    attr: str  # "weight" | "bias"
    hidden_axis: int | None  # None: lives in model space (b_out), never permuted
    blocks: int = 1  # d_ff-wide blocks along the hidden axis (2 for a fused gate/up projection)

    def index(self, perm) -> torch.Tensor:
        """The hidden-axis index that applies `perm` to every block alike."""
        perm = torch.as_tensor(perm, dtype=torch.long)
        return torch.cat([perm + b * len(perm) for b in range(self.blocks)]) if self.blocks > 1 else perm


def _config_value(config, spec: str | None):
    """A config value by key spec: alternatives split by '|', each `key`, `N*key` or `key.i` (entry i of a
    list, e.g. Swin's depths.2), first not None; an int spec is the value itself."""
    if isinstance(spec, int):
        return spec
    for alternative in (spec or "").split("|"):
        factor, _, key = alternative.strip().rpartition("*")
        key, dot, index = key.partition(".")
        value = getattr(config, key, None) if key else None
        if dot and value is not None:
            value = value[int(index)] if int(index) < len(value) else None
        if value is not None:
            return int(factor) * value if factor else value
    return None


@dataclass(frozen=True)
class Adapter:
    name: str
    description: str
    model_types: tuple[str, ...]
    task: str  # of the family's base model class
    heads: dict[str, str]  # model class name suffix -> task (a head on the base model)
    stacks: dict[str, tuple[str, ...]]  # stack name -> candidate paths under base_model
    projections: dict[str, tuple[str, ...] | None]  # in/gate/out -> candidate paths in a layer
    layout: str  # "linear" ([out, in]) or "conv1d" ([in, out])
    bias: bool
    config_keys: dict  # canonical name -> config key spec (per stack for num_layers and heads)
    position_offset: int = 0  # positions the embedding reserves (RoBERTa: 2)
    extra_tokens: int = 0  # tokens an image adds beyond its patches (ViT: CLS; DeiT: CLS + distillation)
    fused: tuple[str, ...] | None = None  # one `in` matrix holding gate and up, in this order (Phi-3: gate, in)

    @classmethod
    def from_json(cls, data: dict) -> Adapter:
        ff = data["ff"]
        return cls(
            name=data["name"],
            description=data.get("description", ""),
            model_types=tuple(data["model_types"]),
            task=data["task"],
            heads=dict(data.get("heads", {})),
            stacks={k: tuple(v) for k, v in data["stacks"].items()},
            projections={k: (tuple(v) if v else None) for k, v in ff.items()},
            layout=data["layout"],
            bias=bool(data["bias"]),
            config_keys=data["config_keys"],
            position_offset=int(data.get("position_offset", 0)),
            extra_tokens=int(data.get("extra_tokens", 0)),
            fused=tuple(data["fused"]) if data.get("fused") else None,
        )

    def to_json(self) -> dict:
        """The adapter as the JSON data from_json reads."""
        ff = {k: list(v) if v else None for k, v in self.projections.items()}
        data = {"name": self.name, "description": self.description, "model_types": list(self.model_types),
                "task": self.task, "heads": self.heads, "stacks": {k: list(v) for k, v in self.stacks.items()},
                "ff": ff, "layout": self.layout, "bias": self.bias, "config_keys": self.config_keys}  # fmt: skip
        if self.position_offset:
            data["position_offset"] = self.position_offset
        if self.extra_tokens:
            data["extra_tokens"] = self.extra_tokens
        if self.fused:
            data["fused"] = list(self.fused)
        return data

    def task_of(self, model: nn.Module) -> str:
        """The model's task: by its head class (e.g. BertForSequenceClassification), else the family's."""
        name = type(model).__name__
        return next((task for suffix, task in self.heads.items() if name.endswith(suffix)), self.task)

    @property
    def gated(self) -> bool:
        """A separate gate projection (a fused one is part of `in`)."""
        return self.projections.get("gate") is not None

    def up_block(self) -> int:
        """Which d_ff-wide block of the `in` projection's output is the up (not activated) part."""
        return self.fused.index("in") if self.fused else 0

    def roles(self) -> list[Role]:
        """Every FF tensor of one layer, with its hidden axis in PyTorch layout."""
        w_in_axis, w_out_axis = (0, 1) if self.layout == "linear" else (1, 0)
        roles = []
        names = {"in": "fc_in", "gate": "gate", "out": "fc_out"}
        for proj in ("in", "gate", "out"):
            if self.projections.get(proj) is None:
                continue
            axis = w_out_axis if proj == "out" else w_in_axis
            blocks = len(self.fused) if self.fused and proj == "in" else 1
            roles.append(Role(f"{names[proj]}.weight", proj, "weight", axis, blocks))
            if self.bias:
                roles.append(Role(f"{names[proj]}.bias", proj, "bias", None if proj == "out" else 0, blocks))
        return roles

    def role(self, name: str) -> Role:
        return next(r for r in self.roles() if r.name == name)

    # -- sizes from the config ------------------------------------------------------------
    def _key(self, name: str, stack: str | None = None) -> str | None:
        spec = self.config_keys.get(name)
        return spec.get(stack) if isinstance(spec, dict) else spec

    def d_model(self, config, stack: str | None = None) -> int:
        """Model width (of `stack`, where stages differ in width)."""
        return int(_config_value(config, self._key("d_model", stack)))

    def d_ff(self, config, stack: str | None = None) -> int:
        return int(_config_value(config, self._key("d_ff", stack)))

    def activation(self, config) -> str | None:
        return _config_value(config, self._key("activation"))

    def config_layers(self, config, stack: str) -> int:
        """Layers the config declares for a stack (the loaded model's count is `num_layers`)."""
        return int(_config_value(config, self._key("num_layers", stack)))

    def attention(self, config, stack: str) -> tuple[int, int]:
        """(key/value heads, head dim) of one attention layer of the stack."""
        heads = int(_config_value(config, self._key("heads", stack)))
        kv_heads = _config_value(config, self._key("kv_heads", stack)) or heads
        head_dim = _config_value(config, self._key("head_dim", stack)) or self.d_model(config, stack) // heads
        return int(kv_heads), int(head_dim)

    def max_positions(self, config) -> int | None:
        """Longest input the position embeddings take (None: no limit declared)."""
        limit = _config_value(config, self._key("max_positions"))
        return int(limit) - self.position_offset if limit else None

    def image_tokens(self, config) -> int:
        """Tokens one image becomes: its patches plus the family's extra tokens."""
        return (config.image_size // config.patch_size) ** 2 + self.extra_tokens

    @staticmethod
    def audio_frames(config, samples: int) -> int:
        """Frames a waveform of `samples` becomes (the output length of the conv feature encoder)."""
        for kernel, stride in zip(config.conv_kernel, config.conv_stride):
            samples = (samples - kernel) // stride + 1
        return max(0, samples)

    @staticmethod
    def spectrogram_positions(config) -> int:
        """Encoder positions one clip becomes (Whisper: a fixed window; its spectrogram has twice as many frames)."""
        return int(config.max_source_positions)

    @staticmethod
    def audio_samples(config, frames: int) -> int:
        """The shortest waveform that becomes `frames` frames."""
        for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride))):
            frames = (frames - 1) * stride + kernel
        return frames

    # -- resolving on a model -------------------------------------------------------
    def stack_names(self) -> list[str]:
        return list(self.stacks)

    def layers(self, model: nn.Module, stack: str) -> nn.ModuleList:
        if stack not in self.stacks:
            raise UnsupportedArchitectureError(f"{self.name} models have stacks {self.stack_names()}, not {stack!r}.")
        base = getattr(model, "base_model", model)
        for path in self.stacks[stack]:
            found = _get(base, path)
            if isinstance(found, nn.ModuleList):
                return found
        raise UnsupportedArchitectureError(
            f"Could not find the {stack} layers of this {self.name} model at any of "
            f"{list(self.stacks[stack])}. The model code may have changed; {HOW_TO_ADD}"
        )

    def stack_path(self, model: nn.Module, stack: str) -> str:
        """Qualified name of a stack's ModuleList inside the full model."""
        return _qualified_name(model, self.layers(model, stack))

    def projection(self, layer: nn.Module, proj: str) -> nn.Module:
        for path in self.projections[proj] or ():
            found = _get(layer, path)
            if isinstance(found, nn.Module):
                return found
        raise UnsupportedArchitectureError(
            f"Layer {type(layer).__name__} has no FF projection at {self.projections[proj]}. {HOW_TO_ADD}"
        )

    def projection_path(self, layer: nn.Module, proj: str) -> str:
        return _qualified_name(layer, self.projection(layer, proj))

    def ff_params(self, layer: nn.Module) -> dict[str, nn.Parameter]:
        """Role name -> Parameter for one layer's FF sublayer."""
        out = {}
        for role in self.roles():
            module = self.projection(layer, role.projection)
            param = getattr(module, role.attr, None)
            if param is None:
                raise UnsupportedArchitectureError(f"{self.name}: {role.name} is missing on {type(module).__name__}")
            out[role.name] = param
        return out

    def ff_dim(self, layer: nn.Module) -> int:
        w = self.projection(layer, "in").weight
        return (w.shape[0] if self.layout == "linear" else w.shape[1]) // (len(self.fused) if self.fused else 1)

    def model_dim(self, layer: nn.Module) -> int:
        """Width of the FF output (model space)."""
        w = self.projection(layer, "out").weight
        return w.shape[0] if self.layout == "linear" else w.shape[1]

    def num_layers(self, model: nn.Module, stack: str) -> int:
        return len(self.layers(model, stack))

    def layer_count_key(self, stack: str) -> str:
        return self._key("num_layers", stack).split("|")[0]


def _qualified_name(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise UnsupportedArchitectureError(f"{type(target).__name__} is not part of {type(root).__name__}")


def _get(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def modality(config) -> str:
    """What a model reads: "image" (ViT-style patches), "audio" (a waveform through a conv feature
    encoder, wav2vec2-style), "spectrogram" (log-mel features, Whisper-style) or "text"."""
    if hasattr(config, "image_size") and hasattr(config, "patch_size"):
        return "image"
    if getattr(config, "conv_kernel", None) and getattr(config, "conv_stride", None):
        return "audio"
    if getattr(config, "num_mel_bins", None) and getattr(config, "max_source_positions", None):
        return "spectrogram"
    return "text"


def task_of(model: nn.Module) -> str:
    """What a loaded model does: causal-lm, feature-extraction, text-classification, image-classification,
    audio-feature-extraction, seq2seq-lm, speech-seq2seq."""
    return adapter_for(model).task_of(model)


@lru_cache(maxsize=1)
def registry() -> dict[str, Adapter]:
    """All families shipped in ffmerge_onnx/families, by name."""
    adapters = {}
    for entry in resources.files("ffmerge_onnx.families").iterdir():
        if entry.name.endswith(".json"):
            adapter = Adapter.from_json(json.loads(entry.read_text()))
            adapters[adapter.name] = adapter
    return dict(sorted(adapters.items()))


_user: dict[str, Adapter] = {}  # --adapter FILE, ahead of the reviewed set
INFERENCE: dict = {}  # "model" / "config" -> an inferred adapter; filled by families/infer.py
BOUND = "_ffmerge_adapter"  # attribute of a model bound to an adapter; copies (deepcopy) keep it


def bind(model: nn.Module, adapter: Adapter) -> None:
    """Use `adapter` for this model and its copies (a merged folder's recorded adapter), whatever its type."""
    object.__setattr__(model, BOUND, adapter)


def read_adapter(path) -> Adapter:
    """A user's adapter file, checked: the JSON fields from_json needs, each of the right kind."""
    from pathlib import Path

    from ..errors import InputError

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"--adapter {path} is not a readable JSON file ({type(e).__name__}).") from e
    if not isinstance(data, dict):
        raise InputError(f"--adapter {path} holds a JSON {type(data).__name__}, not an object; see "
                         "ffmerge_onnx/families/*.json for the form.")  # fmt: skip
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise InputError(f"--adapter {path} lacks {', '.join(missing)}; see ffmerge_onnx/families/*.json for the form.")
    kinds = {"stacks": dict, "ff": dict, "config_keys": dict, "model_types": list, "layout": str, "task": str}
    wrong = [k for k, kind in kinds.items() if not isinstance(data[k], kind)]
    if wrong or data["layout"] not in ("linear", "conv1d") or not {"in", "out"} <= set(data["ff"]):
        raise InputError(
            f"--adapter {path}: {', '.join(wrong) or 'layout or ff'} is not of the expected form (layout linear or "
            "conv1d; ff with in, out and optionally gate; stacks, config_keys objects; model_types a list)."
        )
    fused = data.get("fused")
    if fused is not None and (not isinstance(fused, list) or sorted(fused) != ["gate", "in"] or data["ff"].get("gate")):
        raise InputError(
            f'--adapter {path}: fused must be the order of the halves of the one `in` matrix, ["gate", "in"] '
            'or ["in", "gate"], with ff.gate null.'
        )
    try:
        return Adapter.from_json(data)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputError(f"--adapter {path} is not a valid adapter ({type(e).__name__}: {e}).") from e


def use_adapter(path) -> Adapter:
    """Read a user's adapter file and use it for its model types in this process."""
    adapter = read_adapter(path)
    _user[adapter.name] = adapter
    return adapter


def forget_user_adapters() -> None:
    _user.clear()


def supported_model_types() -> list[str]:
    return sorted(t for a in registry().values() for t in a.model_types)


def registered(model_type: str) -> Adapter | None:
    """The user's or the reviewed adapter for a model type (None: none is written)."""
    return next((a for a in [*_user.values(), *registry().values()] if model_type in a.model_types), None)


def adapter_for(model_or_type) -> Adapter:
    """The adapter for a model, its config, or a config.model_type string: a user's (--adapter), else a
    reviewed one, else one inferred from the model's structure (a config is built on the meta device)."""
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        config = getattr(model_or_type, "config", model_or_type)
        model_type = getattr(config, "model_type", None) or type(model_or_type).__name__
    if isinstance(getattr(model_or_type, BOUND, None), Adapter):
        return getattr(model_or_type, BOUND)
    adapter = registered(model_type)
    if adapter is not None:
        return adapter
    if INFERENCE and isinstance(model_or_type, nn.Module) and hasattr(model_or_type, "config"):
        return INFERENCE["model"](model_or_type)
    if INFERENCE and hasattr(model_or_type, "to_dict") and getattr(model_or_type, "model_type", None):
        return INFERENCE["config"](model_or_type)
    raise UnsupportedArchitectureError(
        f"Model type {model_type!r} has no adapter and no loaded model to infer one from. Reviewed: "
        f"{', '.join(supported_model_types())}. {HOW_TO_ADD}"
    )
