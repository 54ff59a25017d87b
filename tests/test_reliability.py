"""Reliability (issue 6): pre-emption, hard kills, non-finite steps, restore onto other
meshes, incompatible workdirs, bad input, the data order through resumes, and read-only
evaluation and sampling. docs/reliability.md lists what each fault does.

Entry points run as subprocesses wherever the behaviour under test is the process's
(signals, exit codes, the one-paragraph errors); the rest runs in-process to save time.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.helpers import (
    checkpoint_steps,
    compilation_cache,
    run_python,
    run_script,
    script_command,
    script_env,
    smoke_config,
    tree_snapshot,
)
from sparse_lm.checkpoint import CheckpointError, Checkpointer, restore_for_inference
from sparse_lm.data import DataError, TrainIterator, load_split
from sparse_lm.metrics import read_metrics
from sparse_lm.train import TrainingHalted, train_and_evaluate

ENWIK8 = "configs/enwik8.py:smoke"
NUM_STEPS = 20
# Fixed decay_steps: the schedule must not depend on where a run was stopped. Dropout on,
# so that a resume must also reproduce the random masks.
COMMON = {
    "train.num_steps": NUM_STEPS,
    "optim.decay_steps": NUM_STEPS,
    "optim.warmup_steps": 5,
    "train.eval_every": 0,
    "train.eval_max_batches": 1,
    "train.log_every": 1,
    "train.checkpoint_every": 10,
    "train.keep_checkpoints": 3,
    "train.async_checkpoint": True,
    "model.dropout": 0.1,
}


def enwik8_path(shared_data: Path) -> Path:
    return shared_data / "text" / "enwik8_first_1MB.xml"


def config_flags(overrides: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def train_command(workdir: Path, shared_data: Path, **changes) -> list[str]:
    flags = config_flags({**COMMON, "data.path": enwik8_path(shared_data), **changes})
    return script_command("train", ENWIK8, workdir, *flags)


def train_records(workdir: Path) -> list[dict]:
    """metrics.jsonl's train records (read_metrics skips a last line that a kill cut short)."""
    return read_metrics(workdir, "train")


def last_train_step(workdir: Path) -> int:
    records = train_records(workdir)
    return records[-1]["step"] if records else 0


def start(command: list[str], log: Path, compile_cache: Path | None = None) -> subprocess.Popen:
    # Output to a file, not a pipe: a pipe nobody reads could block the child mid-run.
    with log.open("w") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=script_env(compile_cache=compile_cache)
        )


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def assert_same_params(config, workdir_a: Path, workdir_b: Path) -> None:
    _, a, step_a, _ = restore_for_inference(config, workdir_a)
    _, b, step_b, _ = restore_for_inference(config, workdir_b)
    assert step_a == step_b == NUM_STEPS
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def tmp_folders(workdir: Path) -> list[str]:
    folder = workdir / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if "tmp" in p.name) if folder.is_dir() else []


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> Path:
    """A persistent compilation cache for this module's runs of the same programs.

    The runs of COMMON (the straight run and every interrupted or resumed process after
    it) compile the same train step: once, then load it, instead of paying the
    compilation in each of the eight processes. The programs, and so the parameters and
    losses compared bit for bit, are the same either way; what a kill, a signal or a
    resume does is not touched by where the executable came from.
    """
    return tmp_path_factory.mktemp("jax_compilation_cache")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shared_data, compile_cache):
    """An uninterrupted run of COMMON: the reference for every resumed run."""
    workdir = tmp_path_factory.mktemp("straight")
    config = smoke_config("enwik8", shared_data, **COMMON)
    with compilation_cache(compile_cache):
        summary = train_and_evaluate(config, workdir)
    assert summary["status"] == "done" and summary["step"] == NUM_STEPS
    return config, workdir


# --- pre-emption ------------------------------------------------------------------------


