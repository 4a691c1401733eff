"""What `ffmerge-onnx evaluate` runs: open a model (PyTorch, merged folder, or ONNX export) and score it
with its task's metric on the given or built-in data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import FFMergeError, InputError
from ..families import adapter_for, task_of
from ..families.builtin import bbc_articles, fashion_mnist
from ..families.loading import load_model, load_preprocessor
from ..merging import load_merged
from ..merging.data import IMAGE_SUFFIXES, class_id, nonblank_lines, read_texts
from ..merging.manifest import MANIFEST_NAME
from .metrics import (
    cosine_fidelity,
    image_accuracy,
    mean_pooled,
    perplexity,
    text_accuracy,
    text_ids,
    translation_scores,
)
from .runners import OnnxSeq2Seq, Runner, TorchRunner, TorchSeq2Seq, read_json, runner
from .translate import read_pairs, translate


def read_labelled(path: Path, label2id: dict[str, int]) -> tuple[list[str], list[int]]:
    """Texts and class ids from a TSV file, `text<TAB>label` per line; a label is one of the model's
    class names (config label2id) or a class id."""
    texts, labels = [], []
    for n, line in nonblank_lines(path, "labelled texts"):
        text, tab, label = line.rpartition("\t")
        if not tab or not text.strip():
            raise InputError(f"{path}:{n}: expected `text<TAB>label`.")
        label = label.strip()
        found = class_id(label, label2id)
        if found is None:
            raise InputError(
                f"{path}:{n}: label {label!r} is not one of the model's classes "
                f"{sorted(label2id)} (or ids {sorted(set(label2id.values()))})."
            )
        labels.append(found)
        texts.append(text)
    return texts, labels


@dataclass
class Target:
    """A model to evaluate: its runner (a translator for encoder-decoders), tokenizer (image
    processor for image models), task, config (as a dict: class names live there) and (for merged
    models) the original's spec."""

    run: Runner | TorchSeq2Seq | OnnxSeq2Seq
    tokenizer: object
    task: str
    source: str | None
    config: dict


def open_target(spec: str, trust_remote_code: bool = False) -> Target:
    """A convert folder or .onnx file (onnxruntime), a merged folder, or any model load_model takes."""
    path = Path(spec)
    if path.is_dir() and (path / "encoder_model.onnx").is_file():  # an encoder-decoder `convert` wrote
        return Target(
            OnnxSeq2Seq(path),
            _preprocessor(path, "seq2seq-lm"),
            "seq2seq-lm",
            read_json(path / MANIFEST_NAME).get("source"),
            read_json(path / "config.json"),
        )
    onnx_file = path if path.suffix == ".onnx" else path / "model.onnx"
    if onnx_file.is_file():
        folder = onnx_file.parent
        task = read_json(folder / "onnx_export.json").get("task", "unknown")
        return Target(
            runner(onnx_file),
            _preprocessor(folder, task),
            task,
            read_json(folder / MANIFEST_NAME).get("source"),
            read_json(folder / "config.json"),
        )
    if path.is_dir() and (path / MANIFEST_NAME).exists():
        merged = load_merged(path)
        task = task_of(merged.model)
        return Target(
            _torch_run(merged.model, task),
            _preprocessor(path, task),
            task,
            merged.manifest.source,
            merged.model.config.to_dict(),
        )
    model = load_model(spec, trust_remote_code=trust_remote_code)
    task = task_of(model)
    return Target(_torch_run(model, task), load_preprocessor(spec), task, None, model.config.to_dict())


def _torch_run(model: nn.Module, task: str) -> Runner | TorchSeq2Seq:
    return TorchSeq2Seq(model) if task == "seq2seq-lm" else TorchRunner(model)


def _preprocessor(folder: Path, task: str):
    import transformers

    auto = transformers.AutoImageProcessor if task == "image-classification" else transformers.AutoTokenizer
    try:
        return auto.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def image_folder(path: Path, label2id: dict[str, int]) -> tuple[list, list[int]]:
    """Images in class subfolders (path/<class name or id>/*.png), labels from the model's label2id."""
    from PIL import Image

    images, labels = [], []
    for sub in sorted(p for p in Path(path).iterdir() if p.is_dir()):
        label = class_id(sub.name, label2id)
        if label is None:
            raise InputError(
                f"{sub.name} is not one of the model's classes {sorted(label2id)} (or ids "
                f"{sorted(set(label2id.values()))}); name each subfolder after a class or its id."
            )
        for f in sorted(q for q in sub.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES):
            with Image.open(f) as im:
                images.append(im.copy())
            labels.append(label)
    if not images:
        raise InputError(f"No images found in class subfolders of {path}.")
    return images, labels


