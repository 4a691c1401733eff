"""Audio models: the built-in speech-like signals, WAV calibration through a real feature extractor,
frame masks, and a waveform encoder converted from the command line on the built-in audio."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T
from scipy import signal
from scipy.io import wavfile
from tiny_models import build, calibration

from ffmerge_onnx import Window, adapter_for, merge
from ffmerge_onnx.errors import CalibrationError
from ffmerge_onnx.families import modality, speech
from ffmerge_onnx.merging import load_calibration
from ffmerge_onnx.merging.calibration import tokens_per_item
from ffmerge_onnx.merging.data import read_wav, token_mask


def extractor():
    return T.Wav2Vec2FeatureExtractor(sampling_rate=16_000, do_normalize=True, return_attention_mask=False)


def band(x: np.ndarray, lo: float, hi: float) -> float:
    f, p = signal.welch(x, speech.RATE, nperseg=1024)
    return float(p[(f >= lo) & (f < hi)].sum() / p.sum())


def test_speech_like_clips_are_deterministic_distinct_and_speech_shaped():
    a = speech.speech_like(2.0, 7)
    assert a.dtype == np.float32 and a.shape == (32_000,) and np.abs(a).max() <= 1.0
    assert np.array_equal(a, speech.speech_like(2.0, 7)) and not np.array_equal(a, speech.speech_like(2.0, 8))
    # voiced speech: most energy between the pitch and the first formants, little below 80 Hz or above 4 kHz
    assert band(a, 80, 4000) > 0.9 and band(a, 0, 80) < 0.05 and band(a, 4000, 8000) < 0.05
    # pauses: some 20 ms frames far quieter than the loudest (speech is not a steady tone)
    rms = np.sqrt((a[: len(a) // 320 * 320].reshape(-1, 320) ** 2).mean(1))
    assert rms.min() < 0.05 * rms.max()
    # splits never share a clip
    assert (
        len({s for s in speech.SPLIT_SEEDS.values()}) == 3
        and min(abs(x - y) for x in speech.SPLIT_SEEDS.values() for y in speech.SPLIT_SEEDS.values() if x != y)
        >= 10_000
    )


def test_wav_files_read_back_as_float_at_the_models_rate(tmp_path):
    clip = speech.speech_like(1.0, 3)
    wavfile.write(tmp_path / "a.wav", 16_000, (clip * 32767).astype(np.int16))
    assert np.abs(read_wav(tmp_path / "a.wav", 16_000) - clip).max() < 2 / 32767
    stereo = np.stack([clip, clip], axis=1)[::2]  # 8 kHz, two channels
    wavfile.write(tmp_path / "b.wav", 8_000, (stereo * 32767).astype(np.int16))
    up = read_wav(tmp_path / "b.wav", 16_000)
    assert up.shape == (16_000,) and np.corrcoef(up[1000:-1000], clip[1000:-1000])[0, 1] > 0.9
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really")
    with pytest.raises(CalibrationError, match="as WAV"):
        read_wav(tmp_path / "bad.wav", 16_000)


def test_audio_calibration_counts_frames_and_refuses_the_wrong_modality(tmp_path):
    model = build("wav2vec2")
    adapter = adapter_for(model)
    folder = speech.write_calibration_audio(tmp_path, "calibration", seconds=0.5, clips=6)
    per_clip = adapter.audio_frames(model.config, 8_000)
    cal = load_calibration(folder, model=model, processor=extractor(), budget=3 * per_clip + 1, batch_size=2)
    assert cal.tokens == 4 * per_clip  # whole clips until the budget is met
    assert [tuple(b["input_values"].shape) for b in cal.batches] == [(2, 8_000), (2, 8_000)]
    assert torch.allclose(cal.batches[0]["input_values"].mean(1), torch.zeros(2), atol=1e-5)  # normalized
    with pytest.raises(CalibrationError, match="fewer than the calibration budget"):
        load_calibration(folder, model=model, processor=extractor(), budget=7 * per_clip)
    with pytest.raises(CalibrationError, match="feature extractor"):
        load_calibration(folder, model=model, processor=None, budget=per_clip)
    with pytest.raises(CalibrationError, match="holds audio but the model takes text"):
        load_calibration(folder, model=build("bert"), budget=10)
    (tmp_path / "t.txt").write_text("w3 w4 w5")
    with pytest.raises(CalibrationError, match="holds no audio but the model is an audio model"):
        load_calibration(tmp_path / "t.txt", model=model, budget=10)
    torch.save(torch.randn(3, 800), tmp_path / "wave.pt")  # a bare float tensor is a waveform batch
    assert "input_values" in next(iter(load_calibration(tmp_path / "wave.pt", model=model, budget=1)))


def test_a_mask_over_samples_becomes_a_mask_over_frames():
    model = build("wav2vec2")
    adapter = adapter_for(model)
    n = adapter.audio_samples(model.config, 10)
    assert adapter.audio_frames(model.config, n) == 10 and adapter.audio_frames(model.config, n - 1) == 9
    mask = torch.zeros(2, n, dtype=torch.long)
    mask[0] = 1
    mask[1, : adapter.audio_samples(model.config, 4)] = 1
    batch = {"input_values": torch.randn(2, n), "attention_mask": mask}
    frames = tokens_per_item(model, batch, "encoder")
    got = token_mask(batch, "encoder", frames, model.config)
    assert frames == 10 and got.sum(1).tolist() == [10, 4] and got[1, :4].all()


def test_calibration_reads_every_frame_of_a_waveform():
    model = build("hubert")
    assert modality(model.config) == "audio" and adapter_for(model).task_of(model) == "audio-feature-extraction"
    cal = calibration(model, n=8, seq=12)
    result = merge(model, [Window("encoder", 1, 2)], calibration=cal, progress=False, method="average")
    assert result.manifest.windows[0].end == 2


@pytest.mark.slow  # a real feature extractor, the built-in audio, export and validation: ~40 s
def test_convert_a_waveform_encoder_on_the_built_in_audio(tmp_path):
    from ffmerge_onnx.cli import main

    model = build("wav2vec2")
    model.save_pretrained(tmp_path / "w2v")
    extractor().save_pretrained(tmp_path / "w2v")
    out = tmp_path / "out"
    code = main(["convert", str(tmp_path / "w2v"), "--layers", "1-2", "--calibration-tokens", "2000",
                 "--no-compare", "-o", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    checks = {c["name"]: c["status"] for c in report["checks"]}
    assert report["ok"] and checks["outputs[cpu]"] == "pass" and checks["sharing"] == "pass"
    manifest = json.loads((out / "reference" / "ffmerge.json").read_text())
    assert manifest["calibration"]["kind"] == "audio" and manifest["calibration"]["tokens"] >= 2000
    assert Path(out / "model.onnx").is_file()


def speech_processor():
    """Whisper's own feature extractor sized for the tiny model (64 frames = its 32 encoder positions),
    with a word-level tokenizer for the transcripts."""
    from types import SimpleNamespace

    from tiny_models import word_tokenizer

    features = T.WhisperFeatureExtractor(feature_size=16, chunk_length=1, hop_length=250)
    return SimpleNamespace(feature_extractor=features, tokenizer=word_tokenizer())


def test_speech_calibration_pairs_each_clip_with_its_transcript(tmp_path):
    from tiny_models import word_text

    model = build("whisper")
    assert modality(model.config) == "spectrogram" and adapter_for(model).task_of(model) == "speech-seq2seq"
    texts = [word_text(5 + i, seed=i) for i in range(3)]
    folder = speech.write_calibration_audio(tmp_path, "calibration", seconds=1.0, clips=3, transcripts=texts)
    cal = load_calibration(folder, model=model, processor=speech_processor(), budget=65, batch_size=2)
    lengths = [len(speech_processor().tokenizer(t)["input_ids"]) for t in texts]
    first = cal.batches[0]
    assert tuple(first["input_features"].shape) == (2, 16, 64)
    assert first["decoder_attention_mask"].sum(1).tolist() == lengths[:2]  # each clip's own transcript, padded
    assert cal.tokens == 3 * 32 and cal.description["decoder_tokens"] == sum(lengths)
    assert tokens_per_item(model, first, "encoder") == 32
    assert tokens_per_item(model, first, "decoder") == max(lengths[:2])
    (folder / "0001.txt").unlink()
    with pytest.raises(CalibrationError, match="no transcript for 0001.wav"):
        load_calibration(folder, model=model, processor=speech_processor(), budget=64)
    merged = merge(model, [Window(s, 1, 2) for s in ("encoder", "decoder")], calibration=calibration(model),
                   progress=False)  # fmt: skip
    assert [w.stack for w in merged.manifest.windows] == ["encoder", "decoder"]


def _save_whisper(folder: Path) -> Path:
    from tiny_models import word_tokenizer

    build("whisper").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    speech_processor().feature_extractor.save_pretrained(folder)
    return folder


def test_a_quality_goal_on_a_speech_model_is_refused_before_any_work(tmp_path, capsys):
    from ffmerge_onnx.cli import main

    model = _save_whisper(tmp_path / "wh")
    code = main(["convert", str(model), "--layers", "1-2", "--max-loss", "0.1", "-o", str(tmp_path / "out")])
    assert code == 2 and not (tmp_path / "out").exists()
    assert "no quality metric for speech-seq2seq" in " ".join(capsys.readouterr().err.split())


@pytest.mark.slow  # three ONNX files and a greedy decode: ~60 s
def test_whisper_with_kv_cache_decodes_like_pytorch(tmp_path):
    import onnxruntime as ort

    from ffmerge_onnx.onnx.build import BuildOptions
    from ffmerge_onnx.onnx.build import build as build_onnx
    from ffmerge_onnx.onnx.files import sharing
    from ffmerge_onnx.onnx.validate import check_outputs
    from ffmerge_onnx.runtime import session_settings

    model = build("whisper")
    result = merge(model, [Window(s, 1, 2) for s in ("encoder", "decoder")], calibration=calibration(model),
                   progress=False)  # fmt: skip
    built = build_onnx(result, tmp_path, BuildOptions(kv_cache=True))
    files = [f for f in built.files if f.endswith(".onnx")]
    assert files == ["encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"]
    assert all(sharing(tmp_path / f)["duplicated_tensors"] == 0 for f in files)
    check = check_outputs(tmp_path, model, "cpu", session_settings("fold")["session_config_entries"], kv_cache=True)
    assert check.status == "pass", check.detail
    assert {tuple(r["case"]) for r in check.detail["rows"]} >= {(1, 7, 0), (3, 1, 32)}
    # greedy decoding: the ONNX files with the cache against PyTorch without it
    g = torch.Generator().manual_seed(4)
    features = torch.randn(1, 16, 64, generator=g)
    tokens = torch.randint(3, 90, (1, 2), generator=g)
    enc, first, later = (ort.InferenceSession(str(tmp_path / f)) for f in files)
    hidden = enc.run(None, {"input_features": features.numpy()})[0]
    out = first.run(None, {"input_ids": tokens.numpy(), "encoder_hidden_states": hidden})
    names = [i.name for i in later.get_inputs()][1:]
    past = dict(zip(names, out[1:]))
    self_names = [n for n in names if ".decoder." in n]
    got, expected = [], []
    for _ in range(6):
        with torch.no_grad():
            ref = model(input_features=features, decoder_input_ids=tokens, use_cache=False).logits[0, -1]
        expected.append(ref.numpy())
        got.append(out[0][0, -1])
        nxt = int(ref.argmax())
        tokens = torch.cat([tokens, torch.tensor([[nxt]])], 1)
        out = later.run(None, {"input_ids": np.array([[nxt]], dtype=np.int64), **past})
        past.update(zip(self_names, out[1:]))
    assert [int(a.argmax()) for a in got] == [int(a.argmax()) for a in expected]
    np.testing.assert_allclose(np.stack(got), np.stack(expected), atol=1e-4, rtol=0)


@pytest.mark.slow  # Whisper's processor, the built-in audio with BBC transcripts, two ONNX files: ~80 s
def test_convert_a_speech_encoder_decoder_on_the_built_in_audio(tmp_path):
    from ffmerge_onnx.cli import main

    out = tmp_path / "out"
    code = main(["convert", str(_save_whisper(tmp_path / "wh")), "--layers", "1-2", "--calibration-tokens", "640",
                 "--no-compare", "-o", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and {c["name"]: c["status"] for c in report["checks"]}["sharing"] == "pass"
    assert (out / "encoder_model.onnx").is_file() and (out / "decoder_model.onnx").is_file()
    calibrated = json.loads((out / "reference" / "ffmerge.json").read_text())["calibration"]
    assert calibrated["kind"] == "speech" and calibrated["tokens"] >= 640 and calibrated["decoder_tokens"] > 0


def test_a_speech_models_preprocessor_holds_features_and_tokenizer_and_a_text_models_stays_a_tokenizer(tmp_path):
    from tiny_models import word_tokenizer

    from ffmerge_onnx.families.loading import load_preprocessor

    found = load_preprocessor(str(_save_whisper(tmp_path / "wh")))
    assert hasattr(found.feature_extractor, "sampling_rate") and found.tokenizer("w5 w6")["input_ids"]
    build("bert").save_pretrained(tmp_path / "bert")  # a tokenizer beside an image processor (CLIP-style)
    word_tokenizer().save_pretrained(tmp_path / "bert")
    T.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "bert")
    found = load_preprocessor(str(tmp_path / "bert"))
    assert found.pad_token_id == 0 and not hasattr(found, "feature_extractor")