def test_sigterm_then_sigint_save_exit_3_and_resume_to_the_same_parameters(
    straight, tmp_path, shared_data, compile_cache
):
    config, straight_dir = straight
    workdir = tmp_path / "run"
    command = train_command(workdir, shared_data)
    resumed_from = 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        log = tmp_path / f"{sig.name}.log"
        proc = start(command, log, compile_cache)
        wait_until(lambda: last_train_step(workdir) > resumed_from + 1, proc, "training progress")
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == 3
        out = log.read_text()
        stop = re.search(
            r"Stopped by signal (\d+) after step (\d+); checkpoint saved in (\S+)\. "
            r"Run the same command again to resume\.",
            out,
        )
        assert stop, out[-3000:]
        assert int(stop.group(1)) == sig and stop.group(3) == str(workdir / "checkpoints")
        step = int(stop.group(2))
        assert resumed_from + 1 < step < NUM_STEPS
        if resumed_from:
            assert f"Resumed from {workdir / 'checkpoints' / str(resumed_from)} at step {resumed_from}." in out
        # The checkpoint of the step it stopped at is finalized before the process exits
        # (step is not a multiple of checkpoint_every in general, so it is the signal's).
        assert checkpoint_steps(workdir)[-1] == step and not tmp_folders(workdir)
        assert "Traceback" not in out
        resumed_from = step

    final = run_script(command, compile_cache=compile_cache)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert f"at step {resumed_from}." in final.stdout
    assert_same_params(config, straight_dir, workdir)
    got, want = train_records(workdir), train_records(straight_dir)
    assert [r["step"] for r in got] == list(range(1, NUM_STEPS + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]


# --- hard kills -------------------------------------------------------------------------


def test_sigkill_at_several_points_resumes_from_the_last_complete_checkpoint(
    straight, tmp_path, shared_data, compile_cache
):
    """Kills with a checkpoint written (asynchronously) after every step, so that a kill
    often lands inside a write or inside Orbax's deletion of the oldest step."""
    config, straight_dir = straight
    workdir = tmp_path / "run"
    ckpts = workdir / "checkpoints"
    command = train_command(workdir, shared_data, **{"train.checkpoint_every": 1})

    def progress(log: Path) -> int:
        """The last step this run printed (its own console, not metrics.jsonl, which
        still holds what earlier runs logged)."""
        steps = re.findall(r"^step +(\d+)/", log.read_text(), flags=re.M)
        return int(steps[-1]) if steps else 0

    def writing_after(step: int) -> bool:
        """A temporary (unfinished) checkpoint folder of a step after ``step`` exists."""
        return any(int(name.split(".")[0]) > step for name in tmp_folders(workdir))

    Condition = Callable[[Path, int], bool]
    # Three distinct cases, in an order that makes each what it says: a fresh run killed
    # inside its first write (nothing to resume yet); a run killed just after finalizing
    # a checkpoint of step 2 or later (inside Orbax's deletion of the oldest, at times);
    # and a run resumed from that checkpoint, killed inside a write. (The "during a write
    # after resuming" kill used to come second, where the first kill had usually left
    # nothing to resume, so it repeated the first case; and a fourth, "between
    # checkpoints", was with a write after every step another kill of a resumed run,
    # which the last case now is, inside a write.)
    kill_points: list[tuple[str, Condition, bool]] = [
        ("during the first asynchronous checkpoint write",
         lambda log, at: progress(log) > 0 and writing_after(at), False),
        ("just after a checkpoint was finalized",
         lambda log, at: checkpoint_steps(workdir)[-1:] > [at + 1], False),
        ("during a write after resuming",
         lambda log, at: progress(log) > at and writing_after(at), True),
    ]
    resume_at = 0
    killed_mid_write = []
    for i, (what, condition, resumes) in enumerate(kill_points):
        assert resume_at or not resumes, f"no checkpoint to resume from before the kill {what}"
        log = tmp_path / f"kill{i}.log"
        proc = start(command, log, compile_cache)
        wait_until(lambda: condition(log, resume_at), proc, what)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        out = log.read_text()
        if resume_at:
            assert f"Resumed from {ckpts / str(resume_at)} at step {resume_at}." in out, out[-3000:]
        else:
            assert "Resumed from" not in out
        left_tmp = tmp_folders(workdir)
        killed_mid_write.append(bool(left_tmp))
        # What Orbax will trust is exactly the finalized folders: never a temporary one.
        complete = checkpoint_steps(workdir)
        reader = Checkpointer(workdir, read_only=True)
        assert reader.all_steps() == complete and reader.latest_step() == (complete[-1] if complete else None)
        reader.close()
        # None yet (a kill inside the very first write) means the next run starts afresh.
        resume_at = complete[-1] if complete else 0

    # Writes were in flight at the kill at least once: the case under test did happen.
    assert any(killed_mid_write), killed_mid_write
    final = run_script(command, compile_cache=compile_cache)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert f"Resumed from {ckpts / str(resume_at)} at step {resume_at}." in final.stdout
    # The resumed run removed the leftovers and replaced the steps the kills cut off.
    assert not tmp_folders(workdir)
    assert checkpoint_steps(workdir)[-1] == NUM_STEPS
    assert_same_params(config, straight_dir, workdir)
    got, want = train_records(workdir), train_records(straight_dir)
    assert [r["step"] for r in got] == list(range(1, NUM_STEPS + 1))  # no step logged twice
    assert [r["loss"] for r in got] == [r["loss"] for r in want]


# --- non-finite loss or gradients -------------------------------------------------------


def test_skip_mode_counts_skipped_updates_then_stops_past_the_limit(tmp_path, shared_data):
    """NaN at step 3 (skipped, training goes on) and at steps 6, 7, 8 (three in a row,
    past max_skipped=2: stop)."""
    config = smoke_config("enwik8", shared_data, **{
        **COMMON, "train.num_steps": 10, "train.checkpoint_every": 1, "train.keep_checkpoints": 10,
        "model.dropout": 0.0, "train.nonfinite": "skip", "train.max_skipped": 2,
        "train.debug_nan_steps": (3, 6, 7, 8),
    })
    with pytest.raises(TrainingHalted, match=r"max_skipped=2 updates in a row .*up to step 8") as halted:
        train_and_evaluate(config, tmp_path)
    assert "(step 7)" in str(halted.value)  # the last good checkpoint, named and kept

    by_step = {r["step"]: r for r in read_metrics(tmp_path, "train")}
    assert sorted(by_step) == list(range(1, 8))  # step 8's record is not written: it halted
    counts = {s: (r["skipped_in_a_row"], r["skipped_total"]) for s, r in by_step.items()}
    assert counts == {1: (0, 0), 2: (0, 0), 3: (1, 1), 4: (0, 1), 5: (0, 1), 6: (1, 2), 7: (2, 3)}
    assert np.isnan(by_step[3]["loss"]) and np.isfinite(by_step[4]["loss"])
    assert checkpoint_steps(tmp_path) == list(range(1, 8))  # none for step 8

    cache: dict[int, list[np.ndarray]] = {}

    def params(step: int) -> list[np.ndarray]:
        if step not in cache:
            restored = restore_for_inference(config, tmp_path, step=step)[1]
            cache[step] = [np.asarray(x) for x in jax.tree.leaves(restored)]
        return cache[step]

    def same(a: int, b: int) -> bool:
        return all(np.array_equal(x, y) for x, y in zip(params(a), params(b), strict=True))

    # A skipped update leaves the parameters exactly as they were; a good one changes them.
    assert same(2, 3) and same(5, 6) and same(5, 7)
    assert not same(3, 4) and not same(4, 5)
    assert all(np.isfinite(x).all() for x in params(7))


def test_skip_mode_catches_a_burst_between_two_host_checks(tmp_path, shared_data):
    """NaN at steps 3, 4, 5 then good steps, with the host looking only every 10 steps:
    the device notices the burst, freezes the parameters and the run still halts."""
    config = smoke_config("enwik8", shared_data, **{
        **COMMON, "train.num_steps": 12, "train.log_every": 10, "train.checkpoint_every": 2,
        "train.keep_checkpoints": 10, "model.dropout": 0.0, "train.nonfinite": "skip",
        "train.max_skipped": 2, "train.debug_nan_steps": (3, 4, 5),
    })
    with pytest.raises(TrainingHalted, match=r"max_skipped=2 updates in a row .*up to step 5"):
        train_and_evaluate(config, tmp_path)
    # Checkpoints at 2 and 4 only: the one due at step 6 saw the halt and was not written.
    assert checkpoint_steps(tmp_path) == [2, 4]


def test_stop_mode_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, shared_data):
    command = train_command(tmp_path, shared_data, **{
        "train.num_steps": 8, "train.checkpoint_every": 2, "model.dropout": 0.0,
        "train.nonfinite": "stop", "train.debug_nan_steps": "(5,)",
    })
    result = run_script(command)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert re.search(r"training halted: non-finite loss or gradient at step 5; .* \(step 4\)\.", message), message
    assert checkpoint_steps(tmp_path) == [2, 4]
    config = smoke_config("enwik8", shared_data, **COMMON)
    _, params, step, _ = restore_for_inference(config, tmp_path)
    assert step == 4 and all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


