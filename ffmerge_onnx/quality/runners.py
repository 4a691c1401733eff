"""How quality code reaches a model: a PyTorch module or an onnxruntime session, both returning the
main output (logits / last_hidden_state) for a batch of named inputs; and the encoder-decoder pair
greedy translation drives."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..families import task_of
from ..onnx.bf16 import runnable
from ..onnx.files import check_onnx
from ..runtime import SESSION_SETTINGS, check_loads, open_session, session_entries


class Runner:
    """Main output (logits / last_hidden_state) for named input tensors."""

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class TorchRunner(Runner):
    def __init__(self, model: nn.Module):
        self.model = model.eval()

    def __call__(self, inputs):
        kw = {"use_cache": False} if task_of(self.model) in ("causal-lm", "seq2seq-lm", "speech-seq2seq") else {}
        with torch.no_grad():
            out = self.model(**inputs, **kw)
        for name in ("logits", "last_hidden_state"):
            if getattr(out, name, None) is not None:
                return getattr(out, name)
        return out[0]


class OnnxRunner(Runner):
    """An exported model.onnx; past key/values (if the file takes them) are fed empty."""

    def __init__(self, path, session_entries: dict[str, str] | None = None):
        check_onnx(path)
        check_loads(Path(path), session_entries or {})
        with runnable(Path(path), "cpu") as runs:  # bf16: its CPU emulation
            self.session = open_session(runs, "cpu", session_entries or {})
        self.inputs = {i.name: i for i in self.session.get_inputs()}

    def __call__(self, inputs):
        feeds = {k: v.numpy() for k, v in inputs.items() if k in self.inputs}
        if "position_ids" in self.inputs and "position_ids" not in feeds:
            ids = inputs["input_ids"]
            feeds["position_ids"] = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).astype(np.int64).copy()
        batch = next(iter(feeds.values())).shape[0]
        for name, meta in self.inputs.items():
            if name.startswith("past_key_values."):
                feeds[name] = np.zeros((batch, meta.shape[1], 0, meta.shape[3]), np.float32)
        missing = set(self.inputs) - set(feeds)
        if missing:
            raise InputError(f"The ONNX model needs inputs {sorted(missing)} that this evaluation does not provide.")
        return torch.from_numpy(self.session.run([self.session.get_outputs()[0].name], feeds)[0])


def runner(model_or_path, entries: dict[str, str] | None = None) -> Runner:
    if isinstance(model_or_path, nn.Module):
        return TorchRunner(model_or_path)
    path = Path(model_or_path)
    if path.is_dir():
        path = path / "model.onnx"
    if path.suffix != ".onnx":
        raise InputError(f"{model_or_path}: give a PyTorch model, an .onnx file or a folder written by convert.")
    if entries is None:
        entries = session_entries(path.parent / SESSION_SETTINGS)
    return OnnxRunner(path, entries)


@dataclass
class Seq2SeqIds:
    """The token ids greedy decoding needs: decoder start, end of sequence, and tokens never chosen
    (the generation config's single-token `bad_words_ids`, e.g. Marian's pad)."""

    start: int
    eos: int
    forbid: tuple[int, ...] = ()

    @classmethod
    def from_configs(cls, config: dict, generation: dict | None = None) -> Seq2SeqIds:
        generation = generation or {}
        start = generation.get("decoder_start_token_id", config.get("decoder_start_token_id"))
        eos = generation.get("eos_token_id", config.get("eos_token_id"))
        if isinstance(eos, list):
            eos = eos[0]
        if start is None or eos is None:
            raise InputError("Translation needs decoder_start_token_id and eos_token_id in the model's config.")
        bad = generation.get("bad_words_ids") or config.get("bad_words_ids") or []
        return cls(int(start), int(eos), tuple(int(b[0]) for b in bad if len(b) == 1))


class TorchSeq2Seq:
    """Encoder and decoder of a PyTorch encoder-decoder model (no cache: the decoder sees the whole prefix)."""

    def __init__(self, model: nn.Module):
        self.model = model.eval()
        gen = model.generation_config.to_dict() if getattr(model, "generation_config", None) else {}
        self.ids = Seq2SeqIds.from_configs(model.config.to_dict(), gen)

    def encode(self, ids, mask):
        with torch.no_grad():
            return self.model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state

    def decode(self, dec_ids, mask, hidden):
        from transformers.modeling_outputs import BaseModelOutput

        with torch.no_grad():
            return self.model(
                attention_mask=mask,
                encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
                decoder_input_ids=dec_ids,
                use_cache=False,
            ).logits


class OnnxSeq2Seq:
    """encoder_model.onnx and decoder_model.onnx of a folder `convert` wrote, through onnxruntime."""

    def __init__(self, folder, session_entries: dict[str, str] | None = None):
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise InputError(f"{folder} has no config.json; translation needs the folder `convert` wrote.")
        self.encoder = runner(folder / "encoder_model.onnx", session_entries)
        self.decoder = runner(folder / "decoder_model.onnx", session_entries)
        self.ids = Seq2SeqIds.from_configs(
            read_json(folder / "config.json"), read_json(folder / "generation_config.json")
        )

    def encode(self, ids, mask):
        return self.encoder({"input_ids": ids, "attention_mask": mask})

    def decode(self, dec_ids, mask, hidden):
        return self.decoder({"input_ids": dec_ids, "encoder_attention_mask": mask, "encoder_hidden_states": hidden})


def read_json(path: Path) -> dict:
    """A JSON file's object, or {} when the file is not there; a typed error when it is not a JSON object."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InputError(f"{path} is not valid UTF-8 JSON ({type(e).__name__}); restore or re-create it.") from e
    if not isinstance(data, dict):
        raise InputError(f"{path} holds a JSON {type(data).__name__}, not an object; restore or re-create it.")
    return data
