"""Audio as bytes: decoded, mixed to mono, resampled, 8-bit mu-law encoded, cut into clips.

Each file is one segment of the split: clips of ``seq_len`` bytes never span two
recordings. Files are assigned to splits whole (``split_by='file'``, the default), by a
hash of their name so that adding a file does not move the others; ``split_by='time'``
instead cuts every file 90/5/5 in time (for a handful of long recordings).

Decoding and resampling minutes of 44.1 kHz audio takes seconds per file, so the
encoded bytes are cached as ``.npy`` files keyed by path, modification time, size and
rate; the data folder may be read-only, hence a separate cache folder.
"""

from __future__ import annotations

import glob
import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sparse_lm.data.errors import DataError
from sparse_lm.data.mulaw import mulaw_encode
from sparse_lm.data.resample import resample
from sparse_lm.data.source import ByteSource
from sparse_lm.data.splits import DEFAULT_FRACTIONS, check_fractions, check_split, contiguous_bounds

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".aif", ".aiff", ".mp3")
# Bump when decoding, resampling or encoding changes, so stale caches are not reused.
_CACHE_VERSION = "1"


class AudioReadWarning(UserWarning):
    """A file in the audio folder could not be decoded and was skipped."""


def default_cache_dir() -> Path:
    env = os.environ.get("SPARSE_LM_CACHE_DIR")
    return Path(env).expanduser() / "audio" if env else Path.home() / ".cache" / "sparse_lm" / "audio"


def list_audio_files(path: str) -> list[Path]:
    """Audio files in a folder (recursively), matching a glob, or the single file named."""
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        found = [p for p in Path(path).rglob("*") if p.is_file()]
    elif os.path.isfile(path):
        found = [Path(path)]
    else:
        found = [Path(p) for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
    files = sorted(p for p in found if p.suffix.lower() in AUDIO_EXTENSIONS)
    if not files:
        raise DataError(
            f"No audio files ({', '.join(AUDIO_EXTENSIONS)}) were found at {path}. Set data.path "
            f"to a folder of recordings, a glob such as 'music/*.flac', or one file."
        )
    return files


def _name_point(path: Path) -> float:
    """A file's fixed point in [0, 1): the SHA-1 of its name."""
    return int(hashlib.sha1(path.name.encode()).hexdigest(), 16) / 16**40


def split_files(files: Sequence[Path], fractions: Sequence[float], split: str) -> list[Path]:
    """The files of ``split``: each file is placed by a hash of its own name, so the
    split sizes follow ``fractions`` on average (not exactly), and adding or removing
    files never moves another file between splits, as long as each split gets a file
    by its hash. A folder too small for that (a split with a nonzero fraction and no
    file) lends that split the training files whose hash points lie nearest to it;
    adding files may then move those back to training."""
    fr = check_fractions(fractions)
    n = len(files)
    if n < 3:
        raise DataError(
            f"Splitting audio by file needs at least 3 files (train, valid, test), found {n}. "
            f"Add recordings, or set data.split_by='time' to cut each file in time instead."
        )
    point = {p: (_name_point(p), str(p)) for p in files}
    chosen: dict[str, list[Path]] = {"train": [], "valid": [], "test": []}
    for p in files:
        u = point[p][0]
        chosen["valid" if u < fr[1] else "test" if u < fr[1] + fr[2] else "train"].append(p)
    if not chosen["train"]:  # every file hashed into valid or test: the highest trains
        donor = max(("valid", "test"), key=lambda k: len(chosen[k]))
        highest = max(chosen[donor], key=lambda p: point[p])
        chosen[donor].remove(highest)
        chosen["train"].append(highest)
    for name, fraction, edge in (("valid", fr[1], 0.0), ("test", fr[2], fr[1])):
        if fraction > 0 and not chosen[name] and len(chosen["train"]) > 1:
            nearest = min(chosen["train"], key=lambda p: (point[p][0] - edge, point[p][1]))
            chosen["train"].remove(nearest)
            chosen[name].append(nearest)
    return sorted(chosen[check_split(split)])


def decode_file(path: Path, sample_rate: int) -> np.ndarray:
    """Decodes ``path`` to mono at ``sample_rate`` and mu-law encodes it (``uint8``)."""
    import soundfile as sf

    x, rate = sf.read(str(path), dtype="float32", always_2d=True)
    if x.shape[0] == 0:
        raise ValueError("the file holds no audio frames")
    mono = x.mean(axis=1)  # averaging keeps the level of in-phase stereo
    return mulaw_encode(resample(mono, rate, sample_rate))


def _cache_path(path: Path, sample_rate: int, cache_dir: Path) -> Path:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_mtime_ns}|{st.st_size}|{sample_rate}|{_CACHE_VERSION}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:20]
    return cache_dir / f"{path.stem}-{sample_rate}-{digest}.npy"


