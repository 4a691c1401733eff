"""Quality metrics, measured the same way on PyTorch and on an ONNX export (through a Runner).

- perplexity of a causal LM with a sliding window (every token after the first scored once,
  each with up to `window - stride` tokens of left context);
- accuracy of text and image classifiers;
- fidelity: mean cosine between a model's outputs and a reference model's outputs (sentence
  embeddings with mean pooling for encoders, logits for classifiers);
- BLEU and chrF of translations (sacrebleu)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..merging.data import to_device
from ..progress import track
from .runners import Runner


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, "nll": self.nll, "tokens": self.tokens}


def perplexity(
    run: Runner, ids: torch.Tensor, *, window: int = 512, stride: int | None = None, progress: bool = True
) -> Perplexity:
    """Sliding-window perplexity of a 1-D token sequence, float64 accumulation.

    Every token after the first is scored exactly once; each window scores the next `stride`
    tokens and gives each of them at least `window - stride` tokens of context (stride is at most
    window - 1, so no token lands at a window's first position without context)."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    n = ids.numel()
    if n < 2:
        raise InputError("Perplexity needs at least 2 tokens of text.")
    if window < 2:
        raise InputError(f"window must be at least 2 tokens; got {window}.")
    if stride is not None and stride < 1:
        raise InputError(f"stride must be 1 or more; got {stride}.")
    stride = min(stride or window, window - 1)
    if stride < 1:
        raise InputError(f"stride must be positive; got {stride}.")
    total, count, scored_to = 0.0, 0, 1  # token 0 has no context and is never scored
    for _ in track(range(math.ceil((n - 1) / stride)), "perplexity", enabled=progress):
        end = min(scored_to + stride, n)
        begin = max(0, end - window)
        chunk = ids[begin:end][None]
        logits = run({"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}).double()
        logp = torch.log_softmax(logits[0, :-1], dim=-1)  # row j predicts token begin + j + 1
        first = scored_to - (begin + 1)
        nll = -logp[first:].gather(1, chunk[0, 1:][first:, None]).squeeze(1)
        total += float(nll.sum())
        count += nll.numel()
        scored_to = end
    mean = total / count
    return Perplexity(math.exp(mean), mean, count)


def text_ids(tokenizer, paths: list[Path] | list[str], max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of texts joined by blank lines (files or strings)."""
    ids: list[int] = []
    for p in paths:
        text = Path(p).read_text(encoding="utf-8", errors="replace") if isinstance(p, Path) else p
        ids.extend(tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"])
        if max_tokens and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def mean_pooled(
    run: Runner, tokenizer, texts: list[str], *, max_length: int = 256, batch_size: int = 16, progress: bool = True
) -> torch.Tensor:
    """Sentence embeddings: mean of last_hidden_state over real tokens, L2-normalised (sentence-transformers)."""
    out = []
    for i in track(range(0, len(texts), batch_size), "embedding", enabled=progress):
        enc = tokenizer(
            texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        hidden = run(inputs).double()
        mask = enc["attention_mask"][..., None].double()
        emb = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        out.append(torch.nn.functional.normalize(emb, dim=-1))
    return torch.cat(out)


def cosine_fidelity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean row-wise cosine between two output matrices (1.0: identical directions)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())


def text_accuracy(
    run: Runner,
    tokenizer,
    texts: list[str],
    labels,
    *,
    max_length: int = 256,
    batch_size: int = 32,
    progress: bool = True,
) -> float:
    """Top-1 accuracy of a text classifier (its logits' argmax against class ids), padded batches."""
    labels = torch.as_tensor(labels)
    if len(texts) != len(labels) or not texts:
        raise InputError(
            f"Need one label per text and at least one text; got {len(texts)} texts, {len(labels)} labels."
        )
    right = 0
    for i in track(range(0, len(texts), batch_size), "classifying", enabled=progress):
        enc = tokenizer(
            texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        logits = run({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        right += int((logits.argmax(-1) == labels[i : i + batch_size]).sum())
    return right / len(texts)


def image_accuracy(run: Runner, processor, images, labels, *, batch_size: int = 500, progress: bool = True) -> float:
    """Top-1 accuracy of an image classifier on uint8 images [N, H, W(, C)] through its processor."""
    return pixel_accuracy(run, pixel_values(processor, images), labels, batch_size=batch_size, progress=progress)


def pixel_values(processor, images, chunk: int = 2000) -> torch.Tensor:
    """uint8 images [N, H, W(, C)] -> the model's pixel_values, through its image processor."""
    from PIL import Image

    return torch.cat(
        [
            processor(images=[Image.fromarray(np.asarray(im)) for im in images[i : i + chunk]], return_tensors="pt")[
                "pixel_values"
            ]
            for i in range(0, len(images), chunk)
        ]
    )


def pixel_accuracy(run: Runner, pixels: torch.Tensor, labels, *, batch_size: int = 500, progress: bool = True) -> float:
    """Top-1 accuracy on already processed pixel_values."""
    labels = torch.as_tensor(labels)
    right = 0
    for i in track(range(0, len(pixels), batch_size), "classifying", enabled=progress):
        right += int((run({"pixel_values": pixels[i : i + batch_size]}).argmax(-1) == labels[i : i + batch_size]).sum())
    return right / len(pixels)


def translation_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu's defaults), one reference per sentence."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise InputError(f"{len(hypotheses)} translations for {len(references)} references.")
    return {
        "BLEU": sacrebleu.corpus_bleu(hypotheses, [references]).score,
        "chrF": sacrebleu.corpus_chrf(hypotheses, [references]).score,
    }


def _on(model: nn.Module, batch: dict) -> dict:
    """The batch on the model's device."""
    return to_device(batch, next(model.parameters()).device)


def batch_perplexity(model: nn.Module, batches) -> float:
    """Perplexity over calibration-style batches (padding excluded): exp of mean token NLL."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            b = _on(model, b)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            logp = torch.log_softmax(logits[:, :-1].double(), -1)
            target = b["input_ids"][:, 1:]
            mask = (b["attention_mask"][:, 1:] * b["attention_mask"][:, :-1]).bool()
            nll = -logp.gather(-1, target[..., None]).squeeze(-1)
            total += float(nll[mask].sum())
            count += int(mask.sum())
    return math.exp(total / count)


def batch_accuracy(model: nn.Module, batches) -> float:
    """Top-1 accuracy of a classifier on labelled batches."""
    right, count = 0, 0
    with torch.no_grad():
        for b in batches:
            b = _on(model, b)
            inputs = {k: v for k, v in b.items() if k != "labels"}
            right += int((model(**inputs).logits.argmax(-1) == b["labels"]).sum())
            count += len(b["labels"])
    return right / count


def probe_accuracy(train: torch.Tensor, train_labels, test: torch.Tensor, test_labels) -> float:
    """Accuracy of a logistic-regression probe fitted on frozen, standardized embeddings (L2, lbfgs)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0, random_state=0))
    probe.fit(train.double().numpy(), list(train_labels))
    return float(probe.score(test.double().numpy(), list(test_labels)))
