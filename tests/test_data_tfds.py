"""``data.cifar_source='tfds'`` reads a real TFDS ``cifar10`` data directory, without TensorFlow.

Each run writes a small ``cifar10`` (ArrayRecord, the format that needs no TensorFlow) into a
temporary TFDS data directory, from the first images of the real sample batches, with TFDS's own
catalog builder: its ``_info`` (features ``id``/``image``/``label``, version 3.0.2), its ids
(``train_00000``...) and its record shuffling. Only two things differ from
``tfds.builder('cifar10').download_and_prepare()``: the binary files are read from the sample
folder rather than downloaded, and the images go to TFDS as PIL images, so PIL encodes the PNGs
(TFDS would use ``tf.image.encode_png``; PNG is lossless, so the pixels are the same).
The reader is then checked image by image against the binary reader on the same files.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np
import pytest
# Plain imports, not importorskip: both are pinned in requirements.txt, and this must not skip in CI.
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.image_classification import cifar as tfds_cifar

from sparse_lm.data import DataError, load_split

N_TRAIN, N_TEST, VALID = 24, 8, 6
RECORD = 1 + 32 * 32 * 3


def cfg(**fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(name="cifar10", seq_len=3072, valid_size=VALID, **fields))


class _SampleCifar10(tfds_cifar.Cifar10, skip_registration=True):
    """The catalog's ``cifar10`` builder, fed from a local ``cifar-10-batches-bin/``."""

    name = "cifar10"  # same folder and dataset name as the catalog's builder

    def __init__(self, *, source: Path, **kwargs):
        self._source = source
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        names = (self._source / "batches.meta.txt").read_text().split("\n")
        self.info.features["label"].names = [n for n in names if n]
        return {
            "train": self._generate_examples("train_", [self._source / "data_batch_1.bin"]),
            "test": self._generate_examples("test_", [self._source / "test_batch.bin"]),
        }

    def _generate_examples(self, split_prefix, filepaths):
        # As the catalog's, whose file reading (tf.io.gfile) needs TensorFlow.
        index = 0
        for path in filepaths:
            records = np.frombuffer(Path(path).read_bytes(), dtype=np.uint8).reshape(-1, RECORD)
            for rec in records:
                image = rec[1:].reshape(3, 32, 32).transpose(1, 2, 0)
                yield index, {"id": f"{split_prefix}{index:05d}", "image": Image.fromarray(image), "label": int(rec[0])}
                index += 1


