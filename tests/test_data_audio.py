"""Audio: mu-law, the resampler, and decoding the real spoken-digit and music samples."""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import soundfile as sf

from sparse_lm.data import AudioReadWarning, DataError, load_split, mulaw_decode, mulaw_encode, resample
from sparse_lm.data import audio
from sparse_lm.data.mulaw import mulaw_compress


@pytest.fixture(scope="module")
def digits(shared_data: Path) -> Path:
    return shared_data / "audio" / "spoken_digits"


def audio_cfg(path: Path, cache: Path, **more) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(name="audio", path=str(path), seq_len=1024, sample_rate=12000, cache_dir=str(cache), **more))


# ---------------------------------------------------------------- mu-law


def test_mulaw_codes_round_trip_exactly():
    codes = np.arange(256, dtype=np.uint8)
    assert np.array_equal(mulaw_encode(mulaw_decode(codes)), codes)
    assert mulaw_encode(np.array([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]
    assert np.all(np.diff(mulaw_decode(codes)) > 0)  # monotonic


def test_mulaw_round_trip_within_quantisation_error():
    x = np.random.default_rng(0).uniform(-1, 1, 100_000)
    y = mulaw_decode(mulaw_encode(x))
    # Uniform quantisation of the companded signal: at most half a step (1/255) there.
    assert np.max(np.abs(mulaw_compress(x) - mulaw_compress(y))) <= 1 / 255 + 1e-6
    # In the signal domain the error is half a step times the expander's slope,
    # ln(1 + mu) / mu * (1 + mu |x|): tiny for quiet samples, larger for loud ones.
    def bound(amplitude: float) -> float:
        return (1 / 255) * math.log(256) / 255 * (1 + 255 * amplitude)

    quiet = np.abs(x) < 0.01
    assert np.max(np.abs(x - y)[quiet]) <= bound(0.0105)
    assert np.max(np.abs(x - y)) <= bound(1.0)


# ---------------------------------------------------------------- resampler


@pytest.mark.parametrize("rate_in, rate_out, freq", [(44100, 12000, 1000.0), (8000, 12000, 440.0), (48000, 12000, 2500.0)])
def test_resampler_preserves_a_sine(rate_in, rate_out, freq):
    x = np.sin(2 * np.pi * freq * np.arange(2 * rate_in) / rate_in).astype(np.float32)
    y = resample(x, rate_in, rate_out)
    assert len(y) == math.ceil(len(x) * rate_out / rate_in)
    middle = y[len(y) // 4 : 3 * len(y) // 4]  # away from the zero-padded ends
    spectrum = np.abs(np.fft.rfft(middle * np.hanning(len(middle))))
    peak_hz = np.argmax(spectrum) * rate_out / len(middle)
    assert abs(peak_hz - freq) <= rate_out / len(middle)
    expected = np.sin(2 * np.pi * freq * np.arange(len(y)) / rate_out)[len(y) // 4 : 3 * len(y) // 4]
    assert np.max(np.abs(middle - expected)) < 1e-3


def test_resampler_removes_frequencies_above_the_new_nyquist():
    rate_in = 44100
    x = np.sin(2 * np.pi * 9000.0 * np.arange(rate_in) / rate_in).astype(np.float32)
    y = resample(x, rate_in, 12000)  # 9 kHz would alias to 3 kHz at 12 kHz
    assert np.sqrt(np.mean(y[3000:-3000] ** 2)) < 1e-3


# ---------------------------------------------------------------- decoding real files


def test_wav_decodes_to_mono_at_the_target_rate(digits: Path):
    path = digits / "3_jackson_0.wav"
    raw, rate = sf.read(str(path), dtype="float32")
    assert rate == 8000 and raw.ndim == 1
    codes = audio.decode_file(path, 12000)
    assert codes.dtype == np.uint8 and codes.ndim == 1
    assert len(codes) == math.ceil(len(raw) * 12000 / 8000)
    # Within mu-law quantisation error of the resampled signal.
    reference = resample(raw, 8000, 12000)
    assert np.max(np.abs(mulaw_compress(mulaw_decode(codes)) - mulaw_compress(reference))) <= 1 / 255 + 1e-6


def test_ogg_stereo_is_mixed_to_mono(shared_data: Path):
    path = shared_data / "audio" / "music" / "underground.ogg"
    info = sf.info(str(path))
    assert (info.samplerate, info.channels) == (44100, 2)
    codes = audio.decode_file(path, 12000)
    assert len(codes) == math.ceil(info.frames * 12000 / 44100)
    stereo, _ = sf.read(str(path), dtype="float32", start=441000, frames=44100)
    mono = resample(stereo.mean(axis=1), 44100, 12000)
    # Inside the file (filter edges aside) the clip matches an independent decode.
    got = mulaw_compress(mulaw_decode(codes[120000 + 500 : 132000 - 500]))
    assert np.max(np.abs(got - mulaw_compress(mono[500:-500]))) <= 1 / 255 + 1e-3


def test_audio_splits_by_file_and_caches(digits: Path, tmp_path: Path, monkeypatch):
    cache = tmp_path / "cache"
    splits = {s: load_split(audio_cfg(digits, cache), s) for s in ("train", "valid", "test")}
    files = {s: set(src.meta["files"]) for s, src in splits.items()}
    # Each file is placed by its name's hash: the sizes follow (0.9, 0.05, 0.05) within
    # binomial spread (5% of 400 is 20 +- 4.4).
    assert len(files["train"]) + len(files["valid"]) + len(files["test"]) == 400
    assert 8 <= len(files["valid"]) <= 32 and 8 <= len(files["test"]) <= 32
    assert not (files["train"] & files["valid"]) and not (files["train"] & files["test"]) and not (files["valid"] & files["test"])
    assert len(list(cache.glob("*.npy"))) == 400
    # Clips never span two recordings.
    lengths = [len(audio.encoded_audio(Path(f), 12000, cache)) for f in splits["valid"].meta["files"]]
    assert len(splits["valid"]) == sum(n // 1024 for n in lengths)
    assert splits["valid"].num_bytes == sum(lengths)
    # Second load comes from the cache: decoding must not be called at all.
    monkeypatch.setattr(audio, "decode_file", lambda *a: (_ for _ in ()).throw(AssertionError("decoded again")))
    again = load_split(audio_cfg(digits, cache), "valid")
    assert np.array_equal(again.buffer, splits["valid"].buffer)


def test_adding_or_removing_recordings_never_moves_another_between_splits(digits: Path):
    """A test recording must never become a training one because the folder grew: each
    file's split depends on its own name only (once every split has a file by hash)."""
    files = sorted(digits.glob("*.wav"))
    fr = (0.9, 0.05, 0.05)

    def assignment(fs):
        return {p.name: s for s in ("train", "valid", "test") for p in audio.split_files(fs, fr, s)}

    whole = assignment(files)
    for n in (100, 101, 150, 233, 399):
        part = assignment(files[:n])
        assert all(part[name] == whole[name] for name in part), n
    # A folder too small to give every split a file by hash still gets one in each.
    few = files[:5]
    assert all(audio.split_files(few, fr, s) for s in ("train", "valid", "test"))
    assert sorted(p for s in ("train", "valid", "test") for p in audio.split_files(few, fr, s)) == few


def test_unreadable_audio_is_skipped_and_counted(digits: Path, tmp_path: Path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("0_george_0.wav", "1_george_0.wav", "2_george_0.wav"):
        shutil.copy(digits / name, folder / name)
    (folder / "broken.wav").write_bytes(b"RIFF....WAVEjunk")
    (folder / "notes.txt").write_text("not audio, ignored")
    with pytest.warns(AudioReadWarning, match="broken.wav"):
        src = load_split(audio_cfg(folder, tmp_path / "c", split_by="time"), "train")
    assert len(src.meta["files"]) == 3
    assert [Path(p).name for p, _ in src.meta["skipped_files"]] == ["broken.wav"]

    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.flac").write_bytes(b"fLaC" + bytes(20))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AudioReadWarning)
        with pytest.raises(DataError, match="None of the"):
            load_split(audio_cfg(bad, tmp_path / "c", split_by="time"), "train")


def test_audio_errors(tmp_path: Path):
    with pytest.raises(DataError, match="No audio files"):
        load_split(audio_cfg(tmp_path, tmp_path / "c"), "train")
