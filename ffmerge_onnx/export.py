"""Export to ONNX with torch.onnx.export(dynamo=True).

Why this exporter: it keeps Parameters tied by identity as one initializer and works with
current transformers. optimum-onnx 0.1.0 forces the legacy TorchScript exporter and needs
transformers<4.58, so we take optimum's role as the *interface*: the same input/output names
(input_ids, attention_mask, ... -> logits / last_hidden_state; encoder_model.onnx +
decoder_model.onnx for seq2seq) so ORTModel-style loaders and servers find what they expect.

The exporter's own optimizer is off: it constant-folds Transpose(weight) into a new tensor
per consumer, which would copy every shared weight once per layer. Our passes fold what is
safe to fold, once per tensor.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adapters import adapter_for
from .errors import GraphError

OPSET = 18


@dataclass(frozen=True)
class Part:
    """One ONNX file of an export: its wrapper module, example inputs and I/O names."""

    filename: str
    module: nn.Module
    example: dict[str, torch.Tensor]
    outputs: list[str]
    dynamic: dict[str, dict[int, str]]


class _CausalLM(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class _Encoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _Vision(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        out = self.model(pixel_values=pixel_values)
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


class _Seq2SeqDecoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, encoder_attention_mask, encoder_hidden_states):
        out = self.model.get_decoder()(input_ids=input_ids, encoder_hidden_states=encoder_hidden_states,
                                       encoder_attention_mask=encoder_attention_mask, use_cache=False)
        logits = self.model.lm_head(out.last_hidden_state)
        bias = getattr(self.model, "final_logits_bias", None)
        return logits + bias if bias is not None else logits


def _text_example(model, batch=2, seq=8):
    vocab = model.config.vocab_size
    ids = torch.randint(3, max(4, min(vocab, 1000)), (batch, seq))
    return ids, torch.ones_like(ids)


BS = {0: "batch_size", 1: "sequence_length"}


def parts_for(model: nn.Module) -> list[Part]:
    """The files an export of this model consists of, by its task."""
    task = adapter_for(model).task
    if task == "image-classification":
        size = model.config.image_size
        px = torch.randn(2, getattr(model.config, "num_channels", 3), size, size)
        out = "logits" if hasattr(model, "classifier") else "last_hidden_state"
        return [Part("model.onnx", _Vision(model), {"pixel_values": px}, [out], {"pixel_values": {0: "batch_size"}})]
    ids, mask = _text_example(model)
    if task == "causal-lm":
        return [Part("model.onnx", _CausalLM(model), {"input_ids": ids, "attention_mask": mask}, ["logits"],
                     {"input_ids": BS, "attention_mask": BS})]
    if task == "feature-extraction":
        return [Part("model.onnx", _Encoder(model), {"input_ids": ids, "attention_mask": mask}, ["last_hidden_state"],
                     {"input_ids": BS, "attention_mask": BS})]
    if task == "seq2seq-lm":
        enc = _Encoder(model.get_encoder())
        with torch.no_grad():
            hidden = enc(ids, mask)
        dec_ids = ids[:, :5]
        return [
            Part("encoder_model.onnx", enc, {"input_ids": ids, "attention_mask": mask}, ["last_hidden_state"],
                 {"input_ids": BS, "attention_mask": BS}),
            Part("decoder_model.onnx", _Seq2SeqDecoder(model),
                 {"input_ids": dec_ids, "encoder_attention_mask": mask, "encoder_hidden_states": hidden}, ["logits"],
                 {"input_ids": {0: "batch_size", 1: "decoder_sequence_length"},
                  "encoder_attention_mask": {0: "batch_size", 1: "encoder_sequence_length"},
                  "encoder_hidden_states": {0: "batch_size", 1: "encoder_sequence_length"}}),
        ]
    raise GraphError(f"No ONNX export for task {task!r}")


def export_part(part: Part, path: Path):
    """Export one part; returns the onnx_ir model (not yet saved)."""
    dims: dict[str, torch.export.Dim] = {}

    def dim(name):
        return dims.setdefault(name, torch.export.Dim(name.replace("_", ""), min=1, max=4096))

    dynamic = {k: {ax: dim(n) for ax, n in v.items()} for k, v in part.dynamic.items()}
    part.module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            part.module, (), kwargs=part.example, dynamo=True, optimize=False, opset_version=OPSET,
            input_names=list(part.example), output_names=part.outputs, dynamic_shapes=dynamic,
            verbose=False, report=False,
        )
    return program.model
