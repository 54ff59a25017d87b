"""Downloading a file once, atomically, and verifying what arrived."""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from sparse_lm.data.errors import DataError

_CHUNK = 1 << 20


def fetch(url: str, dest: str | os.PathLike[str], *, timeout: float = 60.0) -> None:
    """Copies ``url`` (http, https or file) to ``dest`` byte for byte.

    Kept separate from ``download`` so tests can replace the transport alone.
    """
    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, _CHUNK)


def file_digest(path: str | os.PathLike[str], algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def download(
    url: str,
    dest: str | os.PathLike[str],
    *,
    expected_size: int | None = None,
    sha256: str | None = None,
    md5: str | None = None,
) -> Path:
    """Downloads ``url`` to ``dest`` unless it is already there; verifies size and digests.

    The data lands in ``dest + '.part'`` and is renamed only after every check passed,
    so an interrupted or corrupt download never looks like a finished one.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        fetch(url, part)
    except (urllib.error.URLError, OSError) as e:
        part.unlink(missing_ok=True)
        raise DataError(
            f"Could not download {url} to {dest}: {e}. Check the network connection, or "
            f"download the file by hand and place it at {dest}."
        ) from e
    problems = []
    size = part.stat().st_size
    if expected_size is not None and size != expected_size:
        problems.append(f"size {size:,} bytes, expected {expected_size:,}")
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected and file_digest(part, algorithm) != expected.lower():
            problems.append(f"{algorithm} mismatch (expected {expected})")
    if problems:
        part.unlink(missing_ok=True)
        raise DataError(
            f"The file downloaded from {url} failed verification ({'; '.join(problems)}) and "
            f"was deleted. Retry the download; if it fails again, the server copy may have "
            f"changed: download it by hand, check it, and place it at {dest}."
        )
    os.replace(part, dest)
    return dest
