"""Plain-text corpora: user files (a list or globs), and the Python standard library.

Both are read as raw bytes and concatenated into one contiguous stream that is cut
90/5/5 (configurable) into train/valid/test.
"""

from __future__ import annotations

import functools
import hashlib
import glob
import os
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sparse_lm.data.errors import DataError
from sparse_lm.data.source import ByteSource
from sparse_lm.data.splits import DEFAULT_FRACTIONS, contiguous_bounds

DEFAULT_STDLIB_MAX_BYTES = 8 * 1024 * 1024


def expand_files(patterns: Sequence[str] | str, base: str | None = None) -> list[Path]:
    """Files named by ``patterns`` (paths, folders or globs), in the order given.

    Each glob's matches are sorted so the corpus is the same on every machine; a folder
    stands for every file under it; a file named twice is read once.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    out: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if base and not os.path.isabs(pattern):
            pattern = os.path.join(base, pattern)
        if os.path.isdir(pattern):
            matches = sorted(str(p) for p in Path(pattern).rglob("*") if p.is_file())
        else:
            matches = sorted(m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m))
        if not matches:
            raise DataError(
                f"No file matches {pattern!r}. Check data.files (paths or globs such as "
                f"'corpus/*.txt') and data.path, which relative entries are joined to."
            )
        for m in matches:
            p = Path(m).resolve()
            if p not in seen:
                seen.add(p)
                out.append(p)
    return out


def _concat(files: Sequence[Path], max_bytes: int | None = None) -> np.ndarray:
    parts, total = [], 0
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as e:
            raise DataError(f"Cannot read {f}: {e}. Fix its permissions or remove it from data.files.") from e
        if max_bytes is not None and total + len(data) > max_bytes:
            data = data[: max_bytes - total]
        parts.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    return np.frombuffer(b"".join(parts), dtype=np.uint8)


def load_text(
    files: Sequence[str] | str,
    split: str,
    seq_len: int,
    *,
    base: str | None = None,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> ByteSource:
    """The ``split`` of the concatenation of ``files``."""
    paths = expand_files(files, base)
    data = _concat(paths)
    start, stop = contiguous_bounds(data.size, fractions, split)
    return ByteSource(data[start:stop], seq_len, name=f"text ({len(paths)} files)")


def stdlib_files() -> list[Path]:
    """The running Python's standard-library ``.py`` files, in a fixed pseudo-random order.

    Third-party packages are left out (they differ between installations and may not be
    freely redistributable text), so the corpus depends only on the Python version.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(
            f"The Python standard library was not found at {root}; this Python installation "
            f"ships no sources. Use data.name='text' with your own files instead."
        )
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)]
    # Ordered by a hash of the relative path, not alphabetically: the 90/5/5 cut of the
    # concatenation then gives every split a mix of all kinds of modules, so validation
    # text is like training text (alphabetical order would make valid one package).
    def key(p: Path) -> tuple[str, str]:
        rel = p.relative_to(root).as_posix()
        return hashlib.sha1(rel.encode()).hexdigest(), rel

    return sorted(files, key=key)


@functools.lru_cache(maxsize=2)
def _stdlib_corpus(max_bytes: int) -> np.ndarray:
    # Cached because train, valid and test are loaded one after another from the same bytes.
    data = _concat(stdlib_files(), max_bytes)
    data.setflags(write=False)
    return data


def load_pystdlib(
    split: str,
    seq_len: int,
    *,
    max_bytes: int = DEFAULT_STDLIB_MAX_BYTES,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> ByteSource:
    """The ``split`` of the standard library's sources, capped at ``max_bytes``."""
    data = _stdlib_corpus(int(max_bytes))
    start, stop = contiguous_bounds(data.size, fractions, split)
    return ByteSource(data[start:stop], seq_len, name="pystdlib")