def test_debug_nan_steps_is_validated(shared_data, tmp_path):
    from sparse_lm.config import ConfigError

    config = smoke_config("enwik8", shared_data, **{"train.debug_nan_steps": (0,)})
    with pytest.raises(ConfigError, match="debug_nan_steps"):
        train_and_evaluate(config, tmp_path)


# --- restore onto another device count or mesh ------------------------------------------

_MESH_SAVE = """
import json, jax, numpy as np
from pathlib import Path
from tests.helpers import smoke_config
from sparse_lm.checkpoint import restore_for_inference
from sparse_lm.train import train_and_evaluate
cfg = smoke_config("enwik8", Path({data!r}), **{overrides!r})
train_and_evaluate(cfg, {workdir!r})
_, params, step, _ = restore_for_inference(cfg, {workdir!r})
leaves = jax.tree_util.tree_flatten_with_path(params)[0]
np.savez({npz!r}, **{{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}})
spread = max(len(v.sharding.device_set) for _, v in leaves)
print(json.dumps({{"devices": jax.device_count(), "step": step, "spread": spread}}))
"""

_MESH_RESTORE = """
import json, jax, numpy as np
from pathlib import Path
from tests.helpers import smoke_config
from sparse_lm.checkpoint import restore_for_inference
from sparse_lm.metrics import read_metrics
from sparse_lm.train import train_and_evaluate
cfg = smoke_config("enwik8", Path({data!r}), **{overrides!r})
_, params, step, _ = restore_for_inference(cfg, {workdir!r})
saved = np.load({npz!r})
leaves = jax.tree_util.tree_flatten_with_path(params)[0]
same = all(np.array_equal(np.asarray(v), saved[jax.tree_util.keystr(k)]) for k, v in leaves)
spread = max(len(v.sharding.device_set) for _, v in leaves)
cfg.train.num_steps = {more}
summary = train_and_evaluate(cfg, {workdir!r})
losses = [r["loss"] for r in read_metrics({workdir!r}, "train") if r["step"] > step]
print(json.dumps({{"devices": jax.device_count(), "step": step, "same": same, "spread": spread,
                  "final": summary["step"], "losses": losses, "keys": len(saved.files) == len(leaves)}}))
"""


