"""Tiny random-weight models, one or more per registered family, built from config classes."""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 96

TINY = {
    # model_type: (adapter, config factory, model class)
    "gpt2": (
        "gpt2",
        lambda: T.GPT2Config(
            n_layer=4, n_embd=32, n_head=2, n_inner=48, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
        ),
        T.GPT2LMHeadModel,
    ),
    "vit": (
        "vit",
        lambda: T.ViTConfig(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=48,
            image_size=16,
            patch_size=4,
            num_labels=5,
        ),
        T.ViTForImageClassification,
    ),
    "deit": (
        "deit",
        lambda: T.DeiTConfig(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=48,
            image_size=16,
            patch_size=4,
        ),
        T.DeiTModel,
    ),
    "bert": (
        "bert",
        lambda: T.BertConfig(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=48,
            vocab_size=VOCAB,
            max_position_embeddings=64,
        ),
        T.BertModel,
    ),
    "bert-cls": (
        "bert",
        lambda: T.BertConfig(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=48,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            num_labels=3,
        ),
        T.BertForSequenceClassification,
    ),
    "roberta": (
        "roberta",
        lambda: T.RobertaConfig(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=48,
            vocab_size=VOCAB,
            max_position_embeddings=70,
            pad_token_id=1,
        ),
        T.RobertaModel,
    ),
    "marian": (
        "marian",
        lambda: T.MarianConfig(
            d_model=32,
            encoder_layers=4,
            decoder_layers=4,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=48,
            decoder_ffn_dim=48,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            pad_token_id=0,
            decoder_start_token_id=0,
        ),
        T.MarianMTModel,
    ),
    "bart": (
        "marian",
        lambda: T.BartConfig(
            d_model=32,
            encoder_layers=4,
            decoder_layers=4,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=48,
            decoder_ffn_dim=48,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            pad_token_id=1,
        ),
        T.BartForConditionalGeneration,
    ),
    "llama": (
        "llama",
        lambda: T.LlamaConfig(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=48,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        ),
        T.LlamaForCausalLM,
    ),
    "mistral": (
        "llama",
        lambda: T.MistralConfig(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=48,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            head_dim=16,
        ),
        T.MistralForCausalLM,
    ),
    "qwen2": (
        "llama",
        lambda: T.Qwen2Config(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=48,
            vocab_size=VOCAB,
            max_position_embeddings=64,
        ),
        T.Qwen2ForCausalLM,
    ),
}


EMBEDDING_HINTS = ("embed", "wte", "wpe", "patch", "cls_token", "distillation_token", "position")


def build(model_type: str, seed: int = 0, scale: float = 0.2, gentle: bool = False):
    """A tiny model with every parameter random (biases and norms too), in eval mode.

    gentle: small layer weights under large embeddings, so each layer changes the residual
    stream a little, as in trained models (adjacent layers then see similar inputs)."""
    _, make_config, cls = TINY[model_type]
    torch.manual_seed(seed)
    config = make_config()
    config.architectures = [cls.__name__]
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name.lower() or ".ln_" in name
            if is_norm and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif gentle and any(h in name for h in EMBEDDING_HINTS):
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 0.05 if gentle else scale)
    return model


def inputs(model, batch: int = 2, seq: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    if hasattr(cfg, "image_size") and hasattr(cfg, "patch_size"):
        return {"pixel_values": torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)}
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, -2:] = 0  # some padding: calibration must exclude it
    out = {"input_ids": ids, "attention_mask": mask}
    if getattr(cfg, "is_encoder_decoder", False):
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, seq - 2), generator=g)
    return out


def output(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        kwargs = dict(batch)
        if (
            "pixel_values" not in batch
            and not getattr(model.config, "is_encoder_decoder", False)
            and model.config.model_type not in ("bert", "roberta")
        ):
            kwargs["use_cache"] = False
        out = model(**kwargs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def calibration(model, n: int = 24, seq: int = 16, seed: int = 2):
    """Random calibration batches as a Calibration object."""
    from ffmerge_onnx.merging import Calibration

    batches = [inputs(model, batch=4, seq=seq, seed=seed + i) for i in range(n // 4)]
    tokens = sum(
        int(b["attention_mask"].sum()) if "attention_mask" in b else b["pixel_values"].shape[0] for b in batches
    )
    return Calibration(batches, tokens, {"kind": "random", "tokens": tokens})


def plant(model, stack, src, dst, noise, seed=0):
    """Make layer dst's FF a permuted copy of layer src's (+ noise); return the planted perm."""
    from ffmerge_onnx import adapter_for

    adapter = adapter_for(model)
    layers = adapter.layers(model, stack)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(adapter.ff_dim(layers[src]), generator=g)
    with torch.no_grad():
        for role in adapter.roles():
            s = adapter.ff_params(layers[src])[role.name]
            d = adapter.ff_params(layers[dst])[role.name]
            t = s.index_select(role.hidden_axis, perm) if role.hidden_axis is not None else s.clone()
            d.copy_(t + noise * torch.randn(t.shape, generator=g))
    return perm


def word_tokenizer():
    """A real fast tokenizer over words w0..w{VOCAB-1} (no download): text 'w5 w17 ...'."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", unk_token="w1")


def word_text(n: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{int(i)}" for i in torch.randint(3, VOCAB, (n,), generator=g))
