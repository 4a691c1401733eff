"""Loading models and their preprocessors: local folders, GGUF files or hub ids.

Safe defaults: safetensors first, pickle checkpoints only through weights_only loading,
remote code only when the user asks for it.
"""

from __future__ import annotations

from pathlib import Path

import transformers
from torch import nn

from ..errors import InputError
from .adapter import adapter_for
from .builtin import builtin_models

AUTO_BY_TASK = {
    "causal-lm": "AutoModelForCausalLM",
    "feature-extraction": "AutoModel",
    "image-classification": "AutoModelForImageClassification",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "text-classification": "AutoModelForSequenceClassification",
}


def resolve(spec: str) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None). Built-in names map to package paths."""
    spec = builtin_models().get(spec, spec)
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(f"GGUF file {path} does not exist.")
        return str(path.parent), path.name
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise InputError(
                f"{path} is not a model folder (no config.json). "
                "Give a folder written by save_pretrained, a .gguf file or a hub id."
            )
        return str(path), None
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise InputError(f"{spec} does not exist. Give a model folder, a .gguf file or a hub id like gpt2.")
    return spec, None


def model_class(config) -> type:
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    auto = getattr(transformers, AUTO_BY_TASK[adapter_for(config.model_type).task])
    return auto._model_mapping[type(config)]  # a GGUF config names no architecture


def load_model(spec: str, *, trust_remote_code: bool = False) -> nn.Module:
    where, gguf = resolve(spec)
    kwargs = {"trust_remote_code": trust_remote_code}
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        config = transformers.AutoConfig.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as e:
        raise InputError(f"Could not read a model config from {spec}: {e}") from e
    adapter_for(config.model_type)  # fail early with the list of supported families
    cls = model_class(config)
    try:
        model = cls.from_pretrained(where, **kwargs)  # safetensors first by default
    except (OSError, ValueError) as e:
        raise InputError(f"Could not load model weights from {spec}: {e}") from e
    model.eval()
    model.config._name_or_path = spec
    return model


def load_preprocessor(spec: str):
    """The tokenizer or image processor next to a model, or None when there is none."""
    where, gguf = resolve(spec)
    kwargs = {"gguf_file": gguf} if gguf else {}
    for loader in (transformers.AutoTokenizer, transformers.AutoImageProcessor):
        try:
            found = loader.from_pretrained(where, **kwargs)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        # transformers may build a tokenizer with an empty vocabulary when its files are missing
        if loader is transformers.AutoTokenizer and len(found) < 2:
            continue
        return found
    return None
