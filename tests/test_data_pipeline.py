"""Training order (epochs, shuffling, resume, host shards, flips) and evaluation cover."""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from sparse_lm.data import DataError, TrainIterator, eval_batches, load_split


def cfg(**fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(fields)


@pytest.fixture(scope="module")
def enwik8_valid(shared_data: Path):
    # 53,553 bytes in windows of 1,024: 52 examples and a 305-byte tail.
    return load_split(cfg(name="enwik8", path=str(shared_data / "text" / "enwik8_first_1MB.xml"), seq_len=1024), "valid")


@pytest.fixture(scope="module")
def cifar_train(shared_data: Path):
    return load_split(cfg(name="cifar10", path=str(shared_data / "cifar10-sample"), seq_len=3072, valid_size=500), "train")


def example_ids(source) -> dict[bytes, int]:
    ids = {bytes(source[i]): i for i in range(len(source))}
    assert len(ids) == len(source), "test needs distinct examples"
    return ids


def draw(it: TrainIterator, steps: int) -> list[np.ndarray]:
    return [next(it) for _ in range(steps)]


def test_every_example_once_per_epoch_and_reshuffled(enwik8_valid):
    n = len(enwik8_valid)
    ids = example_ids(enwik8_valid)
    it = TrainIterator(enwik8_valid, global_batch_size=10, seed=3, process_index=0, process_count=1)
    batches = draw(it, 21)  # 210 rows: four whole epochs of 52 and two rows of the fifth
    assert batches[0].dtype == np.int32 and batches[0].shape == (10, 1024)
    order = [ids[bytes(row.astype(np.uint8))] for b in batches for row in b]
    epochs = [order[k * n : (k + 1) * n] for k in range(4)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))  # none dropped, none repeated
    assert len({tuple(e) for e in epochs}) == 4  # a new permutation every epoch
    assert it.get_state()["epoch"] == 4 and it.get_state()["position"] == 2