def _need_tsv_and_tokenizer(target: Target, spec: str, data: Path | None, what: str, lines: str) -> None:
    if data is None or not Path(data).is_file():
        raise InputError(f"{what} needs --data: a TSV file of {lines}.")
    if target.tokenizer is None:
        raise InputError(f"No tokenizer found with {spec}; {what.lower()} needs one.")


def _max_positions(config: dict) -> int | None:
    from types import SimpleNamespace

    try:
        return adapter_for(config.get("model_type", "")).max_positions(SimpleNamespace(**config))
    except (FFMergeError, AttributeError, TypeError, ValueError):
        return None


def evaluate(
    spec: str,
    *,
    data: Path | None = None,
    texts: list[str] | None = None,
    reference: str | None = None,
    max_tokens: int = 20_000,
    window: int | None = None,
    stride: int | None = None,
    progress: bool = True,
) -> dict:
    """Perplexity for causal LMs; embedding cosine to the original for encoders (texts, or a text
    file / folder at `data`, default the BBC news test split); top-1 accuracy for image classifiers
    (`data`: images in class subfolders, default the Fashion-MNIST test set) and text classifiers
    (`data`: a TSV file of text and label); BLEU and chrF of greedy translations for encoder-decoders
    (`data`: a TSV file of source and reference sentences). The result's `value` is the headline
    number named by `metric`."""
    target = open_target(spec)
    if target.task == "image-classification":
        if target.tokenizer is None:
            raise InputError(f"No image processor (preprocessor_config.json) found with {spec}.")
        if data is not None:
            images, labels = image_folder(data, target.config.get("label2id") or {})
        else:
            images, labels = fashion_mnist("test")
        acc = image_accuracy(target.run, target.tokenizer, images, labels, progress=progress)
        return {"model": spec, "task": target.task, "metric": "accuracy", "value": acc, "images": len(labels)}
    if target.task == "text-classification":
        _need_tsv_and_tokenizer(
            target,
            spec,
            data,
            "Text classification accuracy",
            "`text<TAB>label` lines (labels: the model's class names or ids)",
        )
        texts, labels = read_labelled(Path(data), target.config.get("label2id") or {})
        acc = text_accuracy(target.run, target.tokenizer, texts, labels, progress=progress)
        return {"model": spec, "task": target.task, "metric": "accuracy", "value": acc, "texts": len(labels)}
    if target.task == "seq2seq-lm":
        _need_tsv_and_tokenizer(
            target, spec, data, "Translation quality", "`source<TAB>reference` lines (e.g. a Tatoeba test set)"
        )
        sources, refs = read_pairs(Path(data))
        hyps = translate(target.run, target.tokenizer, sources, progress=progress)
        scores = translation_scores(hyps, refs)
        return {
            "model": spec,
            "task": target.task,
            "metric": "BLEU",
            "value": scores["BLEU"],
            **scores,
            "sentences": len(sources),
        }
    if texts is None:
        texts = (
            read_texts(data)
            if data
            else [p.read_text(encoding="utf-8", errors="replace") for p in bbc_articles("test")]
        )
    if target.tokenizer is None:
        raise InputError(f"No tokenizer found with {spec}; evaluation on text needs one.")
    if target.task == "causal-lm":
        if max_tokens < 2:
            raise InputError(f"--max-tokens must be 2 or more; got {max_tokens}.")
        limit = _max_positions(target.config)
        window = min(512, limit or 512) if window is None else window  # default: 512, or the positions if fewer
        if limit and window > limit:
            raise InputError(f"--window {window} is longer than the model's {limit} positions; give at most {limit}.")
        ids = text_ids(target.tokenizer, texts, max_tokens)
        result = perplexity(target.run, ids, window=window, stride=stride, progress=progress)
        return {
            "model": spec,
            "task": target.task,
            "metric": "perplexity",
            "value": result.perplexity,
            **result.as_dict(),
        }
    if target.task == "feature-extraction":
        ref_spec = reference or target.source
        if not ref_spec:
            raise InputError("Embedding fidelity needs the original model: pass --reference MODEL.")
        reference_target = open_target(ref_spec)
        docs = list(texts)
        a = mean_pooled(target.run, target.tokenizer, docs, progress=progress)
        b = mean_pooled(reference_target.run, reference_target.tokenizer, docs, progress=progress)
        return {
            "model": spec,
            "task": target.task,
            "metric": "embedding cosine to original",
            "reference": ref_spec,
            "value": cosine_fidelity(a, b),
            "texts": len(docs),
        }
    raise InputError(
        f"`evaluate` covers causal LMs (perplexity), sentence encoders (embedding cosine), text and "
        f"image classifiers (accuracy) and translation (BLEU, chrF); this model's task is {target.task}."
    )
