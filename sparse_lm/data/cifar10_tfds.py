"""Reading a prepared TFDS ``cifar10`` from a data directory, never downloading.

TFDS stores data either as ArrayRecord (readable without TensorFlow through
``tfds.data_source``) or as TFRecord (needs TensorFlow). Both are tried, in that order.
Images are returned in the official order (TFDS shuffles records when it writes them,
but keeps the original index in ``id``, e.g. ``train_00042``), so ``valid`` holds the
same images whichever reader is used.
"""

from __future__ import annotations

import os
import re

import numpy as np

from sparse_lm.data.errors import DataError

_IMAGE_BYTES = 32 * 32 * 3


def _fix_hint(data_dir: str | None) -> str:
    return (
        f"Prepare it once on a machine with TensorFlow and internet access with "
        f"`tfds.builder('cifar10', data_dir={data_dir!r}, file_format='array_record')"
        f".download_and_prepare()` (ArrayRecord can then be read without TensorFlow), or use "
        f"data.cifar_source='binary' with the official binary release."
    )


def _order(ids: list[str]) -> np.ndarray:
    keys = []
    for i, s in enumerate(ids):
        m = re.search(r"(\d+)$", s.decode() if isinstance(s, bytes) else str(s))
        keys.append(int(m.group(1)) if m else i)
    return np.argsort(np.asarray(keys), kind="stable")


def _pack(images: np.ndarray, labels: np.ndarray, ids: list[str] | None) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images, dtype=np.uint8).reshape(len(images), _IMAGE_BYTES)
    labels = np.asarray(labels).astype(np.uint8)
    if ids is not None and len(ids) == len(images):
        order = _order(ids)
        images, labels = images[order], labels[order]
    return images, labels


def _read_array_record(tfds, data_dir: str | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    ds = tfds.data_source("cifar10", split=split, data_dir=data_dir, download=False)
    records = [ds[i] for i in range(len(ds))]
    ids = [r["id"] for r in records] if records and "id" in records[0] else None
    return _pack(np.stack([r["image"] for r in records]), np.array([r["label"] for r in records]), ids)


def _read_tfrecord(tfds, data_dir: str | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    ds = tfds.as_numpy(tfds.load("cifar10", split=split, data_dir=data_dir, download=False, batch_size=-1))
    ids = list(ds["id"]) if "id" in ds else None
    return _pack(ds["image"], ds["label"], ids)


def read_tfds_cifar10(data_dir: str | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{'train': (images [n, 3072], labels), 'test': ...}`` from ``data_dir``."""
    if data_dir is not None:
        data_dir = os.path.expanduser(str(data_dir))
        if not os.path.isdir(os.path.join(data_dir, "cifar10")):
            raise DataError(
                f"No TFDS 'cifar10' data set was found in the TFDS data directory {data_dir} "
                f"(expected a 'cifar10/' folder there). Set data.tfds_data_dir to the folder "
                f"that holds it. {_fix_hint(data_dir)}"
            )
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(
            f"data.cifar_source='tfds' needs the tensorflow-datasets package, which cannot be "
            f"imported ({e}). Install it (see requirements.txt) or use data.cifar_source='binary'."
        ) from e
    errors = []
    for reader in (_read_array_record, _read_tfrecord):
        try:
            return {split: reader(tfds, data_dir, split) for split in ("train", "test")}
        except Exception as e:  # noqa: BLE001 - each reader fails differently; report them all
            errors.append(f"{reader.__name__.strip('_')}: {type(e).__name__}: {e}")
    raise DataError(
        f"Could not read TFDS 'cifar10' from data directory {data_dir} ("
        + "; ".join(errors)
        + f"). A ModuleNotFoundError means this environment lacks a package that TFDS needs "
        f"(TensorFlow, for data prepared as TFRecord rather than ArrayRecord). {_fix_hint(data_dir)}"
    )
