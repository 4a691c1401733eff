"""Tiny random-weight models, one or more per registered family, built from config classes."""

from __future__ import annotations

import torch
import transformers as T

from ffmerge_onnx.families import modality
from ffmerge_onnx.families.adapter import Adapter

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


_COMMON = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 48, "vocab_size": VOCAB,
               "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}  # fmt: skip
_DECODER = dict(_COMMON, num_key_value_heads=1)
_SEQ2SEQ = {"d_model": 32, "encoder_layers": 4, "decoder_layers": 4, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
                "encoder_ffn_dim": 48, "decoder_ffn_dim": 48, "vocab_size": VOCAB, "max_position_embeddings": 64, "pad_token_id": 1,
                "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 0}  # fmt: skip
_T5 = {"d_model": 32, "d_kv": 16, "d_ff": 48, "num_layers": 4, "num_decoder_layers": 4, "num_heads": 2, "vocab_size": VOCAB,
           "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}  # fmt: skip
_VISION = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 48, "image_size": 16,
               "patch_size": 4}  # fmt: skip


def _config(cls_name: str, **kwargs):
    return lambda: getattr(T, cls_name)(**kwargs)


_AUDIO = {"conv_dim": (16, 16), "conv_stride": (4, 4), "conv_kernel": (8, 8), "num_conv_pos_embeddings": 8,
          "num_conv_pos_embedding_groups": 2}  # fmt: skip
_STAGES = {"image_size": 16, "patch_size": 2, "embed_dim": 16, "depths": [4, 4], "num_heads": [2, 4], "window_size": 2}
# model types no reviewed adapter covers: their adapter is inferred from the loaded model
INFERRED = {
    "distilbert": (_config("DistilBertConfig", dim=32, n_layers=4, n_heads=2, hidden_dim=48, vocab_size=VOCAB,
                           max_position_embeddings=64, pad_token_id=0), T.DistilBertModel),
    "electra": (_config("ElectraConfig", **_COMMON, embedding_size=32), T.ElectraModel),
    "mpnet": (_config("MPNetConfig", **dict(_COMMON, pad_token_id=1)), T.MPNetModel),
    "deberta-v2": (_config("DebertaV2Config", **_COMMON), T.DebertaV2Model),
    "xlm-roberta": (_config("XLMRobertaConfig", **dict(_COMMON, max_position_embeddings=70, pad_token_id=1)),
                    T.XLMRobertaModel),
    "gpt_neox": (_config("GPTNeoXConfig", **_COMMON), T.GPTNeoXForCausalLM),
    "opt": (_config("OPTConfig", hidden_size=32, num_hidden_layers=4, num_attention_heads=2, ffn_dim=48,
                    vocab_size=VOCAB, max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1,
                    bos_token_id=0, eos_token_id=0), T.OPTForCausalLM),
    "bloom": (_config("BloomConfig", hidden_size=32, n_layer=4, n_head=2, vocab_size=VOCAB, pad_token_id=0,
                      bos_token_id=0, eos_token_id=0), T.BloomForCausalLM),
    "falcon": (_config("FalconConfig", hidden_size=32, num_hidden_layers=4, num_attention_heads=2, vocab_size=VOCAB,
                       ffn_hidden_size=48, bos_token_id=0, eos_token_id=0), T.FalconForCausalLM),
    "phi": (_config("PhiConfig", **_COMMON), T.PhiForCausalLM),
    "gemma": (_config("GemmaConfig", **_DECODER, head_dim=16), T.GemmaForCausalLM),
    "gemma2": (_config("Gemma2Config", **_DECODER, head_dim=16), T.Gemma2ForCausalLM),
    "gemma3_text": (_config("Gemma3TextConfig", **_DECODER, head_dim=16), T.Gemma3ForCausalLM),
    "stablelm": (_config("StableLmConfig", **_DECODER), T.StableLmForCausalLM),
    "starcoder2": (_config("Starcoder2Config", **_DECODER), T.Starcoder2ForCausalLM),
    "granite": (_config("GraniteConfig", **_DECODER), T.GraniteForCausalLM),
    "olmo": (_config("OlmoConfig", **_DECODER), T.OlmoForCausalLM),
    "olmo2": (_config("Olmo2Config", **_DECODER), T.Olmo2ForCausalLM),
    "qwen3": (_config("Qwen3Config", **_DECODER, head_dim=16), T.Qwen3ForCausalLM),
    "gptj": (_config("GPTJConfig", n_embd=32, n_layer=4, n_head=2, n_inner=48, vocab_size=VOCAB, n_positions=64,
                     rotary_dim=8, bos_token_id=0, eos_token_id=0), T.GPTJForCausalLM),
    "gpt_bigcode": (_config("GPTBigCodeConfig", n_embd=32, n_layer=4, n_head=2, n_inner=48, vocab_size=VOCAB,
                            n_positions=64, bos_token_id=0, eos_token_id=0), T.GPTBigCodeForCausalLM),
    "t5": (_config("T5Config", **_T5), T.T5ForConditionalGeneration),
    "t5-gated": (_config("T5Config", **_T5, feed_forward_proj="gated-gelu"), T.T5ForConditionalGeneration),
    "mt5": (_config("MT5Config", **_T5), T.MT5ForConditionalGeneration),
    "mbart": (_config("MBartConfig", **_SEQ2SEQ), T.MBartForConditionalGeneration),
    "pegasus": (_config("PegasusConfig", **_SEQ2SEQ), T.PegasusForConditionalGeneration),
    "m2m_100": (_config("M2M100Config", **_SEQ2SEQ), T.M2M100ForConditionalGeneration),
    "beit": (_config("BeitConfig", **_VISION), T.BeitForImageClassification),
    "dinov2": (_config("Dinov2Config", **_VISION, mlp_ratio=2), T.Dinov2Model),
    "clip_text_model": (_config("CLIPTextConfig", **_COMMON), T.CLIPTextModel),
    "camembert": (_config("CamembertConfig", **dict(_COMMON, max_position_embeddings=70, pad_token_id=1)),
                  T.CamembertModel),
    "ernie": (_config("ErnieConfig", **_COMMON), T.ErnieModel),
    "roformer": (_config("RoFormerConfig", **_COMMON, embedding_size=32), T.RoFormerModel),
    "megatron-bert": (_config("MegatronBertConfig", **_COMMON), T.MegatronBertModel),
    "data2vec-text": (_config("Data2VecTextConfig", **dict(_COMMON, max_position_embeddings=70, pad_token_id=1)),
                      T.Data2VecTextModel),
    "biogpt": (_config("BioGptConfig", **_COMMON), T.BioGptForCausalLM),
    "xglm": (_config("XGLMConfig", d_model=32, num_layers=4, attention_heads=2, ffn_dim=48, vocab_size=VOCAB,
                     max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2), T.XGLMForCausalLM),
    "gpt_neo": (_config("GPTNeoConfig", hidden_size=32, num_layers=4, num_heads=2, intermediate_size=48,
                        vocab_size=VOCAB, max_position_embeddings=64, attention_types=[[["global", "local"], 2]],
                        bos_token_id=0, eos_token_id=0), T.GPTNeoForCausalLM),
    "codegen": (_config("CodeGenConfig", n_embd=32, n_layer=4, n_head=2, n_inner=48, vocab_size=VOCAB,
                        n_positions=64, rotary_dim=8, bos_token_id=0, eos_token_id=0), T.CodeGenForCausalLM),
    "persimmon": (_config("PersimmonConfig", **_COMMON), T.PersimmonForCausalLM),
    "cohere": (_config("CohereConfig", **_DECODER), T.CohereForCausalLM),
    "smollm3": (_config("SmolLM3Config", **_DECODER), T.SmolLM3ForCausalLM),
    "helium": (_config("HeliumConfig", **_DECODER, head_dim=16), T.HeliumForCausalLM),
    "nemotron": (_config("NemotronConfig", **_DECODER, head_dim=16), T.NemotronForCausalLM),
    "exaone4": (_config("Exaone4Config", **_DECODER, head_dim=16), T.Exaone4ForCausalLM),
    "ministral": (_config("MinistralConfig", **_DECODER, head_dim=16), T.MinistralForCausalLM),
    "blenderbot": (_config("BlenderbotConfig", **_SEQ2SEQ), T.BlenderbotForConditionalGeneration),
    "blenderbot-small": (_config("BlenderbotSmallConfig", **_SEQ2SEQ), T.BlenderbotSmallForConditionalGeneration),
    "plbart": (_config("PLBartConfig", **_SEQ2SEQ), T.PLBartForConditionalGeneration),
    "vit_msn": (_config("ViTMSNConfig", **_VISION), T.ViTMSNModel),
    "siglip_text_model": (_config("SiglipTextConfig", **_COMMON), T.SiglipTextModel),
    "clip_vision_model": (_config("CLIPVisionConfig", **_VISION), T.CLIPVisionModel),
    "siglip_vision_model": (_config("SiglipVisionConfig", **_VISION), T.SiglipVisionModel),
    # gate and up fused in one matrix
    "phi3": (_config("Phi3Config", **_DECODER), T.Phi3ForCausalLM),
    "modernbert": (_config("ModernBertConfig", **_COMMON, global_attn_every_n_layers=2, local_attention=16,
                           cls_token_id=0, sep_token_id=0), T.ModernBertModel),
    "glm": (_config("GlmConfig", **_DECODER, head_dim=16), T.GlmForCausalLM),
    # audio: a waveform through a conv feature encoder (input_values)
    "wav2vec2": (_config("Wav2Vec2Config", **_COMMON, **_AUDIO), T.Wav2Vec2Model),
    "wav2vec2-ctc": (_config("Wav2Vec2Config", **_COMMON, **_AUDIO), T.Wav2Vec2ForCTC),
    "hubert": (_config("HubertConfig", **_COMMON, **_AUDIO), T.HubertModel),
    "wavlm": (_config("WavLMConfig", **_COMMON, **_AUDIO), T.WavLMModel),
    "data2vec-audio": (_config("Data2VecAudioConfig", **_COMMON, **{**_AUDIO, "num_conv_pos_embeddings": 3},
                               conv_pos_kernel_size=3), T.Data2VecAudioModel),
    "unispeech": (_config("UniSpeechConfig", **_COMMON, **_AUDIO), T.UniSpeechModel),
    "unispeech-sat": (_config("UniSpeechSatConfig", **_COMMON, **_AUDIO), T.UniSpeechSatModel),
    # stages of different widths (merges stay within a stage)
    "swin": (_config("SwinConfig", **_STAGES), T.SwinModel),
    "swinv2": (_config("Swinv2Config", **_STAGES), T.Swinv2Model),
    "donut-swin": (_config("DonutSwinConfig", **_STAGES), T.DonutSwinModel),
    # speech encoder-decoder: a log-mel spectrogram in, text out
    "whisper": (_config("WhisperConfig", **_SEQ2SEQ, num_mel_bins=16, max_source_positions=32,
                        max_target_positions=64), T.WhisperForConditionalGeneration),
}  # fmt: skip
# model types inference refuses, with the reason it must give
REFUSED = {
    "albert": (_config("AlbertConfig", **_COMMON, embedding_size=16), T.AlbertModel, "no list of two or more"),
    "mixtral": (_config("MixtralConfig", **_DECODER, num_local_experts=4, num_experts_per_tok=2),
                T.MixtralForCausalLM, "mixture-of-experts"),
    "speech_to_text": (_config("Speech2TextConfig", **_SEQ2SEQ, input_feat_per_channel=16, conv_channels=16,
                               max_source_positions=64, max_target_positions=64),
                       T.Speech2TextForConditionalGeneration, "it takes input_features"),
}  # fmt: skip


EMBEDDING_HINTS = ("embed", "wte", "wpe", "patch", "cls_token", "distillation_token", "position")


def build(model_type: str, seed: int = 0, scale: float = 0.2, gentle: bool = False):
    """A tiny model with every parameter random (biases and norms too), in eval mode.

    gentle: small layer weights under large embeddings, so each layer changes the residual
    stream a little, as in trained models (adjacent layers then see similar inputs)."""
    if model_type in TINY:
        _, make_config, cls = TINY[model_type]
    else:
        make_config, cls = (INFERRED.get(model_type) or REFUSED[model_type])[:2]
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
    if modality(cfg) == "image":
        return {"pixel_values": torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)}
    if modality(cfg) == "audio":  # a waveform of `seq` frames
        return {"input_values": torch.randn(batch, Adapter.audio_samples(cfg, seq), generator=g)}
    if modality(cfg) == "spectrogram":  # log-mel features of the encoder's fixed length, `seq` decoder tokens
        dec = torch.randint(3, VOCAB, (batch, seq), generator=g)
        mask = torch.ones_like(dec)
        mask[-1, -2:] = 0
        features = torch.randn(batch, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=g)
        return {"input_features": features, "decoder_input_ids": dec, "decoder_attention_mask": mask}
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
        int(b["attention_mask"].sum()) if "attention_mask" in b else next(iter(b.values())).shape[0] for b in batches
    )
    return Calibration(batches, tokens, {"kind": "random", "tokens": tokens})


