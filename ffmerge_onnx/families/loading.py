"""Loading models and their preprocessors: local folders, GGUF files or hub ids.

Safe defaults: safetensors first, pickle checkpoints only through weights_only loading,
remote code only when the user asks for it.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import struct
from pathlib import Path

import torch
import transformers
from torch import nn

from ..errors import CorruptModelError, InputError, UnsafeModelError
from .adapter import adapter_for
from .builtin import builtin_models

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on a header

AUTO_BY_TASK = {
    "causal-lm": "AutoModelForCausalLM",
    "feature-extraction": "AutoModel",
    "audio-feature-extraction": "AutoModel",
    "image-classification": "AutoModelForImageClassification",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "speech-seq2seq": "AutoModelForSpeechSeq2Seq",
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
    auto = getattr(transformers, AUTO_BY_TASK[adapter_for(config).task])
    return auto._model_mapping[type(config)]  # a GGUF config names no architecture


def checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape from the safetensors headers in `folder` (None: no safetensors there)."""
    from safetensors import SafetensorError, safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CorruptModelError(f"{index} is not a readable safetensors index ({type(e).__name__}).") from e
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    shapes = {}
    for name in files:
        path = (folder / name).resolve()
        if path.parent != folder.resolve():
            raise UnsafeModelError(f"{index} names weights file {name!r} outside the model's folder; refusing it.")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except (SafetensorError, OSError, ValueError) as e:
            raise CorruptModelError(
                f"{path} is not a readable safetensors file ({type(e).__name__}: {str(e)[:120]}). "
                "Is it truncated? Re-download or re-save the model."
            ) from e
    return shapes


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside get their Parameters on the meta device (no memory, no initialisation);
    buffers are built as usual, so computed ones (rotary frequencies) hold their values."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_model(config) -> nn.Module:
    """The model a config describes, its Parameters on the meta device: fill it with
    `load_state_dict(state, assign=True)` and it holds the state's tensors themselves (memory-mapped
    safetensors stay file pages, never copied into the heap)."""
    with _parameters_on_meta():
        return model_class(config)._from_config(config)


def _layer_count(shapes: dict[str, tuple], path: str) -> int:
    pattern = re.compile(rf"(?:^|\.){re.escape(path)}\.(\d+)\.")
    found = {int(m.group(1)) for k in shapes if (m := pattern.search(k))}
    return max(found) + 1 if found else 0


def check_config(config, folder: Path, adapter=None) -> None:
    """Refuse a config whose sizes its checkpoint does not have, before anything is allocated."""
    shapes = checkpoint_shapes(folder)
    if shapes is None:
        return
    adapter = adapter or adapter_for(config)
    for stack, paths in adapter.stacks.items():
        held = max(_layer_count(shapes, p) for p in paths)
        declared = adapter.config_layers(config, stack)
        if held and declared != held:
            raise CorruptModelError(
                f"{folder / 'config.json'} declares {declared} {stack} layers ({adapter.layer_count_key(stack)}) "
                f"but the checkpoint holds {held}. The config does not belong to these weights; restore it."
            )
    try:
        with torch.device("meta"):
            skeleton = model_class(config)._from_config(config)
    except (TypeError, ValueError, RuntimeError, OverflowError, AttributeError, KeyError, IndexError) as e:
        raise CorruptModelError(
            f"{folder / 'config.json'} describes a model that cannot be built ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120] if str(e) else ''}). Restore the config that came with the weights."
        ) from e
    wanted = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    prefix = skeleton.base_model_prefix
    for key, shape in shapes.items():
        want = wanted.get(key) or wanted.get(key.removeprefix(prefix + ".")) or wanted.get(f"{prefix}.{key}")
        if want is not None and want != shape:
            raise CorruptModelError(
                f"{folder / 'config.json'} implies {key} of shape {list(want)}, but the checkpoint holds "
                f"{list(shape)}. The config does not belong to these weights; restore it."
            )


def load_config(spec: str, *, trust_remote_code: bool = False):
    """(config, where, from_pretrained kwargs) of a model folder, .gguf file or hub id; checks that an
    adapter is written for it or can be inferred (on the meta device) before any weight is read."""
    where, gguf = resolve(spec)
    kwargs = {"trust_remote_code": trust_remote_code}
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        config = transformers.AutoConfig.from_pretrained(where, **kwargs)
    except (struct.error, EOFError, IndexError) as e:  # the GGUF reader on a cut or foreign file
        raise CorruptModelError(
            f"{spec} is not a readable GGUF file (it ends inside its header); re-download it."
        ) from e
    except MemoryError:
        raise
    except Exception as e:
        if "custom code" in str(e) or "trust_remote_code" in str(e):
            raise InputError(
                f"{spec} needs its own Python code to load (auto_map in its config.json). Pass --trust-remote-code "
                "only if you trust the code's author."
            ) from e
        hint = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise InputError(f"Could not read a model config from {spec}: {hint}") from e
    adapter_for(config)  # fail early: no adapter written and none can be inferred (on the meta device)
    return config, where, kwargs


def load_model(spec: str, *, trust_remote_code: bool = False) -> nn.Module:
    config, where, kwargs = load_config(spec, trust_remote_code=trust_remote_code)
    gguf = kwargs.get("gguf_file")
    if Path(where).is_dir() and not gguf:
        check_config(config, Path(where))
    cls = model_class(config)
    try:
        model = cls.from_pretrained(where, **kwargs)  # safetensors first by default
    except (OSError, ValueError, pickle.UnpicklingError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if isinstance(e, pickle.UnpicklingError) and "global" not in str(e).lower():
            raise CorruptModelError(
                f"{spec}: its pickle checkpoint is not readable; re-download it, or use safetensors."
            ) from e
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e) or "Weights only" in str(e):
            raise UnsafeModelError(
                f"{spec} stores its weights as a pickle that would run code when loaded; refusing it. "
                "Convert the checkpoint to safetensors with a tool you trust, or use a safetensors copy."
            ) from e
        raise InputError(f"Could not load model weights from {spec}: {first}") from e
    except Exception as e:
        if type(e).__name__ == "SafetensorError":
            raise CorruptModelError(
                f"The weights of {spec} are not a readable safetensors file ({str(e)[:150]}). Re-download them."
            ) from e
        raise
    model.eval()
    model.config._name_or_path = spec
    return model


def _has_audio_features(where: str, kwargs: dict) -> bool:
    """Whether an audio feature extractor (it has a sampling rate) lies beside the model."""
    try:
        found = transformers.AutoFeatureExtractor.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return hasattr(found, "sampling_rate")


def load_preprocessor(spec: str):
    """The tokenizer, image processor or audio feature extractor next to a model, or None when there is none."""
    where, gguf = resolve(spec)
    kwargs = {"gguf_file": gguf} if gguf else {}
    for loader in (transformers.AutoTokenizer, transformers.AutoImageProcessor, transformers.AutoFeatureExtractor):
        try:
            found = loader.from_pretrained(where, **kwargs)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        # transformers may build a tokenizer with an empty vocabulary when its files are missing
        if loader is transformers.AutoTokenizer and len(found) < 2:
            continue
        if loader is transformers.AutoTokenizer and _has_audio_features(where, kwargs):
            return transformers.AutoProcessor.from_pretrained(where, **kwargs)  # speech: features + text
        return found
    return None
