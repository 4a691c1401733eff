"""Export to ONNX with torch.onnx.export(dynamo=True).

Why this exporter: it keeps Parameters tied by identity as one initializer and works with
current transformers. optimum-onnx 0.1.0 forces the legacy TorchScript exporter and needs
transformers<4.58, so we take optimum's role as the *interface*: the same file layout and
input/output names, so ORTModel-style loaders and servers find what they expect:
- causal LM: model.onnx, input_ids + attention_mask -> logits; with `kv_cache`, also
  position_ids + past_key_values.N.key/value -> present.N.key/value (first step: past length 0);
- encoders: model.onnx -> last_hidden_state (or logits for classifiers); audio encoders take the
  waveform as input_values;
- speech seq2seq (Whisper): encoder_model.onnx (input_features) + decoder_model.onnx (input_ids,
  encoder_hidden_states -> logits);
- seq2seq: encoder_model.onnx + decoder_model.onnx; with `kv_cache`, decoder_model.onnx also
  returns present.N.{decoder,encoder}.{key,value} and decoder_with_past_model.onnx takes them
  back as past_key_values.N.* (optimum's three-file layout).

The exporter's own optimizer is off: it constant-folds Transpose(weight) into a new tensor
per consumer, which would copy every shared weight once per layer. Our passes fold what is
safe to fold, once per tensor.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import GraphError, UnsupportedArchitectureError
from ..families import adapter_for, task_of

OPSET = 18
MAX_DIM = 4096


@dataclass(frozen=True)
class Part:
    """One ONNX file of an export: its wrapper module, example inputs and I/O names.

    The last `past` example inputs are past key/values; the wrapper takes them as one tuple."""

    filename: str
    module: nn.Module
    example: dict[str, torch.Tensor]
    outputs: list[str]
    dynamic: dict[str, dict[int, str]]
    past: int = 0
    eager_attention: bool = False  # sdpa with a cache and dynamic shapes does not export

    def args(self, feeds: dict[str, torch.Tensor]) -> tuple:
        values = [feeds[n] for n in self.example]
        if not self.past:
            return tuple(values)
        return (*values[: -self.past], tuple(values[-self.past :]))

    def run(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The PyTorch reference outputs for named feeds."""
        with torch.no_grad(), _attention(self):
            out = self.module(*self.args(feeds))
        return [out] if isinstance(out, torch.Tensor) else list(out)


@contextlib.contextmanager
def _attention(part: Part):
    model = getattr(part.module, "model", None)
    if not part.eager_attention or model is None:
        yield
        return
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _cache_kwargs(fn, cache) -> dict:
    """transformers 5 calls the argument `cache`; earlier versions `past_key_values`."""
    return {"cache": cache} if "cache" in inspect.signature(fn).parameters else {"past_key_values": cache}


def _cache_out(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _new_cache(config, pairs=()):
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for i, (k, v) in enumerate(pairs):
        cache.update(k, v, i)
    return cache


def _flat(cache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


class _CausalLM(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class _CausalLMWithPast(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past):
        cache = _new_cache(self.model.config, zip(past[0::2], past[1::2]))
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **_cache_kwargs(self.model.forward, cache),
        )
        return (out.logits, *_flat(_cache_out(out)))


class _Encoder(nn.Module):
    """Text in, one output out: last_hidden_state (encoders) or logits (classifiers)."""

    def __init__(self, model, output: str = "last_hidden_state"):
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, input_ids, attention_mask):
        return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask), self.output)


class _OneInput(nn.Module):
    """Images (pixel_values) or a waveform (input_values) in: logits where the model has a head (classifiers,
    CTC), else last_hidden_state. The ONNX input's name is the Part's."""

    def __init__(self, model, name: str):
        super().__init__()
        self.model = model
        self.name = name

    def forward(self, values):
        out = self.model(**{self.name: values})
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


class _SpectrogramEncoder(nn.Module):
    """A speech encoder-decoder's encoder: log-mel input_features in, last_hidden_state out."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_features):
        return self.encoder(input_features=input_features).last_hidden_state


class SpeechDecoder(nn.Module):
    """A speech encoder-decoder's first decoder step (Whisper: no encoder mask); with `cache`, also returns
    every layer's self and cross key/values."""

    def __init__(self, model, cache: bool = False):
        super().__init__()
        self.model = model
        self.cache = cache

    def forward(self, input_ids, encoder_hidden_states):
        decoder = self.model.get_decoder()
        if not self.cache:
            out = decoder(input_ids=input_ids, encoder_hidden_states=encoder_hidden_states, use_cache=False)
            return _lm_logits(self.model, out.last_hidden_state)
        from transformers import EncoderDecoderCache

        cache = EncoderDecoderCache(_new_cache(self.model.config), _new_cache(self.model.config))
        out = decoder(input_ids=input_ids, encoder_hidden_states=encoder_hidden_states, use_cache=True,
                      **_cache_kwargs(decoder.forward, cache))  # fmt: skip
        return (_lm_logits(self.model, out.last_hidden_state), *_flat_both(_cache_out(out)))


