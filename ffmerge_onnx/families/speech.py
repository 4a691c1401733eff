"""Built-in audio: synthetic speech-like signals (no registry package ships real speech).

A clip is a run of syllables: voiced segments (a glottal pulse train with a drifting pitch, shaped by
three formant resonators that glide between vowel targets), unvoiced fricatives (band-passed noise),
stop bursts and pauses, each under an attack/decay envelope, over a faint noise floor. Deterministic
per (split, clip). What an audio encoder's FF sublayers see from it is speech-shaped: harmonic
spectra under moving formants, broadband noise, silence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import signal

RATE = 16_000
SPLIT_SEEDS = {"calibration": 0, "validation": 100_000, "test": 200_000}
VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (640, 1190, 2390),
          (490, 1350, 1690), (660, 1720, 2410), (440, 1020, 2240))  # fmt: skip  # F1-F3 (Hz), Peterson-Barney


def _resonate(x: np.ndarray, freqs: np.ndarray, bandwidth: float, rate: int) -> np.ndarray:
    """A two-pole resonator whose centre follows `freqs` (one value per sample), in blocks of 80."""
    out = np.empty_like(x)
    r = np.exp(-np.pi * bandwidth / rate)
    state = np.zeros(2)
    for start in range(0, len(x), 80):
        f = freqs[min(start + 40, len(x) - 1)]
        a = [1.0, -2 * r * np.cos(2 * np.pi * f / rate), r * r]
        block, state = signal.lfilter([1 - r], a, x[start : start + 80], zi=state)
        out[start : start + 80] = block
    return out


def _voiced(n: int, rng: np.random.Generator, rate: int) -> np.ndarray:
    f0 = rng.uniform(90, 240) * (1 + 0.15 * np.sin(np.linspace(0, rng.uniform(1, 3) * np.pi, n)))
    f0 *= 1 + 0.01 * rng.standard_normal(n).cumsum() / np.sqrt(n)  # jitter
    phase = np.cumsum(f0 / rate)
    pulses = np.diff(np.floor(phase), prepend=0.0) + 0.02 * rng.standard_normal(n)  # glottal pulses + breath
    a, b = rng.choice(len(VOWELS), 2)
    glide = np.linspace(0, 1, n)[:, None]
    formants = (1 - glide) * np.array(VOWELS[a]) + glide * np.array(VOWELS[b])
    out = sum(
        _resonate(pulses, formants[:, i], bw, rate) * gain
        for i, (bw, gain) in enumerate(((80, 1.0), (120, 0.6), (160, 0.3)))
    )
    return out


def _noise(n: int, rng: np.random.Generator, rate: int, low: float, high: float) -> np.ndarray:
    sos = signal.butter(4, [low, min(high, rate / 2 - 100)], btype="band", fs=rate, output="sos")
    return signal.sosfilt(sos, rng.standard_normal(n))


def _envelope(n: int, rate: int) -> np.ndarray:
    ramp = min(n // 3, int(0.015 * rate))
    env = np.ones(n)
    env[:ramp] = np.linspace(0, 1, ramp)
    env[n - ramp :] = np.linspace(1, 0, ramp)
    return env


def speech_like(seconds: float, seed: int, rate: int = RATE) -> np.ndarray:
    """A float32 clip in [-1, 1] of `seconds` length."""
    rng = np.random.default_rng(seed)
    total = int(seconds * rate)
    pieces, used = [], 0
    while used < total:
        kind = rng.choice(["voiced", "fricative", "burst", "pause"], p=[0.6, 0.2, 0.1, 0.1])
        n = int(rate * {"voiced": rng.uniform(0.08, 0.25), "fricative": rng.uniform(0.04, 0.12),
                        "burst": rng.uniform(0.01, 0.03), "pause": rng.uniform(0.03, 0.2)}[kind])  # fmt: skip
        if kind == "voiced":
            seg = _voiced(n, rng, rate)
        elif kind == "fricative":
            seg = _noise(n, rng, rate, rng.uniform(2500, 4000), rng.uniform(6000, 7800))
        elif kind == "burst":
            seg = _noise(n, rng, rate, 500, 6000) * np.exp(-np.linspace(0, 6, n))
        else:
            seg = np.zeros(n)
        peak = np.abs(seg).max()
        level = rng.uniform(0.2, 0.8) if kind == "voiced" else rng.uniform(0.05, 0.3)
        pieces.append(seg / peak * level * _envelope(n, rate) if peak > 0 else seg)
        used += n
    clip = np.concatenate(pieces)[:total] + 0.003 * rng.standard_normal(total)
    return (clip / max(1.0, np.abs(clip).max())).astype(np.float32)


def write_calibration_audio(
    folder: Path, split: str = "calibration", seconds: float = 4.0, clips: int = 64, transcripts: list[str] = ()
) -> Path:
    """The split's clips as 16 kHz 16-bit WAV files in folder/speech_<split>/ (what --calibration takes
    for an audio model), each with the next of `transcripts` (if given) as `<clip>.txt` beside it."""
    from scipy.io import wavfile

    out = Path(folder) / f"speech_{split}"
    out.mkdir(parents=True, exist_ok=True)
    for i in range(clips):
        clip = speech_like(seconds, SPLIT_SEEDS[split] + i)
        wavfile.write(out / f"{i:04d}.wav", RATE, (clip * 32767).astype(np.int16))
        if transcripts:
            (out / f"{i:04d}.txt").write_text(transcripts[i % len(transcripts)])
    return out


def transcripts_from(texts: list[str], words: int = 40) -> list[str]:
    """Texts cut into pieces of `words` words: the decoder side of the built-in clips (the clips carry no
    words, so a speech model's decoder FFs are calibrated on real text under speech-like encoder states)."""
    pieces = []
    for text in texts:
        w = text.split()
        pieces += [" ".join(w[i : i + words]) for i in range(0, len(w) - words // 2, words)]
    return pieces
