"""Each data source yields the right bytes from the real samples; bad input is refused clearly."""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import zipfile
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from sparse_lm.data import DataError, load_split
from sparse_lm.data import cifar10, enwik8
from sparse_lm.data.download import download
from sparse_lm.data.splits import contiguous_bounds

ENWIK8_SAMPLE_BYTES = 1_071_051


def cfg(**fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(fields)


@pytest.fixture(scope="module")
def enwik8_file(shared_data: Path) -> Path:
    return shared_data / "text" / "enwik8_first_1MB.xml"


@pytest.fixture(scope="module")
def cifar_dir(shared_data: Path) -> Path:
    return shared_data / "cifar10-sample" / "cifar-10-batches-bin"


# ---------------------------------------------------------------- enwik8


def test_enwik8_standard_split_of_the_full_file():
    n = 100_000_000
    assert contiguous_bounds(n, (0.9, 0.05, 0.05), "train") == (0, 90_000_000)
    assert contiguous_bounds(n, (0.9, 0.05, 0.05), "valid") == (90_000_000, 95_000_000)
    assert contiguous_bounds(n, (0.9, 0.05, 0.05), "test") == (95_000_000, 100_000_000)


def test_enwik8_sample_splits(enwik8_file: Path):
    raw = enwik8_file.read_bytes()
    assert len(raw) == ENWIK8_SAMPLE_BYTES
    splits = {s: load_split(cfg(name="enwik8", path=str(enwik8_file), seq_len=1000), s) for s in ("train", "valid", "test")}
    # 90/5/5 of 1,071,051 bytes, rounded; test takes the remainder.
    assert [splits[s].num_bytes for s in ("train", "valid", "test")] == [963_946, 53_553, 53_552]
    assert bytes(splits["train"][0][:10]) == b"<mediawiki"
    # Non-overlapping windows, in order, that never cross into the next split.
    assert len(splits["train"]) == 963
    assert bytes(splits["train"][1]) == raw[1000:2000]
    assert bytes(splits["valid"][0]) == raw[963_946 : 963_946 + 1000]
    assert bytes(splits["test"][len(splits["test"]) - 1]) == raw[963_946 + 53_553 + 52_000 : 963_946 + 53_553 + 53_000]
    assert splits["train"][0].dtype == np.uint8 and splits["train"][0].shape == (1000,)


def test_enwik8_reads_folder_and_zip_alike(enwik8_file: Path, tmp_path: Path):
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(enwik8_file, folder / "enwik8")
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    with zipfile.ZipFile(zipped / "enwik8.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(enwik8_file, "enwik8")
    ref = load_split(cfg(name="enwik8", path=str(enwik8_file), seq_len=4096), "valid")
    for path in (folder, zipped, zipped / "enwik8.zip"):
        src = load_split(cfg(name="enwik8", path=str(path), seq_len=4096), "valid")
        assert src.num_bytes == ref.num_bytes
        assert np.array_equal(src.get_batch(range(len(src))), ref.get_batch(range(len(ref))))


def test_enwik8_download_verifies_and_installs(enwik8_file: Path, tmp_path: Path, monkeypatch):
    # No network here: serve a zip of the sample through a file:// URL and scale the
    # expected sizes down to it.
    served = tmp_path / "served.zip"
    with zipfile.ZipFile(served, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(enwik8_file, "enwik8")
    monkeypatch.setattr(enwik8, "URL", served.as_uri())
    monkeypatch.setattr(enwik8, "ZIP_SIZE", served.stat().st_size)
    monkeypatch.setattr(enwik8, "UNZIPPED_SIZE", ENWIK8_SAMPLE_BYTES)
    target = tmp_path / "data"
    src = load_split(cfg(name="enwik8", path=str(target), seq_len=1000, download=True), "train")
    assert (target / "enwik8.zip").is_file() and not (target / "enwik8.zip.part").exists()
    assert bytes(src[0][:10]) == b"<mediawiki"

    # A download of the wrong size is rejected and leaves nothing behind.
    monkeypatch.setattr(enwik8, "ZIP_SIZE", served.stat().st_size + 1)
    other = tmp_path / "other"
    with pytest.raises(DataError, match="failed verification"):
        load_split(cfg(name="enwik8", path=str(other), seq_len=1000, download=True), "train")
    assert not any(other.iterdir())


def test_a_failed_download_on_process_0_stops_every_host_instead_of_hanging(tmp_path: Path, monkeypatch):
    """Multi-host: process 0 downloads, the others wait for it. If its download fails,
    every host must stop with an error; process 0 tells them before raising its own."""
    import jax
    from jax.experimental import multihost_utils

    told = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: told.append(int(x)) or x)

    def failing_download(*args, **kwargs):
        raise DataError("Could not download https://example.invalid/enwik8.zip")

    monkeypatch.setattr(enwik8, "download", failing_download)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    with pytest.raises(DataError, match="Could not download"):
        enwik8._locate(tmp_path / "enwik8.zip", True, None)
    assert told == [0]  # the others heard of the failure before process 0 raised
    monkeypatch.setattr(jax, "process_index", lambda: 1)  # a host that waited for it
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: np.int32(0))
    with pytest.raises(DataError, match="process 0 could not download enwik8"):
        enwik8._locate(tmp_path / "enwik8.zip", True, None)


def test_download_checks_digests(enwik8_file: Path, tmp_path: Path):
    url = enwik8_file.as_uri()
    good = hashlib.sha256(enwik8_file.read_bytes()).hexdigest()
    assert download(url, tmp_path / "a", sha256=good, expected_size=ENWIK8_SAMPLE_BYTES).read_bytes()[:10] == b"<mediawiki"
    with pytest.raises(DataError, match="sha256 mismatch"):
        download(url, tmp_path / "b", sha256="0" * 64)
    assert not (tmp_path / "b").exists()
    with pytest.raises(DataError, match="Could not download"):
        download((tmp_path / "absent").as_uri(), tmp_path / "c")


# ---------------------------------------------------------------- text, pystdlib


def test_text_files_are_concatenated_in_order(shared_data: Path):
    text = shared_data / "text"
    files = [str(text / "tinyshakespeare.txt"), str(text / "wikitext2_valid.txt")]
    raw = b"".join(Path(f).read_bytes() for f in files)
    by_list = {s: load_split(cfg(name="text", files=files, seq_len=512), s) for s in ("train", "valid", "test")}
    assert sum(s.num_bytes for s in by_list.values()) == len(raw)
    assert bytes(by_list["train"][0]) == raw[:512]
    assert bytes(by_list["test"][0]) == raw[len(raw) - by_list["test"].num_bytes :][:512]
    # A glob relative to data.path gives the same corpus (matches sorted: t < w).
    by_glob = load_split(cfg(name="text", path=str(text), files=["[tw]*.txt"], seq_len=512), "train")
    assert by_glob.num_bytes == by_list["train"].num_bytes
    assert np.array_equal(by_glob[5], by_list["train"][5])


def test_pystdlib_is_real_python_capped_and_split():
    srcs = {s: load_split(cfg(name="pystdlib", seq_len=256, max_bytes=200_000), s) for s in ("train", "valid", "test")}
    assert sum(s.num_bytes for s in srcs.values()) == 200_000
    assert srcs["train"].num_bytes == 180_000
    text = bytes(srcs["train"].get_batch(range(len(srcs["train"])))).decode("utf-8", "replace")
    assert "def " in text and "import " in text
    # max_bytes=0 (the base config's value) means the default cap, not an empty corpus.
    default = load_split(cfg(name="pystdlib", seq_len=256, max_bytes=0), "valid")
    assert default.num_bytes == round(0.05 * 8 * 1024 * 1024)


# ---------------------------------------------------------------- CIFAR-10


def test_cifar_first_record_label_and_pixels(cifar_dir: Path):
    raw = (cifar_dir / "data_batch_1.bin").read_bytes()
    src = load_split(cfg(name="cifar10", path=str(cifar_dir.parent), seq_len=3072, valid_size=500), "train")
    image = src[0].reshape(32, 32, 3)
    assert src.meta["labels"][0] == raw[0] == 6  # CIFAR-10's first training image is a frog
    planes = np.frombuffer(raw[1:3073], dtype=np.uint8).reshape(3, 32, 32)
    for row, col in [(0, 0), (0, 1), (5, 17), (31, 31)]:
        for ch in range(3):
            # Pixel (row, col) of channel ch sits at 1 + ch*1024 + row*32 + col in the record.
            assert image[row, col, ch] == raw[1 + ch * 1024 + row * 32 + col] == planes[ch, row, col]
    # Raster order: byte 3 * (row * 32 + col) + ch.
    assert src[0][3 * (2 * 32 + 7) + 1] == planes[1, 2, 7]


def test_cifar_splits(cifar_dir: Path):
    c = dict(name="cifar10", path=str(cifar_dir), seq_len=3072, valid_size=500)
    train, valid, test = (load_split(cfg(**c), s) for s in ("train", "valid", "test"))
    assert (len(train), len(valid), len(test)) == (3000, 500, 500)
    assert train.num_bytes == 3000 * 3072
    raw = (cifar_dir / "data_batch_1.bin").read_bytes()
    last = np.frombuffer(raw[-3072:], dtype=np.uint8).reshape(3, 32, 32).transpose(1, 2, 0).reshape(-1)
    assert np.array_equal(valid[499], last)  # valid = the end of the training batches
    test_raw = (cifar_dir / "test_batch.bin").read_bytes()
    assert test.meta["labels"][0] == test_raw[0]
    # Default hold-out: min(5000, n // 10).
    assert len(load_split(cfg(name="cifar10", path=str(cifar_dir), seq_len=3072), "valid")) == 350


def test_cifar_reads_the_official_archive_layout(cifar_dir: Path, tmp_path: Path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cifar_dir, arcname="cifar-10-batches-bin")
    from_tar = load_split(cfg(name="cifar10", path=str(tmp_path), seq_len=3072, valid_size=100), "valid")
    from_dir = load_split(cfg(name="cifar10", path=str(cifar_dir), seq_len=3072, valid_size=100), "valid")
    assert np.array_equal(from_tar.buffer, from_dir.buffer)
    assert np.array_equal(from_tar.meta["labels"], from_dir.meta["labels"])


def test_cifar_tfds_missing_dir_says_how_to_fix(tmp_path: Path):
    # A folder without a prepared data set: the refusal names it and how to prepare it.
    # Reading a prepared one is tested in tests/test_data_tfds.py.
    with pytest.raises(DataError, match=r"No TFDS 'cifar10'.*download_and_prepare"):
        load_split(cfg(name="cifar10", cifar_source="tfds", tfds_data_dir=str(tmp_path), seq_len=3072), "train")


def test_cifar_decode_matches_transpose():
    record = np.arange(3073, dtype=np.int64) % 251
    images, labels = cifar10.decode_records(record.astype(np.uint8).tobytes())
    assert labels[0] == 0
    assert np.array_equal(images[0], record[1:].reshape(3, 32, 32).transpose(1, 2, 0).reshape(-1))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "fields, pattern",
    [
        (dict(name="enwik9", path="x", seq_len=8), r"Unknown data set.*enwik8"),
        (dict(name="enwik8", path="/no/such/place", seq_len=8), r"not found at /no/such/place.*download=True"),
        (dict(name="enwik8", path="", seq_len=8), r"data.path is empty"),
        (dict(name="enwik8", path="/x", seq_len=0), r"seq_len must be a positive integer"),
        (dict(name="text", files=["/no/such/*.txt"], seq_len=8), r"No file matches"),
        (dict(name="cifar10", path="/no/such/place", seq_len=3072), r"CIFAR-10 \(binary version\) was not found"),
        (dict(name="pystdlib", seq_len=8, split_fractions=(0.9, 0.2, 0.1)), r"sum\s+to 1"),
    ],
)
def test_bad_config_errors(fields, pattern):
    with pytest.raises(DataError, match=pattern):
        load_split(cfg(**fields), "train")