class _SpeechDecoderWithPast(nn.Module):
    """Later decoder steps of a speech encoder-decoder: cross-attention key/values come from the past."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, past):
        from transformers import EncoderDecoderCache

        config, decoder = self.model.config, self.model.get_decoder()
        cache = EncoderDecoderCache(
            _new_cache(config, zip(past[0::4], past[1::4])), _new_cache(config, zip(past[2::4], past[3::4]))
        )
        # only its shape is read: cross-attention takes its key/values from the cache
        placeholder = torch.zeros(input_ids.shape[0], past[2].shape[2], config.d_model, dtype=past[0].dtype)
        out = decoder(input_ids=input_ids, encoder_hidden_states=placeholder, use_cache=True,
                      **_cache_kwargs(decoder.forward, cache))  # fmt: skip
        return (_lm_logits(self.model, out.last_hidden_state), *_flat(_cache_out(out).self_attention_cache))


def _flat_both(cache) -> list[torch.Tensor]:
    """An encoder-decoder cache as self key, self value, cross key, cross value per layer."""
    flat = []
    for s, x in zip(cache.self_attention_cache.layers, cache.cross_attention_cache.layers):
        flat += [s.keys, s.values, x.keys, x.values]
    return flat


def _lm_logits(model, hidden):
    head = getattr(model, "lm_head", None)
    logits = (head if head is not None else model.get_output_embeddings())(hidden)
    bias = getattr(model, "final_logits_bias", None)
    return logits + bias if bias is not None else logits


class Seq2SeqDecoder(nn.Module):
    """First decoder step; with `cache`, also returns every layer's self and cross key/values."""

    def __init__(self, model, cache: bool = False):
        super().__init__()
        self.model = model
        self.cache = cache

    def forward(self, input_ids, encoder_attention_mask, encoder_hidden_states):
        decoder = self.model.get_decoder()
        if not self.cache:
            out = decoder(
                input_ids=input_ids,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                use_cache=False,
            )
            return _lm_logits(self.model, out.last_hidden_state)
        from transformers import EncoderDecoderCache

        cache = EncoderDecoderCache(_new_cache(self.model.config), _new_cache(self.model.config))
        out = decoder(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            use_cache=True,
            **_cache_kwargs(decoder.forward, cache),
        )
        return (_lm_logits(self.model, out.last_hidden_state), *_flat_both(_cache_out(out)))


class _Seq2SeqDecoderWithPast(nn.Module):
    """Later decoder steps: cross-attention key/values come from the past, not the encoder output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, encoder_attention_mask, past):
        from transformers import EncoderDecoderCache

        config, decoder = self.model.config, self.model.get_decoder()
        cache = EncoderDecoderCache(
            _new_cache(config, zip(past[0::4], past[1::4])), _new_cache(config, zip(past[2::4], past[3::4]))
        )
        batch, enc_len = encoder_attention_mask.shape
        # only its shape is read: cross-attention takes its key/values from the cache
        placeholder = torch.zeros(batch, enc_len, adapter_for(config).d_model(config), dtype=past[0].dtype)
        mask = torch.ones((batch, past[0].shape[2] + input_ids.shape[1]), dtype=torch.long)
        out = decoder(
            input_ids=input_ids,
            attention_mask=mask,
            encoder_hidden_states=placeholder,
            encoder_attention_mask=encoder_attention_mask,
            use_cache=True,
            **_cache_kwargs(decoder.forward, cache),
        )
        return (_lm_logits(self.model, out.last_hidden_state), *_flat(_cache_out(out).self_attention_cache))


def _text_example(model, batch=2, seq=8):
    vocab = model.config.vocab_size
    ids = torch.randint(3, max(4, min(vocab, 1000)), (batch, seq))
    return ids, torch.ones_like(ids)


BS = {0: "batch_size", 1: "sequence_length"}
KV = ("key", "value")


def parts_for(model: nn.Module, kv_cache: bool = False) -> list[Part]:
    """The files an export of this model consists of, by its task."""
    task = task_of(model)
    if task == "image-classification":
        size = model.config.image_size
        px = torch.randn(2, getattr(model.config, "num_channels", 3), size, size)
        out = "logits" if hasattr(model, "classifier") else "last_hidden_state"
        return [
            Part(
                "model.onnx",
                _OneInput(model, "pixel_values"),
                {"pixel_values": px},
                [out],
                {"pixel_values": {0: "batch_size"}},
            )
        ]
    if task == "audio-feature-extraction":
        samples = adapter_for(model).audio_samples(model.config, 24)
        out = "logits" if hasattr(model, "lm_head") or hasattr(model, "classifier") else "last_hidden_state"
        return [Part("model.onnx", _OneInput(model, "input_values"), {"input_values": torch.randn(2, samples)}, [out],
                     {"input_values": {0: "batch_size", 1: "audio_sequence_length"}})]  # fmt: skip
    if task == "speech-seq2seq":
        return _speech_seq2seq(model, kv_cache)
    ids, mask = _text_example(model)
    if task == "causal-lm" and kv_cache:
        return [_causal_with_past(model, ids)]
    if task == "causal-lm":
        return [
            Part(
                "model.onnx",
                _CausalLM(model),
                {"input_ids": ids, "attention_mask": mask},
                ["logits"],
                {"input_ids": BS, "attention_mask": BS},
            )
        ]
    if task == "feature-extraction":
        return [
            Part(
                "model.onnx",
                _Encoder(model),
                {"input_ids": ids, "attention_mask": mask},
                ["last_hidden_state"],
                {"input_ids": BS, "attention_mask": BS},
            )
        ]
    if task == "text-classification":
        return [
            Part(
                "model.onnx",
                _Encoder(model, "logits"),
                {"input_ids": ids, "attention_mask": mask},
                ["logits"],
                {"input_ids": BS, "attention_mask": BS},
            )
        ]
    if task == "seq2seq-lm":
        return _seq2seq(model, ids, mask, kv_cache)
    raise GraphError(f"No ONNX export for task {task!r}")


def _cache_shape(model, stack: str) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a stack, from the adapter's config keys."""
    adapter = adapter_for(model)
    return (adapter.num_layers(model, stack), *adapter.attention(model.config, stack))