def test_checkpoint_from_8_devices_fsdp_restores_on_1_device_and_a_2x2_mesh(tmp_path, shared_data):
    base = {
        "train.num_steps": 2, "optim.decay_steps": 4, "train.eval_every": 0, "train.eval_max_batches": 1,
        "train.log_every": 1, "train.checkpoint_every": 2, "train.async_checkpoint": False,
    }
    npz = str(tmp_path / "params.npz")
    written = tmp_path / "eight"
    saved = run_python(_MESH_SAVE.format(
        data=str(shared_data), workdir=str(written), npz=npz,
        overrides={**base, "mesh.data": 2, "mesh.fsdp": 4, "mesh.tensor": 1},
    ), devices=8)
    assert saved["devices"] == 8 and saved["step"] == 2 and saved["spread"] > 1  # really sharded

    results = {}
    for name, devices, mesh in (("one", 1, (1, 1)), ("two_by_two", 4, (2, 2))):
        workdir = tmp_path / name
        shutil.copytree(written, workdir)
        results[name] = run_python(_MESH_RESTORE.format(
            data=str(shared_data), workdir=str(workdir), npz=npz, more=4,
            overrides={**base, "mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": 1},
        ), devices=devices)
    for name, devices in (("one", 1), ("two_by_two", 4)):
        r = results[name]
        assert r["devices"] == devices and r["step"] == 2 and r["keys"]
        assert r["same"], f"parameters differ after restoring on {name}"
        assert r["final"] == 4 and len(r["losses"]) == 2 and all(np.isfinite(r["losses"]))
    assert results["two_by_two"]["spread"] > 1
    np.testing.assert_allclose(results["two_by_two"]["losses"], results["one"]["losses"], rtol=1e-5)


