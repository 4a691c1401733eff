"""validate's real-text check below fp32: the folder against its fp32 reference on the built-in BBC test
split (perplexity for causal LMs, pooled-embedding cosine for encoders), with the precision's gate."""

from __future__ import annotations

from pathlib import Path

from ..families import adapter_for
from ..onnx.precision import get_precision
from ..onnx.validate import Check
from .evaluate import evaluate

TEXT_TOKENS = 2_048  # causal LMs: BBC test tokens scored for the perplexity check
TEXT_DOCS = 20  # encoders: BBC test articles for the embedding check


def check_text_quality(folder: Path, ref_dir: Path, model, task: str, precision: str) -> Check:
    """Below fp32, the folder against its fp32 reference on real text (the built-in BBC test split):
    perplexity for causal LMs, pooled-embedding cosine for encoders, each with the precision's gate."""
    from ..families.builtin import bbc_articles

    gate = get_precision(precision)
    name = "text_quality[bbc test]"
    if task not in ("causal-lm", "feature-extraction"):
        return Check(name, "skipped", {"reason": f"no real-text check for task {task} (the output check applies)"})
    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
        return Check(name, "skipped", {"reason": "the folder has no tokenizer"})
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in bbc_articles("test")]
    if task == "causal-lm":
        limit = adapter_for(model).max_positions(model.config) or 512
        window = min(512, limit)
        got, ref = (evaluate(str(d), texts=texts, max_tokens=TEXT_TOKENS, window=window, progress=False)["value"]
                    for d in (folder, ref_dir))  # fmt: skip
        rise = got / ref - 1
        detail = {"metric": "perplexity", "value": got, "reference": ref, "rise": rise,
                  "tolerance": gate.perplexity_rise, "tokens": TEXT_TOKENS, "window": window,
                  "target": f"perplexity {got:.3f} against the fp32 reference's {ref:.3f} over {TEXT_TOKENS} BBC test "
                            f"tokens: {rise:+.2%} (at most {gate.perplexity_rise:+.0%})"}  # fmt: skip
        return Check(name, "pass" if rise <= gate.perplexity_rise else "fail", detail)
    cosine = evaluate(str(folder), texts=texts[:TEXT_DOCS], reference=str(ref_dir), progress=False)["value"]
    detail = {"metric": "embedding cosine to reference", "value": cosine, "tolerance": gate.text_cosine,
              "texts": TEXT_DOCS, "target": f"pooled embeddings' mean cosine to the fp32 reference over {TEXT_DOCS} BBC "
                                            f"test articles {cosine:.4f} (at least {gate.text_cosine})"}  # fmt: skip
    return Check(name, "pass" if cosine >= gate.text_cosine else "fail", detail)