def _causal_with_past(model, ids) -> Part:
    layers, heads, head_dim = _cache_shape(model, "decoder")
    batch, seq = ids.shape
    past_len = 3
    example = {
        "input_ids": ids,
        "attention_mask": torch.ones(batch, past_len + seq, dtype=torch.long),
        "position_ids": torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous(),
    }
    dynamic = {"input_ids": BS, "attention_mask": {0: "batch_size", 1: "total_sequence_length"}, "position_ids": BS}
    for i in range(layers):
        for kv in KV:
            example[f"past_key_values.{i}.{kv}"] = torch.randn(batch, heads, past_len, head_dim)
            dynamic[f"past_key_values.{i}.{kv}"] = {0: "batch_size", 2: "past_sequence_length"}
    outputs = ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in KV]
    return Part("model.onnx", _CausalLMWithPast(model), example, outputs, dynamic, past=2 * layers)


def _seq2seq(model, ids, mask, kv_cache: bool) -> list[Part]:
    enc = _Encoder(model.get_encoder())
    with torch.no_grad():
        hidden = enc(ids, mask)
    dec_ids = ids[:, :5]
    enc_part = Part(
        "encoder_model.onnx",
        enc,
        {"input_ids": ids, "attention_mask": mask},
        ["last_hidden_state"],
        {"input_ids": BS, "attention_mask": BS},
    )
    dec_dynamic = {
        "input_ids": {0: "batch_size", 1: "decoder_sequence_length"},
        "encoder_attention_mask": {0: "batch_size", 1: "encoder_sequence_length"},
        "encoder_hidden_states": {0: "batch_size", 1: "encoder_sequence_length"},
    }
    dec_example = {"input_ids": dec_ids, "encoder_attention_mask": mask, "encoder_hidden_states": hidden}
    if not kv_cache:
        return [enc_part, Part("decoder_model.onnx", Seq2SeqDecoder(model), dec_example, ["logits"], dec_dynamic)]
    layers, heads, head_dim = _cache_shape(model, "decoder")
    sides = [("decoder", "key"), ("decoder", "value"), ("encoder", "key"), ("encoder", "value")]
    first = Part(
        "decoder_model.onnx",
        Seq2SeqDecoder(model, cache=True),
        dec_example,
        ["logits"] + [f"present.{i}.{s}.{kv}" for i in range(layers) for s, kv in sides],
        dec_dynamic,
        eager_attention=True,
    )
    batch, enc_len = mask.shape
    past_len = 4
    example = {"input_ids": dec_ids[:, :2], "encoder_attention_mask": mask}  # size 1 would be specialized
    dynamic = {"input_ids": dec_dynamic["input_ids"], "encoder_attention_mask": dec_dynamic["encoder_attention_mask"]}
    for i in range(layers):
        for s, kv in sides:
            n = past_len if s == "decoder" else enc_len
            example[f"past_key_values.{i}.{s}.{kv}"] = torch.randn(batch, heads, n, head_dim)
            axis = "past_decoder_sequence_length" if s == "decoder" else "encoder_sequence_length"
            dynamic[f"past_key_values.{i}.{s}.{kv}"] = {0: "batch_size", 2: axis}
    with_past = Part(
        "decoder_with_past_model.onnx",
        _Seq2SeqDecoderWithPast(model),
        example,
        ["logits"] + [f"present.{i}.decoder.{kv}" for i in range(layers) for kv in KV],
        dynamic,
        past=4 * layers,
        eager_attention=True,
    )
    return [enc_part, first, with_past]