@pytest.fixture(scope="module")
def sample(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(binary folder, TFDS data dir)`` holding the same first images of the sample."""
    src = shared_data / "cifar10-sample" / "cifar-10-batches-bin"
    root = tmp_path_factory.mktemp("cifar_tfds")
    binary = root / "cifar-10-batches-bin"
    binary.mkdir()
    (binary / "batches.meta.txt").write_bytes((src / "batches.meta.txt").read_bytes())
    for name, n in (("data_batch_1.bin", N_TRAIN), ("test_batch.bin", N_TEST)):
        with open(src / name, "rb") as f:
            (binary / name).write_bytes(f.read(n * RECORD))
    data_dir = root / "tfds"
    builder = _SampleCifar10(source=binary, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return binary, data_dir


def test_written_like_the_catalog_cifar10(sample):
    _, data_dir = sample
    version_dir = data_dir / "cifar10" / "3.0.2"
    assert sorted(p.name for p in version_dir.glob("*.array_record-*")) == [
        "cifar10-test.array_record-00000-of-00001",
        "cifar10-train.array_record-00000-of-00001",
    ]
    # Reading resolves "cifar10" to TFDS's own catalog builder, not the test's.
    builder = tfds.builder("cifar10", data_dir=str(data_dir))
    assert type(builder) is tfds_cifar.Cifar10
    assert builder.info.splits["train"].num_examples == N_TRAIN
    assert builder.info.features["label"].names[:2] == ["airplane", "automobile"]
    # TFDS shuffled the records on writing, so the reader's reordering by ``id`` is exercised.
    ds = tfds.data_source("cifar10", split="train", data_dir=str(data_dir), download=False)
    stored = [ds[i]["id"].decode() for i in range(len(ds))]
    assert sorted(stored) == [f"train_{i:05d}" for i in range(N_TRAIN)]
    assert stored != sorted(stored)


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_tfds_matches_the_binary_reader(sample, split):
    binary, data_dir = sample
    from_bin = load_split(cfg(path=str(binary)), split)
    from_tfds = load_split(cfg(cifar_source="tfds", tfds_data_dir=str(data_dir)), split)
    n = {"train": N_TRAIN - VALID, "valid": VALID, "test": N_TEST}[split]
    assert len(from_tfds) == len(from_bin) == n
    assert from_tfds.buffer.dtype == np.uint8 and from_tfds.num_bytes == n * 3072
    assert np.array_equal(from_tfds.buffer, from_bin.buffer)
    assert np.array_equal(from_tfds.meta["labels"], from_bin.meta["labels"])
    assert from_tfds.meta["labels"].dtype == from_bin.meta["labels"].dtype == np.uint8
    assert len(set(from_tfds.meta["labels"].tolist())) > 1  # real, varied labels


def test_tfds_pixels_are_raster_order_of_the_file(sample):
    # Independent of the binary reader: pixel (row 2, col 7, green) of the first test image.
    binary, data_dir = sample
    raw = (binary / "test_batch.bin").read_bytes()
    first = load_split(cfg(cifar_source="tfds", tfds_data_dir=str(data_dir)), "test")[0]
    assert first[3 * (2 * 32 + 7) + 1] == raw[1 + 1 * 1024 + 2 * 32 + 7]
    assert first.reshape(32, 32, 3)[31, 31, 2] == raw[3072]


def test_tfds_data_path_is_used_when_tfds_data_dir_is_empty(sample):
    _, data_dir = sample
    a = load_split(cfg(cifar_source="tfds", path=str(data_dir), tfds_data_dir=""), "test")
    b = load_split(cfg(cifar_source="tfds", tfds_data_dir=str(data_dir)), "test")
    assert np.array_equal(a.buffer, b.buffer)


def test_tfds_unreadable_data_reports_both_readers(sample, tmp_path: Path):
    # A cifar10/ folder whose records are gone: both readers fail and the error says why.
    _, data_dir = sample
    broken = tmp_path / "cifar10" / "3.0.2"
    broken.mkdir(parents=True)
    for name in ("dataset_info.json", "features.json"):
        (broken / name).write_bytes((data_dir / "cifar10" / "3.0.2" / name).read_bytes())
    with pytest.raises(DataError, match=r"read_array_record: .*read_tfrecord: .*download_and_prepare"):
        load_split(cfg(cifar_source="tfds", tfds_data_dir=str(tmp_path)), "test")


def test_tfds_tfrecord_data_without_tensorflow_is_refused_clearly(sample, tmp_path: Path):
    # Data prepared in TFDS's default TFRecord format: the ArrayRecord reader names the format,
    # and the TFRecord reader needs TensorFlow (not installed here). The records are ArrayRecord
    # bytes under TFRecord names, so with TensorFlow installed the second reader fails too.
    import json
    import shutil

    _, data_dir = sample
    version_dir = tmp_path / "cifar10" / "3.0.2"
    shutil.copytree(data_dir / "cifar10" / "3.0.2", version_dir)
    info_file = version_dir / "dataset_info.json"
    info = json.loads(info_file.read_text())
    assert info["fileFormat"] == "array_record"
    info["fileFormat"] = "tfrecord"
    info_file.write_text(json.dumps(info))
    for f in version_dir.glob("*.array_record-*"):
        f.rename(f.with_name(f.name.replace("array_record", "tfrecord")))
    with pytest.raises(DataError, match=r"(?s)read_array_record: .*TFRECORD.*read_tfrecord: .*download_and_prepare"):
        load_split(cfg(cifar_source="tfds", tfds_data_dir=str(tmp_path)), "test")
