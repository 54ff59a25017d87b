"""enwik8: the first 10^8 bytes of an English Wikipedia XML dump (Hutter Prize).

Standard split: first 90M bytes train, next 5M valid, last 5M test; any other length
(such as the 1 MB sample) is cut with the same 90/5/5 fractions.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from sparse_lm.data.download import download
from sparse_lm.data.errors import DataError
from sparse_lm.data.source import ByteSource
from sparse_lm.data.splits import DEFAULT_FRACTIONS, contiguous_bounds

URL = "http://mattmahoney.net/dc/enwik8.zip"
# No cryptographic digest of the official zip could be confirmed from a trustworthy
# source while writing this, so none is hard-coded. What is documented (the Hutter Prize
# page; the Hugging Face enwik8 dataset card's download_size) are the sizes: the zip is
# 36,445,475 bytes and its member `enwik8` exactly 100,000,000 bytes. Both are checked
# after a download; a user who knows the digest can pass data.download_sha256 as well.
ZIP_SIZE = 36_445_475
UNZIPPED_SIZE = 100_000_000


def _read_zip(path: Path) -> np.ndarray:
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            member = "enwik8" if "enwik8" in names else (names[0] if len(names) == 1 else None)
            if member is None:
                raise DataError(
                    f"The zip archive {path} holds {len(names)} files and none named 'enwik8'; "
                    f"point data.path at the official enwik8.zip or at the unzipped enwik8 file."
                )
            return np.frombuffer(zf.read(member), dtype=np.uint8)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(
            f"Cannot read the zip archive {path} ({e}); it is damaged or not a zip file. "
            f"Delete it and download it again (data.download=True), or unzip a good copy "
            f"and point data.path at the enwik8 file."
        ) from e


def _locate(path: Path, want_download: bool, sha256: str | None) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for name in ("enwik8", "enwik8.zip"):
            if (path / name).is_file():
                return path / name
    if want_download:
        zip_path = path if path.suffix == ".zip" else path / "enwik8.zip"
        # One process downloads while the others wait: hosts often share a filesystem,
        # and several writers of one .part file would corrupt it.
        import jax
        from jax.experimental import multihost_utils

        failure = None
        if jax.process_index() == 0:
            try:
                download(URL, zip_path, expected_size=ZIP_SIZE, sha256=sha256)
            except Exception as e:  # noqa: BLE001 - the other hosts must hear of it, not wait forever
                failure = e
        if jax.process_count() > 1:
            # Process 0's outcome to every host; also the barrier after the download.
            ok = int(multihost_utils.broadcast_one_to_all(np.int32(failure is None)))
            if failure is not None:
                raise failure
            if not ok:
                raise DataError(
                    f"process 0 could not download enwik8 to {zip_path} (its log says why); fix "
                    "that, or download the file once and point data.path at it."
                )
            if not zip_path.is_file():
                raise DataError(
                    f"process 0 downloaded enwik8 to {zip_path}, which this host cannot see; "
                    "put data.path on a filesystem every host shares, or copy the file to "
                    "each host first."
                )
        elif failure is not None:
            raise failure
        data = _read_zip(zip_path)
        if data.size != UNZIPPED_SIZE:
            raise DataError(
                f"The downloaded {zip_path} unzips to {data.size:,} bytes, not the "
                f"{UNZIPPED_SIZE:,} bytes of enwik8. Delete it and download it again."
            )
        return zip_path
    raise DataError(
        f"enwik8 was not found at {path} (looked for the file itself, or for 'enwik8' or "
        f"'enwik8.zip' inside that folder). Set data.path to the file or its folder, or set "
        f"data.download=True to fetch {URL}."
    )


def load_enwik8(
    path: str,
    split: str,
    seq_len: int,
    *,
    download_ok: bool = False,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    sha256: str | None = None,
) -> ByteSource:
    """The ``split`` of enwik8 at ``path`` (the file, its zip, or a folder holding either)."""
    found = _locate(Path(path).expanduser(), download_ok, sha256)
    if found.suffix == ".zip" or zipfile.is_zipfile(found):
        data = _read_zip(found)
    else:
        # A memmap keeps the 100 MB corpus out of memory until examples are read.
        data = np.memmap(found, dtype=np.uint8, mode="r") if found.stat().st_size else np.zeros(0, np.uint8)
    start, stop = contiguous_bounds(data.size, fractions, split)
    return ByteSource(data[start:stop], seq_len, name=f"enwik8 ({found.name})")