def random_spectrogram(config, batch: int, generator=None) -> torch.Tensor:
    """Random log-mel input_features of the encoder's fixed window."""
    frames = 2 * adapter_for(config).spectrogram_positions(config)
    return torch.randn(batch, config.num_mel_bins, frames, generator=generator)


def _speech_seq2seq(model, kv_cache: bool) -> list[Part]:
    """optimum's layout for Whisper: encoder_model.onnx (a fixed-length spectrogram) and decoder_model.onnx;
    with `kv_cache`, decoder_model.onnx also returns present key/values and decoder_with_past_model.onnx
    takes them back (the encoder's side keeps its fixed length)."""
    config = model.config
    features = random_spectrogram(config, 2)
    encoder = _SpectrogramEncoder(model.get_encoder())
    with torch.no_grad():
        hidden = encoder(features)
    dec_example = {"input_ids": torch.randint(3, max(4, min(config.vocab_size, 1000)), (2, 5)),
                   "encoder_hidden_states": hidden}  # fmt: skip
    dec_dynamic = {
        "input_ids": {0: "batch_size", 1: "decoder_sequence_length"},
        "encoder_hidden_states": {0: "batch_size"},
    }
    enc_part = Part("encoder_model.onnx", encoder, {"input_features": features}, ["last_hidden_state"],
                    {"input_features": {0: "batch_size"}})  # fmt: skip
    if not kv_cache:
        return [enc_part, Part("decoder_model.onnx", SpeechDecoder(model), dec_example, ["logits"], dec_dynamic)]
    layers, heads, head_dim = _cache_shape(model, "decoder")
    sides = [("decoder", "key"), ("decoder", "value"), ("encoder", "key"), ("encoder", "value")]
    first = Part("decoder_model.onnx", SpeechDecoder(model, cache=True), dec_example,
                 ["logits"] + [f"present.{i}.{s}.{kv}" for i in range(layers) for s, kv in sides], dec_dynamic,
                 eager_attention=True)  # fmt: skip
    example, dynamic = {"input_ids": dec_example["input_ids"][:, :2]}, {"input_ids": dec_dynamic["input_ids"]}
    for i in range(layers):
        for s, kv in sides:
            n = 4 if s == "decoder" else hidden.shape[1]
            example[f"past_key_values.{i}.{s}.{kv}"] = torch.randn(2, heads, n, head_dim)
            axes = {0: "batch_size", 2: "past_decoder_sequence_length"} if s == "decoder" else {0: "batch_size"}
            dynamic[f"past_key_values.{i}.{s}.{kv}"] = axes
    with_past = Part("decoder_with_past_model.onnx", _SpeechDecoderWithPast(model), example,
                     ["logits"] + [f"present.{i}.decoder.{kv}" for i in range(layers) for kv in KV], dynamic,
                     past=4 * layers, eager_attention=True)  # fmt: skip
    return [enc_part, first, with_past]


def dynamic_shapes(part: Part) -> tuple:
    """torch.export dims for the part's inputs, one Dim object per axis name."""
    dims: dict[str, torch.export.Dim] = {}

    def dim(name):
        return dims.setdefault(name, torch.export.Dim(name.replace("_", ""), min=1, max=2 * MAX_DIM))

    per_input = {k: {ax: dim(n) for ax, n in part.dynamic.get(k, {}).items()} or None for k in part.example}
    return part.args(per_input)


def export_part(part: Part, path: Path, optimize: bool = False):
    """Export one part; returns the onnx_ir model (not yet saved). `optimize`: the exporter's own
    optimizer, off for our exports (it copies a shared weight per reader; see the module docstring)."""
    part.module.eval()
    with warnings.catch_warnings(), torch.no_grad(), _attention(part):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        logging.getLogger("transformers").setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                part.module,
                part.args(part.example),
                dynamo=True,
                optimize=optimize,
                opset_version=OPSET,
                input_names=list(part.example),
                output_names=part.outputs,
                dynamic_shapes=dynamic_shapes(part),
                verbose=False,
                report=False,
            )
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:  # the exporter raises many kinds; each is this model's limit
            cause = e
            while cause.__cause__ is not None:
                cause = cause.__cause__
            reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
            raise UnsupportedArchitectureError(
                f"torch.onnx.export cannot export {part.filename} of this {type(part.module).__name__} "
                f"({type(cause).__name__}: {reason}). Without --kv-cache, or with another torch version, it may."
            ) from e
    return program.model