def test_data_shorter_than_one_sequence(enwik8_file: Path):
    with pytest.raises(DataError, match="fewer than one sequence"):
        load_split(cfg(name="enwik8", path=str(enwik8_file), seq_len=60_000), "valid")
    with pytest.raises(DataError, match="seq_len=3072"):
        load_split(cfg(name="cifar10", path="/x", seq_len=1024), "train")


def test_unreadable_archives(tmp_path: Path):
    (tmp_path / "enwik8.zip").write_bytes(b"this is not a zip file at all")
    with pytest.raises(DataError, match="Cannot read the zip archive"):
        load_split(cfg(name="enwik8", path=str(tmp_path / "enwik8.zip"), seq_len=8), "train")
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(DataError, match="Cannot read the CIFAR-10 archive"):
        load_split(cfg(name="cifar10", path=str(tmp_path), seq_len=3072), "train")
    bad = tmp_path / "bin" / "cifar-10-batches-bin"
    bad.mkdir(parents=True)
    (bad / "data_batch_1.bin").write_bytes(b"\0" * 3074)
    (bad / "test_batch.bin").write_bytes(b"\0" * 3073)
    with pytest.raises(DataError, match="not a whole number"):
        load_split(cfg(name="cifar10", path=str(bad), seq_len=3072), "train")


def test_unknown_split(enwik8_file: Path):
    with pytest.raises(DataError, match="Unknown split"):
        load_split(cfg(name="enwik8", path=str(enwik8_file), seq_len=8), "validation")