# --- a workdir of another model or config -----------------------------------------------


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"model.d_model": 32}, CheckpointError, r"different model \(d_model: checkpoint 64, config 32\)"),
        ({"attention.pattern": "strided"}, CheckpointError, r"pattern: checkpoint 'fixed', config 'strided'"),
        ({"model.param_dtype": "bfloat16"}, CheckpointError, r"param_dtype: checkpoint 'float32'"),
        ({"model.scan_layers": False}, CheckpointError,
         r"scan_layers: checkpoint True, config False.*add --config\.model\.scan_layers=True"),
        # Another model besides: the layout hint would not help, so it is not given.
        ({"model.scan_layers": False, "model.d_model": 32}, CheckpointError,
         r"(?s)^(?!.*add --config).*d_model: checkpoint 64.*scan_layers: checkpoint True"),
        ({"optim.clip_norm": 0.0}, CheckpointError, r"different structure .*optim\.clip_norm"),
        ({"data.split_fractions": (0.8, 0.1, 0.1)}, DataError, r"saved data position was taken on a split of"),
    ],
)
def test_incompatible_workdir_is_refused_and_left_untouched(straight, tmp_path, shared_data, change, error, match):
    _, straight_dir = straight
    workdir = tmp_path / "copy"
    shutil.copytree(straight_dir, workdir)
    before = tree_snapshot(workdir)
    config = smoke_config("enwik8", shared_data, **{**COMMON, "train.num_steps": NUM_STEPS + 5, **change})
    with pytest.raises(error, match=match):
        train_and_evaluate(config, workdir)
    assert tree_snapshot(workdir) == before


