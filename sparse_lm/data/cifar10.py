"""CIFAR-10 as bytes: each 32x32 RGB image is 3,072 bytes in raster order (row, column, channel).

Two readers give the same arrays: the official binary release (``cifar-10-binary.tar.gz``
or its unpacked ``cifar-10-batches-bin/``), and TFDS ``cifar10`` from a data directory.

Splits: ``test`` is the official test set. CIFAR-10 has no validation set, so ``valid``
is the *last* ``valid_size`` images of the training data (the end of data_batch_5 in the
official order) and ``train`` is the rest; they never overlap. ``valid_size=None``
holds out min(5000, n // 10) images, i.e. 5,000 of the official 50,000; ``valid_size=0``
makes ``valid`` the test set (for runs that report test figures only).
"""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

import numpy as np

from sparse_lm.data.errors import DataError
from sparse_lm.data.source import ByteSource

HEIGHT, WIDTH, CHANNELS = 32, 32, 3
IMAGE_SHAPE = (HEIGHT, WIDTH, CHANNELS)
IMAGE_BYTES = HEIGHT * WIDTH * CHANNELS
RECORD_BYTES = 1 + IMAGE_BYTES  # one label byte, then the R, G and B planes
ARCHIVE = "cifar-10-binary.tar.gz"
FOLDER = "cifar-10-batches-bin"


def decode_records(raw: bytes | np.ndarray, origin: str = "CIFAR-10 file") -> tuple[np.ndarray, np.ndarray]:
    """Binary records to ``(images uint8 [n, 3072] raster order, labels uint8 [n])``."""
    flat = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, bytes) else np.asarray(raw, np.uint8)
    if flat.size % RECORD_BYTES:
        raise DataError(
            f"{origin} holds {flat.size:,} bytes, not a whole number of {RECORD_BYTES}-byte "
            f"CIFAR-10 records; it is truncated or not a CIFAR-10 binary batch. Replace it with "
            f"a good copy of the official binary release."
        )
    records = flat.reshape(-1, RECORD_BYTES)
    # The file stores planes (channel, row, column); the model reads (row, column, channel).
    planes = records[:, 1:].reshape(-1, CHANNELS, HEIGHT, WIDTH)
    images = np.ascontiguousarray(planes.transpose(0, 2, 3, 1)).reshape(-1, IMAGE_BYTES)
    return images, records[:, 0].copy()


def _batch_order(name: str) -> tuple[int, str]:
    m = re.search(r"data_batch_(\d+)", name)
    return (int(m.group(1)) if m else 0, name)


def _read_folder(folder: Path) -> dict[str, list[tuple[str, bytes]]]:
    train = sorted(folder.glob("data_batch_*.bin"), key=lambda p: _batch_order(p.name))
    test = sorted(folder.glob("test_batch*.bin"))
    return {
        "train": [(str(p), p.read_bytes()) for p in train],
        "test": [(str(p), p.read_bytes()) for p in test],
    }


def _read_archive(archive: Path) -> dict[str, list[tuple[str, bytes]]]:
    out: dict[str, list[tuple[str, bytes]]] = {"train": [], "test": []}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar.getmembers():
                base = Path(member.name).name
                key = "train" if base.startswith("data_batch_") else "test" if base.startswith("test_batch") else None
                if key and member.isfile() and base.endswith(".bin"):
                    f = tar.extractfile(member)
                    assert f is not None
                    out[key].append((f"{archive}:{member.name}", f.read()))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(
            f"Cannot read the CIFAR-10 archive {archive} ({e}); it is damaged or not a tar "
            f"archive. Download {ARCHIVE} again, or unpack a good copy and point data.path at "
            f"its {FOLDER}/ folder."
        ) from e
    out["train"].sort(key=lambda item: _batch_order(item[0]))
    return out


def _locate_binary(path: Path) -> dict[str, list[tuple[str, bytes]]]:
    candidates = [path, path / FOLDER, path / ARCHIVE]
    for c in candidates:
        if c.is_dir() and any(c.glob("data_batch_*.bin")):
            return _read_folder(c)
        if c.is_file() and (c.name.endswith((".tar.gz", ".tgz", ".tar"))):
            return _read_archive(c)
    raise DataError(
        f"CIFAR-10 (binary version) was not found at {path}: expected the folder {FOLDER}/ "
        f"(holding data_batch_*.bin and test_batch.bin), a folder containing it, or the "
        f"archive {ARCHIVE}. Download the binary version from "
        f"https://www.cs.toronto.edu/~kriz/cifar.html and set data.path, or use "
        f"data.cifar_source='tfds'."
    )


def load_binary(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{'train': (images, labels), 'test': (images, labels)}`` from the binary release."""
    files = _locate_binary(Path(path).expanduser())
    out = {}
    for key, items in files.items():
        if not items:
            raise DataError(
                f"The CIFAR-10 data at {path} has no {'data_batch_*' if key == 'train' else 'test_batch'} "
                f"file. Unpack the complete binary release ({ARCHIVE}) there."
            )
        decoded = [decode_records(raw, name) for name, raw in items]
        out[key] = (np.concatenate([d[0] for d in decoded]), np.concatenate([d[1] for d in decoded]))
    return out


def load_tfds(data_dir: str | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The same arrays from a prepared TFDS ``cifar10`` in ``data_dir`` (no download)."""
    from sparse_lm.data.cifar10_tfds import read_tfds_cifar10

    return read_tfds_cifar10(data_dir)


def split_arrays(
    data: dict[str, tuple[np.ndarray, np.ndarray]], split: str, valid_size: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Carves ``valid`` from the end of the training data (see the module docstring)."""
    train_x, train_y = data["train"]
    n = len(train_x)
    held = min(5000, n // 10) if valid_size is None else int(valid_size)
    if held < 0 or held >= n:
        raise DataError(
            f"data.valid_size={valid_size} must be at least 0 and below the {n:,} training "
            f"images; set it smaller (0 uses the test set for validation)."
        )
    if split == "test" or (split == "valid" and held == 0):
        return data["test"]
    if split == "valid":
        return train_x[n - held :], train_y[n - held :]
    return train_x[: n - held], train_y[: n - held]


def load_cifar10(
    path: str | None,
    split: str,
    seq_len: int,
    *,
    source: str = "binary",
    tfds_data_dir: str | None = None,
    valid_size: int | None = None,
) -> ByteSource:
    """The ``split`` of CIFAR-10 as one 3,072-byte example per image (labels in ``meta``)."""
    if int(seq_len) != IMAGE_BYTES:
        raise DataError(
            f"CIFAR-10 examples are whole images of {IMAGE_BYTES} bytes (32x32x3), but "
            f"data.seq_len={seq_len}; set data.seq_len={IMAGE_BYTES}."
        )
    if source == "binary":
        if not path:
            raise DataError("data.path is empty; set it to the CIFAR-10 binary folder or archive.")
        data = load_binary(path)
    elif source == "tfds":
        data = load_tfds(tfds_data_dir or path)
    else:
        raise DataError(f"Unknown data.cifar_source {source!r}; use 'binary' or 'tfds'.")
    images, labels = split_arrays(data, split, valid_size)
    return ByteSource(
        images.reshape(-1),
        IMAGE_BYTES,
        segment_lengths=np.full(len(images), IMAGE_BYTES),
        name=f"cifar10 ({source})",
        meta={"labels": labels, "image_shape": IMAGE_SHAPE},
    )
