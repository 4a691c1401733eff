"""Quality of a (merged) model, measured the same way on PyTorch and on an ONNX export.

- perplexity of a causal LM with a sliding window (every token after the first scored once,
  each with up to `window - stride` tokens of left context);
- accuracy of text and image classifiers;
- fidelity: mean cosine between a model's outputs and a reference model's outputs (sentence
  embeddings with mean pooling for encoders, logits for classifiers), for encoders and images.

A model is reached through a `Runner`: a PyTorch module or an onnxruntime session, both
returning the main output for a batch of inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import InputError
from .progress import track


class Runner:
    """Main output (logits / last_hidden_state) for named input tensors."""

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class TorchRunner(Runner):
    def __init__(self, model: nn.Module):
        self.model = model.eval()

    def __call__(self, inputs):
        from .adapters import task_of

        kw = {"use_cache": False} if task_of(self.model) in ("causal-lm", "seq2seq-lm") else {}
        with torch.no_grad():
            out = self.model(**inputs, **kw)
        for name in ("logits", "last_hidden_state"):
            if getattr(out, name, None) is not None:
                return getattr(out, name)
        return out[0]


class OnnxRunner(Runner):
    """An exported model.onnx; past key/values (if the file takes them) are fed empty."""

    def __init__(self, path, session_entries: dict[str, str] | None = None):
        from .onnx_files import check_onnx
        from .validate import open_session

        check_onnx(path)
        self.session = open_session(Path(path), "cpu", session_entries or {})
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


def runner(model_or_path, session_entries: dict[str, str] | None = None) -> Runner:
    if isinstance(model_or_path, nn.Module):
        return TorchRunner(model_or_path)
    path = Path(model_or_path)
    if path.is_dir():
        path = path / "model.onnx"
    if path.suffix != ".onnx":
        raise InputError(f"{model_or_path}: give a PyTorch model, an .onnx file or a folder written by convert.")
    if session_entries is None:
        from .onnx_build import SESSION_SETTINGS
        from .validate import session_entries as read_entries

        session_entries = read_entries(path.parent / SESSION_SETTINGS)
    return OnnxRunner(path, session_entries)


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, "nll": self.nll, "tokens": self.tokens}


def perplexity(run: Runner, ids: torch.Tensor, *, window: int = 512, stride: int | None = None,
               progress: bool = True) -> Perplexity:
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


def mean_pooled(run: Runner, tokenizer, texts: list[str], *, max_length: int = 256, batch_size: int = 16,
                progress: bool = True) -> torch.Tensor:
    """Sentence embeddings: mean of last_hidden_state over real tokens, L2-normalised (sentence-transformers)."""
    out = []
    for i in track(range(0, len(texts), batch_size), "embedding", enabled=progress):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
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


def text_accuracy(run: Runner, tokenizer, texts: list[str], labels, *, max_length: int = 256, batch_size: int = 32,
                  progress: bool = True) -> float:
    """Top-1 accuracy of a text classifier (its logits' argmax against class ids), padded batches."""
    labels = torch.as_tensor(labels)
    if len(texts) != len(labels) or not texts:
        raise InputError(f"Need one label per text and at least one text; got {len(texts)} texts, {len(labels)} labels.")
    right = 0
    for i in track(range(0, len(texts), batch_size), "classifying", enabled=progress):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        logits = run({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        right += int((logits.argmax(-1) == labels[i:i + batch_size]).sum())
    return right / len(texts)


def read_labelled(path: Path, label2id: dict[str, int]) -> tuple[list[str], list[int]]:
    """Texts and class ids from a TSV file, `text<TAB>label` per line; a label is one of the model's
    class names (config label2id) or a class id."""
    ids = set(label2id.values())
    texts, labels = [], []
    for n, line in _lines(path, "labelled texts"):
        text, tab, label = line.rpartition("\t")
        if not tab or not text.strip():
            raise InputError(f"{path}:{n}: expected `text<TAB>label`.")
        label = label.strip()
        if label in label2id:
            labels.append(label2id[label])
        elif label.isdigit() and int(label) in ids:
            labels.append(int(label))
        else:
            raise InputError(f"{path}:{n}: label {label!r} is not one of the model's classes "
                             f"{sorted(label2id)} (or ids {sorted(ids)}).")
        texts.append(text)
    return texts, labels


def _lines(path: Path, what: str):
    """(line number, line) for every non-blank line of a UTF-8 text file; an error if there are none."""
    found = [(n, line) for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1)
             if line.strip()]
    if not found:
        raise InputError(f"{path} has no {what}.")
    return found


def image_accuracy(run: Runner, processor, images, labels, *, batch_size: int = 500, progress: bool = True) -> float:
    """Top-1 accuracy of an image classifier on uint8 images [N, H, W(, C)] through its processor."""
    return pixel_accuracy(run, pixel_values(processor, images), labels, batch_size=batch_size, progress=progress)


def pixel_values(processor, images, chunk: int = 2000) -> torch.Tensor:
    """uint8 images [N, H, W(, C)] -> the model's pixel_values, through its image processor."""
    from PIL import Image

    return torch.cat([processor(images=[Image.fromarray(np.asarray(im)) for im in images[i:i + chunk]],
                                return_tensors="pt")["pixel_values"] for i in range(0, len(images), chunk)])


def pixel_accuracy(run: Runner, pixels: torch.Tensor, labels, *, batch_size: int = 500, progress: bool = True) -> float:
    """Top-1 accuracy on already processed pixel_values."""
    labels = torch.as_tensor(labels)
    right = 0
    for i in track(range(0, len(pixels), batch_size), "classifying", enabled=progress):
        right += int((run({"pixel_values": pixels[i:i + batch_size]}).argmax(-1) == labels[i:i + batch_size]).sum())
    return right / len(pixels)


def similarity_spearman(embeddings: torch.Tensor, human: np.ndarray) -> float:
    """Spearman correlation between the embeddings' pairwise cosines and human similarity
    ratings, over the pairs above the diagonal (the Lee corpus protocol)."""
    from scipy.stats import spearmanr

    e = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    sims = (e @ e.T).numpy()
    upper = np.triu_indices(len(human), 1)
    return float(spearmanr(sims[upper], np.asarray(human)[upper]).statistic)


def probe_accuracy(train: torch.Tensor, train_labels, test: torch.Tensor, test_labels) -> float:
    """Accuracy of a logistic-regression probe fitted on frozen, standardized embeddings (L2, lbfgs)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0, random_state=0))
    probe.fit(train.double().numpy(), list(train_labels))
    return float(probe.score(test.double().numpy(), list(test_labels)))


# -- translation ------------------------------------------------------------------------
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
            return self.model(attention_mask=mask, encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
                              decoder_input_ids=dec_ids, use_cache=False).logits


class OnnxSeq2Seq:
    """encoder_model.onnx and decoder_model.onnx of a folder `convert` wrote, through onnxruntime."""

    def __init__(self, folder, session_entries: dict[str, str] | None = None):
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise InputError(f"{folder} has no config.json; translation needs the folder `convert` wrote.")
        self.encoder = runner(folder / "encoder_model.onnx", session_entries)
        self.decoder = runner(folder / "decoder_model.onnx", session_entries)
        self.ids = Seq2SeqIds.from_configs(_json(folder / "config.json"), _json(folder / "generation_config.json"))

    def encode(self, ids, mask):
        return self.encoder({"input_ids": ids, "attention_mask": mask})

    def decode(self, dec_ids, mask, hidden):
        return self.decoder({"input_ids": dec_ids, "encoder_attention_mask": mask, "encoder_hidden_states": hidden})


def greedy_ids(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int = 64) -> list[list[int]]:
    """Greedy decoding, the same loop for PyTorch and ONNX: the generated ids of each source
    (without the start token, up to and including end of sequence)."""
    hidden = model.encode(ids, mask)
    n = ids.shape[0]
    dec = torch.full((n, 1), model.ids.start, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = model.decode(dec, mask, hidden)[:, -1].float()
        if model.ids.forbid:
            logits[:, list(model.ids.forbid)] = -math.inf
        nxt = logits.argmax(-1).masked_fill(done, model.ids.eos)
        dec = torch.cat([dec, nxt[:, None]], dim=1)
        done |= nxt == model.ids.eos
        if bool(done.all()):
            break
    out = []
    for row in dec[:, 1:].tolist():
        out.append(row[: row.index(model.ids.eos) + 1] if model.ids.eos in row else row)
    return out


def translate(model, tokenizer, sources: list[str], *, batch_size: int = 8, max_new_tokens: int = 128,
              progress: bool = True) -> list[str]:
    out = []
    for i in track(range(0, len(sources), batch_size), "translating", enabled=progress):
        enc = tokenizer(sources[i:i + batch_size], return_tensors="pt", padding=True, truncation=True)
        ids = greedy_ids(model, enc["input_ids"], enc["attention_mask"], max_new_tokens)
        out += tokenizer.batch_decode(ids, skip_special_tokens=True)
    return out


def translation_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu's defaults), one reference per sentence."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise InputError(f"{len(hypotheses)} translations for {len(references)} references.")
    return {"BLEU": sacrebleu.corpus_bleu(hypotheses, [references]).score,
            "chrF": sacrebleu.corpus_chrf(hypotheses, [references]).score}


def read_pairs(path: Path) -> tuple[list[str], list[str]]:
    """Source and reference sentences from a TSV file: `source<TAB>reference` per line."""
    sources, refs = [], []
    for n, line in _lines(path, "sentence pairs"):
        parts = line.split("\t")
        if len(parts) != 2:
            raise InputError(f"{path}:{n}: expected `source<TAB>reference`, got {len(parts)} fields.")
        sources.append(parts[0])
        refs.append(parts[1])
    return sources, refs


# -- what `ffmerge-onnx evaluate` runs -----------------------------------------------------
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
    from .adapters import task_of
    from .manifest import MANIFEST_NAME
    from .modeling import load_model, load_preprocessor

    path = Path(spec)
    if path.is_dir() and (path / "encoder_model.onnx").is_file():  # an encoder-decoder `convert` wrote
        return Target(OnnxSeq2Seq(path), _preprocessor(path, "seq2seq-lm"), "seq2seq-lm",
                      _json(path / MANIFEST_NAME).get("source"), _json(path / "config.json"))
    onnx_file = path if path.suffix == ".onnx" else path / "model.onnx"
    if onnx_file.is_file():
        folder = onnx_file.parent
        task = _json(folder / "onnx_export.json").get("task", "unknown")
        return Target(runner(onnx_file), _preprocessor(folder, task), task, _json(folder / MANIFEST_NAME).get("source"),
                      _json(folder / "config.json"))
    if path.is_dir() and (path / MANIFEST_NAME).exists():
        from .storage import load_merged

        model = load_merged(path)
        task = task_of(model)
        return Target(_torch_run(model, task), _preprocessor(path, task), task, model.ffmerge_manifest.source,
                      model.config.to_dict())
    model = load_model(spec, trust_remote_code=trust_remote_code)
    task = task_of(model)
    return Target(_torch_run(model, task), load_preprocessor(spec), task, None, model.config.to_dict())


def _torch_run(model: nn.Module, task: str) -> Runner | TorchSeq2Seq:
    return TorchSeq2Seq(model) if task == "seq2seq-lm" else TorchRunner(model)


def _json(path: Path) -> dict:
    import json

    return json.loads(path.read_text()) if path.is_file() else {}


def _preprocessor(folder: Path, task: str):
    import transformers

    auto = transformers.AutoImageProcessor if task == "image-classification" else transformers.AutoTokenizer
    try:
        return auto.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def image_folder(path: Path, label2id: dict[str, int]) -> tuple[list, list[int]]:
    """Images in class subfolders (path/<class name>/*.png), labels from the model's label2id."""
    from PIL import Image

    from .data import IMAGE_SUFFIXES

    images, labels = [], []
    for sub in sorted(p for p in Path(path).iterdir() if p.is_dir()):
        if sub.name not in label2id:
            raise InputError(f"{sub.name} is not one of the model's classes {sorted(label2id)}; "
                             "name each subfolder after a class.")
        for f in sorted(q for q in sub.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES):
            with Image.open(f) as im:
                images.append(im.copy())
            labels.append(label2id[sub.name])
    if not images:
        raise InputError(f"No images found in class subfolders of {path}.")
    return images, labels


def _need_tsv_and_tokenizer(target: Target, spec: str, data: Path | None, what: str, lines: str) -> None:
    if data is None or not Path(data).is_file():
        raise InputError(f"{what} needs --data: a TSV file of {lines}.")
    if target.tokenizer is None:
        raise InputError(f"No tokenizer found with {spec}; {what.lower()} needs one.")


def evaluate(spec: str, *, data: Path | None = None, texts: list[str] | None = None, reference: str | None = None,
             max_tokens: int = 20_000, window: int = 512, stride: int | None = None, progress: bool = True) -> dict:
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
            from .datasets import fashion_mnist

            images, labels = fashion_mnist("test")
        acc = image_accuracy(target.run, target.tokenizer, images, labels, progress=progress)
        return {"model": spec, "task": target.task, "metric": "accuracy", "value": acc, "images": len(labels)}
    if target.task == "text-classification":
        _need_tsv_and_tokenizer(target, spec, data, "Text classification accuracy",
                                "`text<TAB>label` lines (labels: the model's class names or ids)")
        texts, labels = read_labelled(Path(data), target.config.get("label2id") or {})
        acc = text_accuracy(target.run, target.tokenizer, texts, labels, progress=progress)
        return {"model": spec, "task": target.task, "metric": "accuracy", "value": acc, "texts": len(labels)}
    if target.task == "seq2seq-lm":
        _need_tsv_and_tokenizer(target, spec, data, "Translation quality",
                                "`source<TAB>reference` lines (e.g. a Tatoeba test set)")
        sources, refs = read_pairs(Path(data))
        hyps = translate(target.run, target.tokenizer, sources, progress=progress)
        scores = translation_scores(hyps, refs)
        return {"model": spec, "task": target.task, "metric": "BLEU", "value": scores["BLEU"], **scores,
                "sentences": len(sources)}
    if texts is None:
        from .builtin import bbc_articles
        from .data import read_texts

        texts = read_texts(data) if data else [p.read_text(encoding="utf-8", errors="replace")
                                               for p in bbc_articles("test")]
    if target.tokenizer is None:
        raise InputError(f"No tokenizer found with {spec}; evaluation on text needs one.")
    if target.task == "causal-lm":
        ids = text_ids(target.tokenizer, texts, max_tokens)
        result = perplexity(target.run, ids, window=window, stride=stride, progress=progress)
        return {"model": spec, "task": target.task, "metric": "perplexity", "value": result.perplexity,
                **result.as_dict()}
    if target.task == "feature-extraction":
        ref_spec = reference or target.source
        if not ref_spec:
            raise InputError("Embedding fidelity needs the original model: pass --reference MODEL.")
        reference_target = open_target(ref_spec)
        docs = list(texts)
        a = mean_pooled(target.run, target.tokenizer, docs, progress=progress)
        b = mean_pooled(reference_target.run, reference_target.tokenizer, docs, progress=progress)
        return {"model": spec, "task": target.task, "metric": "embedding cosine to original", "reference": ref_spec,
                "value": cosine_fidelity(a, b), "texts": len(docs)}
    raise InputError(f"`evaluate` covers causal LMs (perplexity), sentence encoders (embedding cosine), text and "
                     f"image classifiers (accuracy) and translation (BLEU, chrF); this model's task is {target.task}.")