def encoded_audio(path: Path, sample_rate: int, cache_dir: Path | None) -> np.ndarray:
    """``decode_file`` through the cache (``cache_dir=None`` disables it).

    ``load_split`` reads ``data.cache_dir``: empty (the default) uses
    ``$SPARSE_LM_CACHE_DIR/audio`` or ``~/.cache/sparse_lm/audio``; ``'off'`` turns
    caching off.
    """
    if cache_dir is None:
        return decode_file(path, sample_rate)
    cached = _cache_path(path, sample_rate, cache_dir)
    if cached.is_file():
        try:
            return np.load(cached)
        except (OSError, ValueError):
            pass  # a damaged cache entry is rebuilt below
    data = decode_file(path, sample_rate)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, data)
        os.replace(tmp, cached)  # atomic: concurrent readers never see half a file
    except OSError as e:
        warnings.warn(f"Could not write the audio cache {cached} ({e}); continuing without it.", stacklevel=2)
    return data


def load_audio(
    path: str,
    split: str,
    seq_len: int,
    *,
    sample_rate: int = 12000,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    split_by: str = "file",
    cache_dir: str | os.PathLike[str] | None = "default",
) -> ByteSource:
    """The ``split`` of the recordings at ``path`` as mu-law byte clips.

    Unreadable files are skipped with an ``AudioReadWarning`` and listed in
    ``source.meta['skipped_files']``; if every file of the split is unreadable, a
    ``DataError`` is raised.
    """
    check_split(split)
    if split_by not in ("file", "time"):
        raise DataError(f"Unknown data.split_by {split_by!r}; use 'file' or 'time'.")
    if int(sample_rate) <= 0:
        raise DataError(f"data.sample_rate must be positive, got {sample_rate}.")
    cache = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)
    files = list_audio_files(path)
    chosen = split_files(files, fractions, split) if split_by == "file" else files
    segments, used, skipped = [], [], []
    for f in chosen:
        try:
            data = encoded_audio(f, int(sample_rate), cache)
        except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable"
            skipped.append((str(f), f"{type(e).__name__}: {e}"))
            warnings.warn(f"Skipping unreadable audio file {f}: {e}", AudioReadWarning, stacklevel=2)
            continue
        if split_by == "time":
            start, stop = contiguous_bounds(data.size, fractions, split)
            data = data[start:stop]
        segments.append(data)
        used.append(str(f))
    if not segments:
        reasons = "; ".join(f"{p}: {r}" for p, r in skipped[:3])
        raise DataError(
            f"None of the {len(chosen)} audio files of the {split} split at {path} could be "
            f"decoded ({reasons}{'; ...' if len(skipped) > 3 else ''}). Check that they are "
            f"valid WAV/FLAC/OGG files and that libsndfile supports their format."
        )
    return ByteSource(
        np.concatenate(segments),
        seq_len,
        segment_lengths=[s.size for s in segments],
        name=f"audio ({path})",
        meta={"files": used, "skipped_files": skipped, "sample_rate": int(sample_rate)},
    )
