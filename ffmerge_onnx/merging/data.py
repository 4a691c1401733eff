"""Calibration data: text files, image folders, audio (WAV) folders or saved tensors, as model input
batches holding exactly the token budget (padding excluded; an audio frame is a token)."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..distributed import batch_rows, take_rows
from ..errors import CalibrationError, InputError
from ..families import adapter_for, modality

TEXT_SUFFIXES = {".txt", ".md", ".text"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
TENSOR_SUFFIXES = {".pt", ".pth", ".safetensors", ".npy"}
AUDIO_SUFFIXES = {".wav"}
MAIN_INPUT = {"text": "input_ids", "image": "pixel_values", "audio": "input_values", "spectrogram": "input_features"}


@dataclass
class Calibration:
    """Batches of model inputs plus a description for the manifest."""

    batches: list[dict[str, torch.Tensor]]
    tokens: int
    description: dict = field(default_factory=dict)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.batches)


def to_device(batch: dict, device) -> dict:
    """The batch's tensors moved to `device` (other entries as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def rebatch(batches: list[dict], rows: int) -> list[dict]:
    """The same data in batches of `rows` rows each, a batch's remainder joining its last piece (0: as
    they are)."""
    if rows < 0:
        raise InputError(f"rows per batch must be 0 (as the data comes) or more; got {rows}.")
    if not rows:
        return list(batches)
    out = []
    for b in batches:
        n = batch_rows(b)
        cuts = list(range(0, n, rows))[: max(1, n // rows)] + [n]  # a short remainder joins the last piece
        out += [take_rows(b, lo, hi) for lo, hi in itertools.pairwise(cuts)]
    return out


def token_mask(batch: dict[str, torch.Tensor], stack: str, tokens_per_item: int, config=None) -> torch.Tensor | None:
    """Boolean [batch, tokens] mask of real tokens for the given stack (for a waveform: its real frames);
    None when the batch has no mask: every position is real, however many a stack sees (Swin's stages
    see fewer than the patches)."""
    key = "decoder_attention_mask" if stack == "decoder" and "decoder_input_ids" in batch else "attention_mask"
    mask = batch.get(key)
    if mask is None:
        return None
    if "input_values" in batch and config is not None:  # a mask over samples: frames of each row's real length
        frames = torch.tensor([adapter_for(config).audio_frames(config, int(n)) for n in mask.sum(1)])
        return torch.arange(tokens_per_item)[None, :] < frames[:, None]
    return mask.bool()


def real_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of activations x ([batch, tokens, d], or flattened) at real tokens: [n, d]."""
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    return x.reshape(mask.shape[0], -1, x.shape[-1])[mask]


def _chunk_ids(ids: list[int], seq_len: int, budget: int) -> list[list[int]]:
    chunks, used = [], 0
    for start in range(0, len(ids), seq_len):
        if used >= budget:
            break
        chunk = ids[start : start + seq_len][: budget - used]
        if len(chunk) < 2:
            break
        chunks.append(chunk)
        used += len(chunk)
    return chunks


def _batch_chunks(chunks: list[list[int]], batch_size: int, pad_id: int, seq2seq: bool):
    batches = []
    for i in range(0, len(chunks), batch_size):
        group = chunks[i : i + batch_size]
        width = max(len(c) for c in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, c in enumerate(group):
            ids[row, : len(c)] = torch.tensor(c)
            mask[row, : len(c)] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if seq2seq:  # teacher forcing on the same text; decoder FF sees real token statistics
            batch["decoder_input_ids"] = ids.clone()
            batch["decoder_attention_mask"] = mask.clone()
        batches.append(batch)
    return batches


BINARY_RATIO = 0.05  # share of undecodable or control bytes above which a "text" file is refused


def check_text(path: Path, error=CalibrationError) -> str:
    """A file's text, refused when it looks binary (undecodable or control bytes) or is not a file."""
    if not path.is_file():
        raise error(f"{path} is not a file. Give a UTF-8 text file.")
    raw = path.read_bytes()
    sample = raw[: 1 << 16]
    text = sample.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") + sum(1 for c in text if ord(c) < 32 and c not in "\t\n\r\f")
    if sample and bad / len(text) > BINARY_RATIO:
        raise error(
            f"{path} does not look like UTF-8 text ({bad / len(text):.0%} undecodable or control characters). "
            "Give a plain text file."
        )
    return raw.decode("utf-8", errors="replace")


def read_texts(path: Path) -> list[str]:
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
    texts = [check_text(f) for f in files]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CalibrationError(f"No text found in {path}. Give a .txt file or a folder of .txt files.")
    return texts


def nonblank_lines(path: Path, what: str):
    """(line number, line) for every non-blank line of a UTF-8 text file; an error if there are none."""
    text = check_text(Path(path), InputError)
    found = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not found:
        raise InputError(f"{path} has no {what}.")
    return found


def from_text(
    path: Path, tokenizer, budget: int, seq_len: int = 256, batch_size: int = 8, seq2seq: bool = False
) -> Calibration:
    texts = read_texts(path)
    if tokenizer is None:
        raise CalibrationError(
            "Text calibration needs the model's tokenizer, and none was found next to the model. "
            "Save the tokenizer with the model or pass tensors (.pt/.safetensors) instead."
        )
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= budget:
            break
    seq_len = min(seq_len, getattr(tokenizer, "model_max_length", seq_len) or seq_len)
    chunks = _chunk_ids(ids, seq_len, budget)
    tokens = sum(len(c) for c in chunks)
    if tokens < budget:
        raise CalibrationError(
            f"{path} holds {tokens} tokens, fewer than the calibration budget of {budget}. "
            "Add more text or lower --calibration-tokens."
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Calibration(
        _batch_chunks(chunks, batch_size, pad_id, seq2seq),
        tokens,
        {"kind": "text", "source": str(path), "tokens": tokens, "seq_len": seq_len},
    )


def class_id(name: str, label2id: dict[str, int]) -> int | None:
    """The class a name stands for: one of the model's class names (config label2id) or a class id
    (a folder cannot be named after every class, e.g. "T-shirt/top")."""
    if name in label2id:
        return label2id[name]
    if name.isdigit() and int(name) in set(label2id.values()):
        return int(name)
    return None


def image_files(path: Path) -> list[Path]:
    """The images under path, taken in turn from each folder that holds some (class subfolders interleaved,
    so any prefix of the list is balanced), sorted within each."""
    groups: dict[Path, list[Path]] = {}
    for p in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        groups.setdefault(p.parent, []).append(p)
    lists = list(groups.values())
    return [g[i] for i in range(max(map(len, lists), default=0)) for g in lists if i < len(g)]


def image_labels(path: Path, files: list[Path], label2id: dict[str, int] | None) -> list[int] | None:
    """Class ids when every image sits in a subfolder of path named after one of the model's classes."""
    if not label2id:
        return None
    ids = [class_id(f.parent.name, label2id) if f.parent.parent == path else None for f in files]
    return None if None in ids else ids


def from_images(
    path: Path, processor, budget: int, tokens_per_image: int, batch_size: int = 16, label2id=None
) -> Calibration:
    """Image batches; with `labels` when the images are in class subfolders (path/<class name or id>/*)."""
    from PIL import Image

    if processor is None:
        raise CalibrationError(
            "Image calibration needs the model's image processor (preprocessor_config.json) next to the model."
        )
    files = image_files(path)
    needed = -(-budget // tokens_per_image)
    if len(files) < needed:
        raise CalibrationError(
            f"{path} has {len(files)} images; the budget of {budget} tokens needs {needed} "
            f"({tokens_per_image} patches each). Add images or lower --calibration-tokens."
        )
    files = files[:needed]
    labels = image_labels(path, files, label2id)
    mode = "L" if len(getattr(processor, "image_mean", None) or [0, 0, 0]) == 1 else "RGB"  # 1-channel models
    batches = []
    for i in range(0, len(files), batch_size):
        images = [Image.open(f).convert(mode) for f in files[i : i + batch_size]]
        batch = {"pixel_values": processor(images=images, return_tensors="pt")["pixel_values"]}
        if labels is not None:
            batch["labels"] = torch.tensor(labels[i : i + batch_size])
        batches.append(batch)
    info = {"kind": "images", "source": str(path), "images": needed, "tokens": needed * tokens_per_image}
    return Calibration(batches, needed * tokens_per_image, {**info, "labelled": labels is not None})


def read_wav(path: Path, rate: int):
    """A WAV file as float32 mono samples at `rate` (averaged channels, resampled if needed)."""
    import numpy as np
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    try:
        file_rate, data = wavfile.read(path)
    except Exception as e:  # scipy raises ValueError and others for what it cannot read
        raise CalibrationError(f"Cannot read {path} as WAV ({type(e).__name__}: {str(e)[:160]}).") from e
    if data.dtype.kind in "iu":
        info = np.iinfo(data.dtype)
        data = (data.astype(np.float64) - (info.max + info.min + 1) / 2) / (info.max - info.min + 1) * 2
    data = data.astype(np.float64)
    if data.ndim == 2:
        data = data.mean(axis=1)
    if file_rate != rate:
        from math import gcd

        g = gcd(int(file_rate), int(rate))
        data = resample_poly(data, rate // g, file_rate // g)
    return data.astype(np.float32)


def from_audio(path: Path, processor, config, budget: int, batch_size: int = 8, seq_len: int = 256) -> Calibration:
    """WAV files through the model's feature extractor until the budget of frames is met. Waveform
    encoders: batches of one clip length (the shortest of the batch: no padding, every frame real).
    Speech encoder-decoders (Whisper): each clip's transcript, `<clip>.txt` beside it, is the decoder's
    input (teacher forcing)."""
    features = getattr(processor, "feature_extractor", processor)
    if features is None or not hasattr(features, "sampling_rate"):
        raise CalibrationError(
            "Audio calibration needs the model's feature extractor (preprocessor_config.json) next to the model."
        )
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES) if path.is_dir() else [path]
    adapter = adapter_for(config)
    spectrogram = modality(config) == "spectrogram"
    clips, frames = [], 0
    for f in files:
        if frames >= budget:
            break
        clip = read_wav(f, features.sampling_rate)
        n = adapter.spectrogram_positions(config) if spectrogram else adapter.audio_frames(config, len(clip))
        if n < 1:
            continue
        clips.append((f, clip))
        frames += n
    if frames < budget:
        raise CalibrationError(
            f"{path} holds {frames} audio frames, fewer than the calibration budget of {budget}. "
            "Add more audio or lower --calibration-tokens."
        )
    if spectrogram:
        return _spectrogram_batches(path, clips, features, getattr(processor, "tokenizer", None), config, batch_size,
                                    seq_len)  # fmt: skip
    batches, tokens = [], 0
    for i in range(0, len(clips), batch_size):
        group = [c for _, c in clips[i : i + batch_size]]
        length = min(len(c) for c in group)
        values = features([c[:length] for c in group], sampling_rate=features.sampling_rate, return_tensors="pt")
        batches.append({"input_values": values["input_values"]})
        tokens += len(group) * adapter.audio_frames(config, length)
    return Calibration(batches, tokens, {"kind": "audio", "source": str(path), "clips": len(clips), "tokens": tokens})


def _spectrogram_batches(path, clips, features, tokenizer, config, batch_size: int, seq_len: int) -> Calibration:
    if tokenizer is None:
        raise CalibrationError("A speech encoder-decoder's calibration needs its tokenizer for the transcripts; "
                               "save the processor (feature extractor and tokenizer) with the model.")  # fmt: skip
    missing = [f.name for f, _ in clips if not f.with_suffix(".txt").is_file()]
    if missing:
        raise CalibrationError(f"{path}: no transcript for {', '.join(missing[:3])}: the decoder reads each clip's "
                               "text from <clip>.txt beside it.")  # fmt: skip
    seq_len = min(seq_len, int(getattr(config, "max_target_positions", seq_len)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches, decoded = [], 0
    for i in range(0, len(clips), batch_size):
        group = clips[i : i + batch_size]
        ids = [tokenizer(check_text(f.with_suffix(".txt")).strip())["input_ids"][:seq_len] for f, _ in group]
        batch = features([c for _, c in group], sampling_rate=features.sampling_rate, return_tensors="pt")
        batch = {"input_features": batch["input_features"], **_batch_chunks(ids, len(ids), pad, False)[0]}
        batch["decoder_input_ids"] = batch.pop("input_ids")
        batch["decoder_attention_mask"] = batch.pop("attention_mask")
        batches.append(batch)
        decoded += int(batch["decoder_attention_mask"].sum())
    tokens = len(clips) * adapter_for(config).spectrogram_positions(config)
    return Calibration(batches, tokens, {"kind": "speech", "source": str(path), "clips": len(clips), "tokens": tokens,
                                         "decoder_tokens": decoded})  # fmt: skip


def from_tensors(
    path: Path, budget: int | None, batch_size: int = 8, seq2seq: bool = False, floats: str = "pixel_values"
) -> Calibration:
    """A .pt/.safetensors/.npy file: a dict of model inputs, or a bare tensor (integer: input_ids; floating
    point: `floats`, the model's pixel_values or input_values)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        elif path.suffix == ".npy":
            import numpy as np

            data = torch.from_numpy(np.load(path, allow_pickle=False))
        else:  # pickle: tensors only, never code
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CalibrationError(
            f"Cannot read calibration tensors from {path} ({type(e).__name__}: {str(e)[:200]}). "
            "Give a .pt/.safetensors/.npy file of input tensors."
        ) from e
    if isinstance(data, torch.Tensor):
        key = floats if data.is_floating_point() else "input_ids"
        data = {key: data}
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CalibrationError(f"{path} must hold a tensor or a dict of input tensors.")
    if len({v.shape[0] if v.dim() else -1 for v in data.values()}) != 1 or next(iter(data.values())).dim() < 2:
        raise CalibrationError(f"{path}: every tensor must be [batch, ...] with the same batch size.")
    if "input_ids" in data:
        data.setdefault("attention_mask", torch.ones_like(data["input_ids"]))
        if seq2seq:
            data.setdefault("decoder_input_ids", data["input_ids"])
            data.setdefault("decoder_attention_mask", data["attention_mask"])
    n = next(iter(data.values())).shape[0]
    batches = [{k: v[i : i + batch_size] for k, v in data.items()} for i in range(0, n, batch_size)]
    if "attention_mask" in data:
        tokens = int(data["attention_mask"].sum())
    else:
        tokens = n
    if budget and tokens < budget and "input_ids" in data:
        raise CalibrationError(f"{path} holds {tokens} tokens, fewer than the budget of {budget}.")
    return Calibration(batches, tokens, {"kind": "tensors", "source": str(path), "tokens": tokens})


def _check_ids(path: Path, cal: Calibration, vocab: int | None, limit: int | None) -> None:
    for batch in cal:
        ids = batch.get("input_ids")
        if ids is None:
            continue
        if ids.is_floating_point() or ids.dim() != 2:
            raise CalibrationError(f"{path}: input_ids must be integer token ids of shape [batch, tokens].")
        if ids.numel() and (int(ids.min()) < 0 or (vocab and int(ids.max()) >= vocab)):
            raise CalibrationError(
                f"{path}: token ids must lie in 0..{vocab - 1 if vocab else 'vocab-1'} (the model's vocabulary); "
                f"found {int(ids.min())}..{int(ids.max())}. Were they made with another tokenizer?"
            )
        if limit and ids.shape[1] > limit:
            raise CalibrationError(
                f"{path}: rows of {ids.shape[1]} tokens are longer than the model's {limit} positions; cut them."
            )


def load_calibration(
    path, *, model, tokenizer=None, processor=None, budget: int = 10_000, seq_len: int = 256, batch_size: int = 8
) -> Calibration:
    """Pick the loader by what the path holds and check it fits the model's modality."""
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"Calibration data {path} does not exist.")
    config = model.config
    adapter = adapter_for(model)
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    limit = adapter.max_positions(config)
    if limit:  # chunks must fit the model's positions
        seq_len = min(seq_len, limit)
    kind = modality(config)
    reads = {"text": "text", "image": "images", "audio": "audio", "spectrogram": "audio"}[kind]
    suffixes = {p.suffix.lower() for p in path.rglob("*")} if path.is_dir() else {path.suffix.lower()}
    if suffixes & TENSOR_SUFFIXES and not path.is_dir():
        cal = from_tensors(
            path, budget, batch_size, seq2seq, floats=MAIN_INPUT[kind] if kind != "text" else "pixel_values"
        )
        first = next(iter(cal), {})
        if MAIN_INPUT[kind] not in first:
            what = "integer token ids" if kind == "text" else "floating point"
            raise CalibrationError(f"{path} holds no {MAIN_INPUT[kind]} ({what}) but the model takes {reads}.")
        _check_ids(path, cal, getattr(config, "vocab_size", None), limit)
        return cal
    if suffixes & IMAGE_SUFFIXES:
        if kind != "image":
            raise CalibrationError(f"{path} holds images but the model takes {reads}.")
        labels = config.label2id if "labels" in inspect.signature(model.forward).parameters else None  # a classifier
        return from_images(path, processor, budget, adapter.image_tokens(config), batch_size, labels)
    if suffixes & AUDIO_SUFFIXES:
        if reads != "audio":
            raise CalibrationError(f"{path} holds audio but the model takes {reads}.")
        return from_audio(path, processor, config, budget, batch_size, seq_len)
    if kind != "text":
        raise CalibrationError(
            f"{path} holds no {reads} but the model is an {'image' if kind == 'image' else 'audio'} model."
        )
    if path.is_file() and path.stat().st_size == 0:
        raise CalibrationError(f"Calibration file {path} is empty.")
    return from_text(path, tokenizer, budget, seq_len, batch_size, seq2seq)
