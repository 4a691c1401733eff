"""Write a Llama-shaped model with random weights (default: about 1.1 B parameters, TinyLlama's shape)
and the built-in SmolLM2 tokenizer, to measure conversion at scale without downloading one.

    .venv/bin/python tools/scale_model.py /tmp/llama-1b
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers

from ffmerge_onnx.families.builtin import builtin_models
from ffmerge_onnx.families.loading import load_preprocessor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--ff", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    tokenizer = load_preprocessor(builtin_models()["SmolLM2-135M-Instruct"])
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=a.hidden,
        intermediate_size=a.ff,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(a.seed)
    model = transformers.LlamaForCausalLM(config)
    n = model.num_parameters()
    model.save_pretrained(a.out, max_shard_size="1GB")
    tokenizer.save_pretrained(a.out)
    print(f"wrote {a.out}: {n:,} parameters, {4 * n / 1e9:.2f} GB in fp32")


if __name__ == "__main__":
    main()
