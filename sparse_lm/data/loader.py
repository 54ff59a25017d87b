"""``load_split``: the one entry point from a data config to a ``ByteSource``."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from sparse_lm.data.errors import DataError
from sparse_lm.data.source import ByteSource, require_examples
from sparse_lm.data.splits import DEFAULT_FRACTIONS, check_fractions, check_split

NAMES = ("enwik8", "cifar10", "audio", "text", "pystdlib")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    # ConfigDict and dict both have .get; a plain namespace falls back to getattr.
    getter = getattr(cfg, "get", None)
    value = getter(key, default) if callable(getter) else getattr(cfg, key, default)
    return default if value is None else value


def _path(cfg: Any, name: str) -> str:
    path = _get(cfg, "path", "")
    if not path:
        raise DataError(f"data.path is empty for data.name={name!r}; set it to where the data lives.")
    return os.path.expanduser(str(path))


def load_split(data_cfg: Any, split: str) -> ByteSource:
    """The ``split`` ('train', 'valid' or 'test') of the data set that ``data_cfg`` names.

    Fields read (all but ``name`` and ``seq_len`` optional where the source allows):
    ``name``, ``path``, ``seq_len``, ``download``, ``files``, ``split_fractions``,
    ``sample_rate``, ``split_by``, ``cache_dir``, ``cifar_source``, ``tfds_data_dir``,
    ``valid_size``, ``max_bytes``, ``download_sha256``.
    """
    check_split(split)
    name = _get(data_cfg, "name", "")
    if name not in NAMES:
        raise DataError(f"Unknown data set data.name={name!r}; use one of {', '.join(NAMES)}.")
    seq_len = _get(data_cfg, "seq_len", 0)
    # NumPy integers are fine; bools and floats are config mistakes.
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise DataError(f"data.seq_len must be a positive integer, got {seq_len!r}; set it in the config.")
    seq_len = int(seq_len)
    fractions = check_fractions(_get(data_cfg, "split_fractions", DEFAULT_FRACTIONS))
    hint = "Use a smaller data.seq_len or more data."

    if name == "enwik8":
        from sparse_lm.data.enwik8 import load_enwik8

        source = load_enwik8(
            _path(data_cfg, name), split, seq_len,
            download_ok=bool(_get(data_cfg, "download", False)), fractions=fractions,
            sha256=_get(data_cfg, "download_sha256"),
        )
    elif name == "text":
        from sparse_lm.data.text import load_text

        files = _get(data_cfg, "files") or _path(data_cfg, name)
        base = _get(data_cfg, "path") or None
        if isinstance(files, str) and files == base:
            base = None
        source = load_text(list(files) if not isinstance(files, str) else files, split, seq_len,
                           base=base, fractions=fractions)
    elif name == "pystdlib":
        from sparse_lm.data.text import DEFAULT_STDLIB_MAX_BYTES, load_pystdlib

        # 0 (the base config's value) means "the default cap", not "no bytes".
        max_bytes = int(_get(data_cfg, "max_bytes", 0)) or DEFAULT_STDLIB_MAX_BYTES
        source = load_pystdlib(split, seq_len, max_bytes=max_bytes, fractions=fractions)
    elif name == "cifar10":
        from sparse_lm.data.cifar10 import load_cifar10

        cifar_source = _get(data_cfg, "cifar_source", "binary")
        source = load_cifar10(
            _get(data_cfg, "path") or None, split, seq_len, source=cifar_source,
            tfds_data_dir=_get(data_cfg, "tfds_data_dir") or None, valid_size=_valid_size(data_cfg),
        )
        hint = "Check that the data set is complete."
    else:
        from sparse_lm.data.audio import load_audio

        source = load_audio(
            _path(data_cfg, name), split, seq_len, sample_rate=int(_get(data_cfg, "sample_rate", 12000)),
            fractions=fractions, split_by=_get(data_cfg, "split_by", "file"),
            cache_dir=_cache_dir(data_cfg),
        )
        hint = "Audio clips never span two files: use a smaller data.seq_len, longer recordings, or more files."
    return require_examples(source, split, hint)


def _valid_size(data_cfg: Any) -> int | None:
    # A negative value (the base config's -1) means the loader's default hold-out.
    size = _get(data_cfg, "valid_size")
    return None if size is None or int(size) < 0 else int(size)


def _cache_dir(data_cfg: Any) -> str | None:
    # '' (the base config's value) means the default cache folder; 'off' disables caching.
    value = _get(data_cfg, "cache_dir", "")
    if value == "off":
        return None
    return value or "default"