def shuffled_window(model, stack: str, layers=(1, 2, 3), calibration=None, seed: int = 0):
    """A WindowFit over `layers`, each read through a random permutation of its hidden units."""
    from ffmerge_onnx.families import adapter_for
    from ffmerge_onnx.merging.merge import AlignedLayers
    from ffmerge_onnx.merging.methods.common import WindowFit

    adapter = adapter_for(model)
    blocks = adapter.layers(model, stack)
    gen = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(adapter.ff_dim(blocks[i]), generator=gen).numpy() for i in layers]
    aligned = AlignedLayers(adapter, [blocks[i] for i in layers], perms)
    return WindowFit(model, adapter, stack, list(layers), aligned, [torch.as_tensor(p) for p in perms], calibration)


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
            t = s.index_select(role.hidden_axis, role.index(perm)) if role.hidden_axis is not None else s.clone()
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


def converted(tmp_path, model_type: str = "gpt2", layers: str = "1-2"):
    """`convert --no-compare` of a tiny model saved as the original (tmp_path/MODEL_TYPE), with a random
    calibration file: the folder tmp_path/out, for quantize and validate."""
    from ffmerge_onnx.cli import main

    build(model_type).save_pretrained(tmp_path / model_type)
    torch.save(torch.randint(3, VOCAB, (16, 16), generator=torch.Generator().manual_seed(0)), tmp_path / "cal.pt")
    assert main(["convert", str(tmp_path / model_type), "-o", str(tmp_path / "out"), "--layers", layers,
                 "--calibration", str(tmp_path / "cal.pt"), "--calibration-tokens", "200", "--no-compare"]) == 0  # fmt: skip
    return tmp_path / "out"