def test_damaged_latest_checkpoint_is_reported_not_loaded(straight, tmp_path, shared_data):
    """A finalized step folder with files missing (as a kill during Orbax's rmtree of a
    step can leave) is refused with the folder to delete."""
    _, straight_dir = straight
    workdir = tmp_path / "copy"
    shutil.copytree(straight_dir, workdir)
    latest = workdir / "checkpoints" / str(NUM_STEPS)
    for f in (latest / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.unlink()
    config = smoke_config("enwik8", shared_data, **{**COMMON, "train.num_steps": NUM_STEPS + 5})
    with pytest.raises(CheckpointError, match=rf"step {NUM_STEPS} .* cannot be read .* Delete the folder {latest}"):
        train_and_evaluate(config, workdir)


# --- bad input through the entry points -------------------------------------------------


def _bad_input_cases(shared_data: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (command, text the one-paragraph error must hold)."""
    data = enwik8_path(shared_data)
    short = tmp / "short.txt"
    short.write_bytes(data.read_bytes()[:300])
    blocker = tmp / "a_file"
    blocker.write_text("a regular file, so nothing can be created under it, not even by root")
    unreadable = tmp / "unreadable_audio"
    unreadable.mkdir()
    for i in range(3):
        (unreadable / f"{i}.wav").write_bytes(b"RIFF....WAVEjunk")
    train = lambda *flags, workdir=tmp / "w": script_command("train", ENWIK8, workdir, *flags)  # noqa: E731
    audio = script_command("train", "configs/audio.py:smoke", tmp / "wa", f"--config.data.path={unreadable}")
    return {
        "unknown config field": (
            train(f"--config.data.path={data}", "--config.model.nonexistent=1"),
            "unknown config field --config.model.nonexistent: the config has no field 'nonexistent' under config.model",
        ),
        "missing data path": (train("--config.data.path=/no/such/enwik8"), "enwik8 was not found at /no/such/enwik8"),
        "data shorter than one sequence": (
            train(f"--config.data.path={short}"), "fewer than one sequence of seq_len=512"
        ),
        "context length the pattern cannot take": (
            train(f"--config.data.path={data}", "--config.data.seq_len=500"),
            "sequence length 500 is not a multiple of the attention stride",
        ),
        "unwritable workdir": (
            train(f"--config.data.path={data}", workdir=blocker / "run"), f"cannot write to workdir {blocker / 'run'}"
        ),
        "every audio file unreadable": (audio, "None of the 1 audio files of the train split"),
        "unknown config file": (script_command("evaluate", "configs/nonexistent.py", tmp / "w"), "cannot load the config"),
        # Sampling options are checked before the checkpoint is looked for (there is none).
        "sampling option out of range": (
            script_command("sample", ENWIK8, tmp / "w", f"--config.data.path={data}",
                           f"--output={tmp / 's'}", "--top_k=300"),
            "sampling: top_k=300 must be in [0, 256]",
        ),
        "no samples asked for": (
            script_command("sample", ENWIK8, tmp / "w", f"--config.data.path={data}",
                           f"--output={tmp / 's'}", "--num_samples=0"),
            "--num_samples (0) and --length (512) must be positive",
        ),
    }


BAD_INPUTS = [
    "unknown config field", "missing data path", "data shorter than one sequence",
    "context length the pattern cannot take", "unwritable workdir", "every audio file unreadable",
    "unknown config file", "sampling option out of range", "no samples asked for",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_paragraph_and_exit_code_2(case, tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("SPARSE_LM_CACHE_DIR", str(tmp_path / "cache"))  # the audio cache
    command, expected = _bad_input_cases(shared_data, tmp_path)[case]
    result = run_script(command, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    # The paragraph: the "error:" line and its wrapped continuation, nothing after it.
    paragraph = result.stderr[result.stderr.index("error: "):].strip()
    assert "Traceback" not in result.stderr and "\n\n" not in paragraph
    assert expected in " ".join(paragraph.split()), paragraph


def test_unreadable_audio_file_in_a_folder_is_skipped_warned_and_counted(tmp_path, shared_data, monkeypatch):
    from sparse_lm.data.audio import split_files

    monkeypatch.setenv("SPARSE_LM_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "audio"
    folder.mkdir()
    digits = shared_data / "audio" / "spoken_digits"
    for d in range(8):
        shutil.copy(digits / f"{d}_george_0.wav", folder / f"{d}_george_0.wav")
    (folder / "corrupt.wav").write_bytes(b"RIFF....WAVEjunk")
    # Files go to splits by a hash of their name; this one lands in the training split.
    assert folder / "corrupt.wav" in split_files(sorted(folder.iterdir()), (0.9, 0.05, 0.05), "train")
    command = script_command(
        "train", "configs/audio.py:smoke", tmp_path / "w", f"--config.data.path={folder}",
        "--config.train.num_steps=1", "--config.train.eval_max_batches=1",
        "--config.train.checkpoint_every=1", "--config.train.async_checkpoint=False",
    )
    result = run_script(command)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Skipping unreadable audio file" in result.stderr and "corrupt.wav" in result.stderr
    assert "Skipped 1 unreadable input file(s): corrupt.wav." in result.stdout
    assert checkpoint_steps(tmp_path / "w") == [1]  # and training went on without it


# --- the data order through the training loop -------------------------------------------


def test_data_order_over_epochs_survives_a_resume_through_the_train_loop(
    tmp_path, shared_data, monkeypatch, compile_cache
):
    """Batches the loop trains on, stopped mid-epoch and resumed from the checkpoint:
    every example once per epoch, a new order each epoch, the same order as unbroken."""
    import sparse_lm.train as train_lib

    seen: list[np.ndarray] = []

    class RecordingPrefetcher(train_lib.DevicePrefetcher):
        # Batches as the loop takes them, not as the background thread reads ahead.
        def __next__(self):
            batch, state = super().__next__()
            seen.append(np.asarray(batch).reshape(-1, batch.shape[-1]).copy())
            return batch, state

    monkeypatch.setattr(train_lib, "DevicePrefetcher", RecordingPrefetcher)
    # A train split of about 60 examples: about 7.5 steps of 8 per epoch.
    overrides = {**COMMON, "data.split_fractions": (0.03, 0.485, 0.485), "model.dropout": 0.0,
                 "train.log_every": 5, "train.checkpoint_every": 100}
    first = smoke_config("enwik8", shared_data, **{**overrides, "train.num_steps": 11})
    full = smoke_config("enwik8", shared_data, **{**overrides, "train.num_steps": 24})
    with compilation_cache(compile_cache):  # the resumed run loads the first one's step
        train_and_evaluate(first, tmp_path)
        assert len(seen) == 11
        summary = train_and_evaluate(full, tmp_path)
    assert summary["step"] == 24 and len(seen) == 24

    source = load_split(full.data, "train")
    ids = {bytes(source[i]): i for i in range(len(source))}
    assert len(ids) == len(source)
    order = [ids[bytes(row.astype(np.uint8))] for batch in seen for row in batch]
    n = len(source)
    epochs = [order[k * n:(k + 1) * n] for k in range(len(order) // n)]
    assert len(epochs) >= 3
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))  # none dropped, none repeated
    assert len({tuple(e) for e in epochs}) == len(epochs)  # reshuffled every epoch
    # The resumed run continued the unbroken sequence (11 * 8 rows is mid-epoch 2).
    unbroken = TrainIterator(source, full.data.batch_size, full.seed, process_index=0, process_count=1)
    expected = [ids[bytes(row.astype(np.uint8))] for _ in range(24) for row in next(unbroken)]
    assert order == expected


# --- evaluation and sampling are read-only ----------------------------------------------


def test_evaluate_and_sample_never_write_into_the_checkpoints(straight, tmp_path):
    config, workdir = straight
    before = tree_snapshot(workdir / "checkpoints")
    time.sleep(0.01)  # so that any rewrite would show in the mtimes
    flags = [f"--config.data.path={config.data.path}"]
    evaluated = run_script(script_command("evaluate", ENWIK8, workdir, *flags, "--max_batches=1"))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    sampled = run_script(script_command(
        "sample", ENWIK8, workdir, *flags, "--num_samples=1", "--length=40", f"--output={tmp_path / 's'}",
    ))
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert list((tmp_path / "s").iterdir())
    assert tree_snapshot(workdir / "checkpoints") == before