def test_same_seed_same_order_other_seed_other_order(enwik8_valid):
    a = draw(TrainIterator(enwik8_valid, 8, seed=1, process_count=1, process_index=0), 3)
    b = draw(TrainIterator(enwik8_valid, 8, seed=1, process_count=1, process_index=0), 3)
    c = draw(TrainIterator(enwik8_valid, 8, seed=2, process_count=1, process_index=0), 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_no_shuffle_is_sequential(enwik8_valid):
    it = TrainIterator(enwik8_valid, 4, seed=0, shuffle=False, process_count=1, process_index=0)
    assert np.array_equal(next(it), enwik8_valid.get_batch([0, 1, 2, 3]))


@pytest.mark.parametrize("stop_after", [1, 6, 13])
def test_resume_gives_the_same_order(enwik8_valid, stop_after):
    uninterrupted = draw(TrainIterator(enwik8_valid, 8, seed=5, process_count=1, process_index=0), 20)
    first = TrainIterator(enwik8_valid, 8, seed=5, process_count=1, process_index=0)
    draw(first, stop_after)
    state = json.loads(json.dumps(first.get_state()))  # as stored in a checkpoint
    resumed = TrainIterator(enwik8_valid, 8, seed=999, process_count=1, process_index=0)
    resumed.set_state(state)
    for expected, got in zip(uninterrupted[stop_after:], draw(resumed, 20 - stop_after)):
        assert np.array_equal(expected, got)


def test_host_shards_are_disjoint_and_cover_the_global_batch(enwik8_valid):
    whole = TrainIterator(enwik8_valid, 12, seed=7, process_index=0, process_count=1)
    hosts = [TrainIterator(enwik8_valid, 12, seed=7, process_index=p, process_count=4) for p in range(4)]
    ids = example_ids(enwik8_valid)
    order = []
    for _ in range(9):  # 108 rows: crosses two epoch boundaries
        parts = [next(h) for h in hosts]
        assert all(p.shape == (3, 1024) for p in parts)
        assert np.array_equal(np.concatenate(parts), next(whole))
        order += [ids[bytes(r.astype(np.uint8))] for p in parts for r in p]
    # Hosts take disjoint row blocks that together cover each epoch exactly once. (An
    # example may appear twice in one batch only when the batch spans two epochs.)
    assert sorted(order[:52]) == sorted(order[52:104]) == list(range(52))
    # A state saved on 4 hosts resumes on 1.
    single = TrainIterator(enwik8_valid, 12, seed=7, process_index=0, process_count=1)
    single.set_state(hosts[0].get_state())
    assert np.array_equal(next(single), next(whole))


def test_flip_is_deterministic_mirroring(cifar_train):
    def run(batch_size: int) -> np.ndarray:
        it = TrainIterator(cifar_train, batch_size, seed=11, flip=True, process_index=0, process_count=1)
        return np.concatenate(draw(it, 96 // batch_size))

    plain = np.concatenate(draw(TrainIterator(cifar_train, 16, seed=11, process_index=0, process_count=1), 6))
    flipped = run(16)
    assert np.array_equal(flipped, run(16))
    assert np.array_equal(flipped, run(32))  # decided per example, not per batch
    images, mirrored = plain.reshape(-1, 32, 32, 3), flipped.reshape(-1, 32, 32, 3)
    same = np.all(images == mirrored, axis=(1, 2, 3))
    mirror = np.all(images[:, :, ::-1] == mirrored, axis=(1, 2, 3))
    assert np.all(same | mirror)
    assert 20 < mirror.sum() < 76  # about half of 96


def test_flip_needs_an_image_shape(enwik8_valid, cifar_train):
    with pytest.raises(DataError, match="image_shape"):
        TrainIterator(enwik8_valid, 4, seed=0, flip=True, process_index=0, process_count=1)
    with pytest.raises(DataError, match="image_shape"):
        TrainIterator(cifar_train, 4, seed=0, flip=True, image_shape=(32, 96), process_index=0, process_count=1)


def test_eval_covers_every_byte_once(enwik8_valid, shared_data: Path):
    raw = (shared_data / "text" / "enwik8_first_1MB.xml").read_bytes()[963_946 : 963_946 + 53_553]
    per_host = [list(eval_batches(enwik8_valid, 8, process_index=p, process_count=2)) for p in range(2)]
    assert len(per_host[0]) == len(per_host[1]) == 7  # 53 rows in global batches of 8
    total_weight = sum(float(w.sum()) for host in per_host for _, w in host)
    assert total_weight == enwik8_valid.num_bytes
    # Reassemble the rows in global order: weighted bytes are exactly the split.
    rows = []
    for k in range(7):
        for p in range(2):
            tokens, weights = per_host[p][k]
            assert tokens.shape == weights.shape == (4, 1024)
            assert tokens.dtype == np.int32 and weights.dtype == np.float32
            rows += [t[w > 0] for t, w in zip(tokens, weights)]
    assert bytes(np.concatenate(rows).astype(np.uint8)) == raw


def test_eval_covers_audio_tails(shared_data: Path, tmp_path: Path):
    src = load_split(cfg(name="audio", path=str(shared_data / "audio" / "spoken_digits"), seq_len=1024, cache_dir=str(tmp_path)), "test")
    weights = sum(float(w.sum()) for _, w in eval_batches(src, 16, process_index=0, process_count=1))
    assert weights == src.num_bytes > len(src) * 1024


def test_batch_size_must_split_across_hosts(enwik8_valid):
    with pytest.raises(DataError, match="multiple of the number of hosts"):
        TrainIterator(enwik8_valid, 10, seed=0, process_index=0, process_count=4)
    with pytest.raises(DataError, match="multiple of the number of hosts"):
        next(eval_batches(enwik8_valid, 6, process_index=0, process_count=4))


def test_state_from_other_data_is_refused(enwik8_valid, cifar_train):
    state = TrainIterator(cifar_train, 8, seed=0, process_index=0, process_count=1).get_state()
    with pytest.raises(DataError, match="different data"):
        TrainIterator(enwik8_valid, 8, seed=0, process_index=0, process_count=1).set_state(state)


def test_defaults_to_jax_process_layout(enwik8_valid):
    it = TrainIterator(enwik8_valid, 4, seed=0)
    assert (it.process_index, it.process_count) == (0, 1)
