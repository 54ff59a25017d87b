"""Training, evaluation and checkpoints, end to end on the real enwik8 sample."""

from __future__ import annotations

import json
import math
import time

import jax
import numpy as np
import pytest

from tests.helpers import compilation_cache, run_python, smoke_config
from sparse_lm.evaluate import evaluate_checkpoint
from sparse_lm.metrics import read_metrics
from sparse_lm.train import train_and_evaluate


def unigram_entropy_bits(data: np.ndarray) -> float:
    counts = np.bincount(data, minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


# The smoke config's 200 steps end at 3.90 valid bits per byte; these 120 (the schedule
# decays over them) end at 4.01 against a unigram entropy of 4.94: still 0.43 bits past
# the 0.5 margin the test asks for, in a bit over half the time.
NUM_STEPS = 120


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shared_data):
    """A tiny fixed-pattern model trained for NUM_STEPS steps on the first MB of enwik8."""
    workdir = tmp_path_factory.mktemp("enwik8_smoke")
    config = smoke_config("enwik8", shared_data, **{
        "train.num_steps": NUM_STEPS, "train.eval_every": NUM_STEPS // 2})
    summary = train_and_evaluate(config, workdir)
    return config, workdir, summary


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for this module's in-process runs of one program.

    Each run jits a new train step; runs of the same config load the first one's
    executable from here instead of compiling it again (the same program, so the same
    results bit for bit).
    """
    return tmp_path_factory.mktemp("jax_compilation_cache")


# Three steps on one device: the reference for the 8-device mesh and for gradient
# accumulation, which both train this config (the mesh and the accumulation aside).
THREE_STEPS = {"train.num_steps": 3, "train.log_every": 1, "train.eval_every": 0,
               "train.eval_max_batches": 1, "train.checkpoint_every": 100}


@pytest.fixture(scope="module")
def three_steps_on_one_device(tmp_path_factory, shared_data) -> list[dict]:
    """The train records of THREE_STEPS in this (one-device) process."""
    workdir = tmp_path_factory.mktemp("three_steps")
    train_and_evaluate(smoke_config("enwik8", shared_data, **THREE_STEPS), workdir)
    return read_metrics(workdir, "train")


def test_training_lowers_valid_bits_per_byte_below_unigram_entropy(trained_run):
    from sparse_lm.data import load_split

    config, workdir, summary = trained_run
    valid = load_split(config.data, "valid")
    entropy = unigram_entropy_bits(valid.buffer[: valid.num_bytes])
    evals = read_metrics(workdir, "eval_valid")
    assert summary["status"] == "done" and summary["step"] == config.train.num_steps
    assert [e["step"] for e in evals] == [NUM_STEPS // 2, NUM_STEPS]
    # The first evaluation is already better than knowing byte frequencies, and it improves.
    assert evals[-1]["bits_per_byte"] < entropy - 0.5, (evals, entropy)
    assert evals[-1]["bits_per_byte"] < evals[0]["bits_per_byte"]
    assert evals[-1]["num_bytes"] == valid.num_bytes


def test_train_metrics_are_logged_with_throughput(trained_run):
    _, workdir, _ = trained_run
    train = read_metrics(workdir, "train")
    assert [r["step"] for r in train] == list(range(20, NUM_STEPS + 1, 20))
    for r in train:
        assert math.isfinite(r["loss"]) and r["tokens_per_second"] > 0 and r["step_time"] > 0
        assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2))
    assert (workdir / "tensorboard").is_dir() and any((workdir / "tensorboard").iterdir())


def test_throughput_leaves_out_the_time_spent_evaluating(tmp_path, shared_data, compile_cache, monkeypatch):
    """A window of steps that contains an evaluation (here made to take 8 s) reports the
    steps' own speed, not a dip: tokens/s and step time are about training."""
    import sparse_lm.train as train_lib

    class SlowEvaluator(train_lib.Evaluator):
        def __call__(self, *args, **kwargs):
            time.sleep(8.0)
            return super().__call__(*args, **kwargs)

    monkeypatch.setattr(train_lib, "Evaluator", SlowEvaluator)
    config = smoke_config("enwik8", shared_data, **{**THREE_STEPS, "train.num_steps": 12,
                                                    "train.log_every": 4, "train.eval_every": 4})
    with compilation_cache(compile_cache):
        train_and_evaluate(config, tmp_path / "run")
    steps = {r["step"]: r["step_time"] for r in read_metrics(tmp_path / "run", "train")}
    # Step 8's window holds step 4's evaluation and step 12's step 8's: counted, each
    # would add 8 s / 4 steps = 2 s to the step time of step 4's window, which has none.
    assert steps[8] < steps[4] + 1.0 and steps[12] < steps[4] + 1.0, steps


def test_the_train_step_compiles_once_in_a_whole_run(trained_run):
    _, workdir, summary = trained_run
    assert summary["train_step_compilations"] == 1
    assert read_metrics(workdir, "recompiled") == []


def test_evaluate_checkpoint_returns_the_figure_training_logged(trained_run):
    config, workdir, _ = trained_run
    logged = read_metrics(workdir, "eval_valid")[-1]
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    result = evaluate_checkpoint(config, workdir, split="valid")
    assert result["step"] == logged["step"] == NUM_STEPS
    assert result["bits_per_byte"] == pytest.approx(logged["bits_per_byte"], rel=1e-6)
    written = json.loads((workdir / f"eval_valid_{NUM_STEPS}.json").read_text())
    assert written["bits_per_byte"] == result["bits_per_byte"]
    assert written["num_bytes"] == logged["num_bytes"]
    # A partial evaluation (the first batch) says so and leaves the whole split's file alone.
    partial = evaluate_checkpoint(config, workdir, split="valid", max_batches=1)
    assert partial["max_batches"] == 1 and partial["num_bytes"] < result["num_bytes"]
    assert json.loads((workdir / f"eval_valid_{NUM_STEPS}_b1.json").read_text())["max_batches"] == 1
    assert json.loads((workdir / f"eval_valid_{NUM_STEPS}.json").read_text()) == written
    # Evaluation reads checkpoints and never writes into them.
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


def test_a_finished_run_started_again_trains_nothing_and_reports_its_last_figure(trained_run):
    config, workdir, summary = trained_run
    again = train_and_evaluate(config, workdir)
    assert again["step"] == NUM_STEPS and again["steps_run"] == 0 and summary["steps_run"] == NUM_STEPS
    assert again["eval"]["bits_per_byte"] == summary["eval"]["bits_per_byte"]
    assert again["eval"]["step"] == NUM_STEPS


def test_resumed_run_reaches_bitwise_the_same_parameters(tmp_path, shared_data, compile_cache):
    """Stop after 6 steps, resume to 12: identical to 12 uninterrupted steps."""
    common = {
        "train.num_steps": 12, "optim.decay_steps": 12, "train.eval_every": 0,
        "train.eval_max_batches": 1, "train.log_every": 3, "train.checkpoint_every": 6,
        "model.dropout": 0.1,  # resume must also reproduce the dropout masks
    }
    straight = smoke_config("enwik8", shared_data, **common)
    first = smoke_config("enwik8", shared_data, **{**common, "train.num_steps": 6})
    second = smoke_config("enwik8", shared_data, **common)
    with compilation_cache(compile_cache):  # one compilation of the step for the three runs
        train_and_evaluate(straight, tmp_path / "straight")
        train_and_evaluate(first, tmp_path / "resumed")
        summary = train_and_evaluate(second, tmp_path / "resumed")
    assert summary["step"] == 12

    from sparse_lm.checkpoint import restore_for_inference

    _, p_straight, s1, _ = restore_for_inference(straight, tmp_path / "straight")
    _, p_resumed, s2, _ = restore_for_inference(straight, tmp_path / "resumed")
    assert s1 == s2 == 12
    for a, b in zip(jax.tree.leaves(p_straight), jax.tree.leaves(p_resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    losses_straight = [r["loss"] for r in read_metrics(tmp_path / "straight", "train")]
    losses_resumed = [r["loss"] for r in read_metrics(tmp_path / "resumed", "train")]
    assert losses_straight == losses_resumed


_MESH_RUN = """
import json, jax
from tests.helpers import smoke_config
from sparse_lm.metrics import read_metrics
from sparse_lm.train import train_and_evaluate
from pathlib import Path
cfg = smoke_config("enwik8", Path({data!r}), **{{
    "train.num_steps": 3, "train.log_every": 1, "train.eval_every": 0,
    "train.eval_max_batches": 1, "train.checkpoint_every": 100,
    "mesh.data": {data_axis}, "mesh.fsdp": {fsdp}, "mesh.tensor": {tensor},
    "train.async_checkpoint": False,
}})
train_and_evaluate(cfg, {workdir!r})
print(json.dumps({{"devices": jax.device_count(),
                  "losses": [r["loss"] for r in read_metrics({workdir!r}, "train")]}}))
"""


def test_eight_virtual_devices_give_the_same_losses_as_one(tmp_path, shared_data, three_steps_on_one_device):
    # One device: this process (the losses of the same config's run, shared with the
    # gradient accumulation test), rather than another process started for it.
    one = {"devices": jax.device_count(), "losses": [r["loss"] for r in three_steps_on_one_device]}
    eight = run_python(
        _MESH_RUN.format(data=str(shared_data), workdir=str(tmp_path / "eight"),
                         data_axis=2, fsdp=2, tensor=2),
        devices=8,
    )
    assert one["devices"] == 1 and eight["devices"] == 8
    assert len(one["losses"]) == 3
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5, atol=1e-5)


def test_longer_context_evaluation_scores_the_same_bytes_with_more_context(trained_run):
    config, workdir, _ = trained_run
    plain = evaluate_checkpoint(config, workdir, split="valid")
    longer = evaluate_checkpoint(config, workdir, split="valid", min_context=384)
    assert longer["num_bytes"] == plain["num_bytes"]
    assert (workdir / f"eval_valid_{NUM_STEPS}_ctx384.json").exists()
    # Bytes early in a window lose nothing and later ones gain context: no worse overall.
    assert longer["bits_per_byte"] <= plain["bits_per_byte"] + 1e-3, (longer, plain)


def test_gradient_accumulation_matches_one_large_batch(tmp_path, shared_data, three_steps_on_one_device):
    """Two micro-batches of 4 accumulate to the update of one batch of 8."""
    config = smoke_config("enwik8", shared_data, **THREE_STEPS, **{"optim.grad_accum_steps": 2})
    assert smoke_config("enwik8", shared_data, **THREE_STEPS).optim.grad_accum_steps == 1
    train_and_evaluate(config, tmp_path / "accum2")
    runs = {1: [(r["loss"], r["grad_norm"]) for r in three_steps_on_one_device],
            2: [(r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path / "accum2", "train")]}
    assert len(runs[1]) == 3
    np.testing.assert_allclose(runs[2], runs[1], rtol=2e-5)


def profiled_run(workdir, shared_data, compile_cache, num_steps: int, profile_from: int) -> list[dict]:
    """The "profile" records of a short smoke run tracing 2 steps from ``profile_from``.

    The schedule's length is the same for every ``num_steps``, so that the runs of both
    tests compile one train step (through ``compile_cache``).
    """
    config = smoke_config("enwik8", shared_data, **{
        "train.num_steps": num_steps, "optim.decay_steps": 6, "train.eval_every": 0,
        "train.eval_max_batches": 1, "train.log_every": 2, "train.checkpoint_every": num_steps,
        "train.profile_from": profile_from, "train.profile_steps": 2})
    with compilation_cache(compile_cache):
        train_and_evaluate(config, workdir)
    return read_metrics(workdir, "profile")


# First of the two: in file order, its run is the one that compiles the step (the other
# loads it from compile_cache).
def test_profile_window_never_covers_the_compiling_step(tmp_path, shared_data, compile_cache):
    (record,) = profiled_run(tmp_path, shared_data, compile_cache, num_steps=4, profile_from=1)
    assert (record["first_step"], record["step"]) == (2, 3)


def test_profiled_window_writes_a_trace_and_a_profile_record(tmp_path, shared_data, compile_cache):
    """train.profile_from traces a window of the real loop (data pipeline included); on
    CPU the trace holds no device kernels, which the record says instead of inventing a
    busy fraction."""
    import glob

    (record,) = profiled_run(tmp_path, shared_data, compile_cache, num_steps=6, profile_from=3)
    assert record["step"] == 4 and record["first_step"] == 3 and record["steps"] == 2
    assert record["wall_ms_per_step"] > 0
    assert "no device kernel events" in record["error"]
    assert glob.glob(str(tmp_path / "profile" / "process_0" / "**" / "perfetto_trace.json.gz"),
                     recursive=True)
