"""The training loop: build or resume a run in a workdir, train, evaluate, checkpoint.

One jitted step over a device mesh; the loop around it only moves batches in and
figures out. See ``train_and_evaluate`` for the order of events.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from sparse_lm import config as config_lib
from sparse_lm import data as data_lib
from sparse_lm import profiling, sharding
from sparse_lm.checkpoint import Checkpointer
from sparse_lm.evaluate import Evaluator
from sparse_lm.metrics import MetricsWriter, log, read_metrics
from sparse_lm.model import build_model
from sparse_lm.optim import make_optimizer
from sparse_lm.prefetch import DevicePrefetcher
from sparse_lm.steps import TrainState, abstract_model, init_state, make_train_step, split_model


class TrainingHalted(RuntimeError):
    """Training stopped on non-finite values; the last good checkpoint is kept."""


class WorkdirError(ValueError):
    """The workdir cannot be used; the message says why."""


def check_workdir(workdir: str | Path) -> Path:
    path = Path(workdir).absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise WorkdirError(
            f"cannot write to workdir {path} ({e.strerror or e}). Choose a folder you can "
            "write to with --workdir, or fix its permissions."
        ) from None
    return path


def state_shardings(abstract_state: TrainState, param_shardings: Any, mesh) -> TrainState:
    """Shardings for every leaf: parameters by their rules, optimizer moments like the
    parameter they track (found by key path suffix), everything else replicated."""
    by_path = {
        tuple(path): s
        for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]
    }
    replicated = sharding.replicated(mesh)

    def for_leaf(path, leaf):
        # The longest suffix first: a parameter's full path from the params root.
        for n in range(len(path)):
            s = by_path.get(tuple(path[n:]))
            if s is not None:
                return s
        return replicated

    return jax.tree_util.tree_map_with_path(for_leaf, abstract_state)


class TrainProgram:
    """The jitted train step of a config on a mesh, and the state it carries, as shapes and
    shardings: what training, resuming and ``scripts/bench_train.py`` all start from."""

    def __init__(self, config: ml_collections.ConfigDict, mesh):
        self.config, self.mesh = config, mesh
        self._init_jit = None
        self.fns, abstract_params = split_model(abstract_model(config))
        self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))
        param_sh = sharding.tree_shardings(abstract_params, self.fns.logical_specs(), mesh)
        self.tx = make_optimizer(config)
        self.abstract_state = jax.eval_shape(self.init)
        self.state_sh = state_shardings(self.abstract_state, param_sh, mesh)
        self.batch_sh = sharding.batch_sharding(mesh, extra_leading=1)
        self.train_step = jax.jit(
            make_train_step(self.fns, self.tx, config),
            in_shardings=(self.state_sh, self.batch_sh),
            out_shardings=(self.state_sh, None),
            donate_argnums=0,
        )

    def init(self) -> TrainState:
        """A fresh state: the model initialised from the config's seed."""
        with nnx.use_eager_sharding(False):
            model = build_model(self.config, nnx.Rngs(self.config.seed))
        _, params = split_model(model)
        return init_state(params, self.tx, self.config.seed)

    def init_on_mesh(self) -> TrainState:
        """``init`` computed directly into its shardings (no full copy on one device)."""
        if self._init_jit is None:  # one compilation per program, however often called
            self._init_jit = jax.jit(self.init, out_shardings=self.state_sh)
        return self._init_jit()

    def abstract_state_on_mesh(self) -> TrainState:
        return sharding.abstract_with_shardings(self.abstract_state, self.state_sh)


class _StopRequest:
    """Remembers SIGTERM/SIGINT so the loop can finish its step and checkpoint."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, step: int, every: int = 10) -> bool:
        """True on every process if any process was asked to stop.

        With several processes they must stop at the same step, which takes a
        collective; it runs every ``every`` steps rather than every step, so a stop
        request waits at most that many steps.
        """
        flag = self.signum is not None
        if jax.process_count() > 1:
            if step % every:
                return False
            flag = bool(multihost_utils.process_allgather(np.array(flag)).any())
        return flag


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint).

    Returns a summary: final step, last train and eval figures, paths, and
    ``status`` ("done" or "preempted").
    """
    config_lib.validate(config)
    workdir = check_workdir(workdir)
    mesh = sharding.make_mesh(config.mesh)
    dp = sharding.data_parallel_size(mesh)
    d = config.data
    accum = config.optim.grad_accum_steps
    if (d.batch_size // accum) % dp:
        raise config_lib.ConfigError(
            f"config.data.batch_size={d.batch_size} over {accum} accumulation step(s) gives "
            f"{d.batch_size // accum} rows per step, which {dp} data-parallel devices cannot "
            "share evenly; make the batch size a multiple of their product."
        )
    if jax.process_count() > 1:  # before any data is read: each host feeds its own rows
        sharding.check_host_rows(mesh, d.batch_size // accum, extra_leading=1)

    train_source = data_lib.load_split(d, "train")
    valid_source = data_lib.load_split(d, "valid")
    _report_skipped_files(train_source, valid_source)
    iterator = data_lib.TrainIterator(
        train_source,
        d.batch_size,
        config.seed,
        flip=bool(d.get("flip", False)),
        image_shape=tuple(config.model.pos_shape) if d.name == "cifar10" else None,
    )

    program = TrainProgram(config, mesh)

    # What is opened from here on (the checkpoint manager's threads, TensorBoard's writer,
    # the prefetch thread) is closed on every way out, errors before the loop included.
    with contextlib.ExitStack() as cleanup:
        ckpt = Checkpointer(
            workdir, keep=config.train.keep_checkpoints, async_save=config.train.async_checkpoint
        )
        cleanup.callback(ckpt.close)
        latest = ckpt.latest_step()
        if latest is not None:
            state, data_state = ckpt.restore(latest, program.abstract_state_on_mesh(), config)
            iterator.set_state(data_state)
            log(f"Resumed from {ckpt.directory / str(latest)} at step {latest}.")
        else:
            state = program.init_on_mesh()
            if jax.process_index() == 0:  # one writer for a workdir that hosts may share
                (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        if jax.process_index() == 0:
            # Steps logged by a run killed after its last checkpoint (all of them, if it never
            # finished one) are about to be trained and logged again.
            dropped = drop_metrics_after(workdir / "metrics.jsonl", latest or 0)
            if dropped:
                log(f"Dropped {dropped} metrics record(s) past step {latest or 0} from an interrupted run.")

        log(
            f"Model: {program.num_params / 1e6:.2f}M parameters, {config.model.num_layers} layers, "
            f"pattern {config.attention.pattern}; mesh {dict(mesh.shape)} on "
            f"{jax.device_count()} {jax.devices()[0].platform} device(s)."
        )

        train_step = program.train_step

        evaluator = Evaluator(program.fns, config, mesh)
        writer = MetricsWriter(workdir, total_steps=config.train.num_steps)
        cleanup.callback(writer.close)
        step = int(jax.device_get(state.step))
        first_step = step
        num_steps = config.train.num_steps
        tokens_per_step = d.batch_size * d.seq_len
        last_train: dict = {}
        last_eval: dict = {}
        status = "done"
        window_start, window_steps = time.time(), 0
        paused = 0.0  # seconds of the window spent evaluating and saving, not training
        compiled = False
        tracer = profiling.StepWindowTrace(
            str(workdir / "profile" / f"process_{jax.process_index()}"),
            int(config.train.get("profile_from", 0)), int(config.train.get("profile_steps", 3)))
        cleanup.callback(tracer.close)
        compiles = profiling.CompileWatch(train_step)

        def run_eval() -> dict:
            result = evaluator(state.params, valid_source, max_batches=config.train.eval_max_batches)
            writer.write(step, "eval_valid", result)
            log(
                f"eval  step {step}: valid bits per byte {result['bits_per_byte']:.4f} over "
                f"{result['num_bytes']:,} bytes"
            )
            return result

        def check_halted(metrics: dict) -> None:
            halted_at = int(metrics["halted_at"])
            if halted_at < 0:
                return
            # An asynchronous save may still be in flight: finish it so the message names
            # the checkpoint that is really on disk.
            ckpt.wait()
            kept = f"The last good checkpoint in {ckpt.directory} is kept (step {ckpt.latest_step()})."
            if config.train.nonfinite == "stop":
                raise TrainingHalted(
                    f"non-finite loss or gradient at step {halted_at}; training stopped "
                    f"(config.train.nonfinite='stop'). {kept}"
                )
            raise TrainingHalted(
                f"more than config.train.max_skipped={config.train.max_skipped} updates in a "
                f"row had a non-finite loss or gradient (up to step {halted_at}); training "
                f"stopped. {kept} Lower the learning rate or check the data."
            )

        # The next batches are read and placed on the devices on a background thread while a
        # step runs; checkpoints store data_state, the position after the last batch trained on.
        prefetcher = DevicePrefetcher(
            iterator,
            lambda local: sharding.global_batch(accumulation_batch(local, accum), mesh, extra_leading=1),
            size=2,
        )
        cleanup.callback(prefetcher.close)
        # Under the mesh, kernels that XLA cannot partition run per shard (attention.adapt).
        with _StopRequest() as stop, jax.set_mesh(mesh):
            while step < num_steps:
                batch, data_state = next(prefetcher)
                if compiled:  # never trace the compiling step
                    tracer.before(step + 1, state)
                state, metrics = train_step(state, batch)
                step += 1
                if (report := tracer.after(step, (state, metrics))) is not None:
                    writer.write(step, "profile", report)
                    log(f"Profiled steps {report['first_step']}-{step} into {report['trace_dir']}: "
                        + (f"device busy {report['device_busy']:.0%} of {report['wall_ms_per_step']:.1f} ms/step; "
                           + ", ".join(f"{k} {v:.1f} ms" for k, v in report["by_category"].items())
                           if "error" not in report else report["error"]))
                window_steps += 1
                if not compiled:
                    # This process's first step carries the compilation: time it apart, so
                    # step times, tokens/s and wall-clock plots (which start at this
                    # record) show training alone.
                    jax.block_until_ready(metrics)
                    compiled = True
                    writer.write(step, "compiled", {"seconds": time.time() - window_start})
                    window_start, window_steps, paused = time.time(), 0, 0.0
                is_last = step == num_steps
                if step % config.train.log_every == 0 or is_last:
                    metrics = jax.device_get(metrics)
                    if window_steps:  # none when the only step so far was the compiling one
                        elapsed = time.time() - window_start - paused
                        metrics["step_time"] = elapsed / window_steps
                        metrics["tokens_per_second"] = tokens_per_step * window_steps / elapsed
                    window_start, window_steps, paused = time.time(), 0, 0.0
                    check_halted(metrics)
                    if (warning := compiles.check()) is not None:
                        log(f"Warning: {warning}")
                        writer.write(step, "recompiled", {"compilations": compiles.count()})
                    last_train = metrics
                    writer.write(step, "train", metrics)
                    writer.progress(
                        step,
                        {k: metrics[k] for k in ("loss", "bits_per_byte", "learning_rate", "grad_norm", "tokens_per_second")
                         if k in metrics},
                    )
                evaluate_now = config.train.eval_every and step % config.train.eval_every == 0 or is_last
                save_now = step % config.train.checkpoint_every == 0 or is_last
                if evaluate_now or save_now:
                    # Out of the throughput window: the steps dispatched so far finish
                    # first (they count), the evaluation and the save do not.
                    jax.block_until_ready(state)
                    pause_start = time.time()
                if evaluate_now:
                    last_eval = run_eval()
                if save_now:
                    check_halted(jax.device_get(_health(state)))
                    ckpt.save(step, state, data_state, config)
                if evaluate_now or save_now:
                    paused += time.time() - pause_start
                if stop.agreed(step) and not is_last:
                    check_halted(jax.device_get(_health(state)))
                    if ckpt.latest_step() != step:
                        ckpt.save(step, state, data_state, config)
                    ckpt.wait()
                    status = "preempted"
                    log(
                        f"Stopped by signal {stop.signum} after step {step}; checkpoint saved in "
                        f"{ckpt.directory}. Run the same command again to resume."
                    )
                    break

    if not last_eval and jax.process_index() == 0:
        # Nothing evaluated in this call (a finished run started again): its last figure.
        logged = read_metrics(workdir, "eval_valid")
        last_eval = logged[-1] if logged else {}
    return {
        "status": status,
        "step": step,
        "steps_run": step - first_step,
        "train": last_train,
        "eval": last_eval,
        "workdir": str(workdir),
        "checkpoints": str(ckpt.directory),
        "metrics": str(writer.jsonl_path),
        "train_step_compilations": compiles.count(),
    }


def drop_metrics_after(path: Path, step: int) -> int:
    """Removes the records of steps after ``step`` from ``metrics.jsonl``; returns how many.

    A run killed between checkpoints has logged steps that the resumed run repeats;
    without this, those steps would appear twice with different wall times.
    """
    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the kill
        if record_step <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)  # atomic: a kill now leaves the old or the new file, whole
    return len(lines) - len(kept)


def _report_skipped_files(*sources: data_lib.ByteSource) -> None:
    """Says how many input files were unreadable and skipped (each also warned about)."""
    skipped = [p for src in sources for p, _ in src.meta.get("skipped_files", [])]
    if skipped:
        names = ", ".join(Path(p).name for p in skipped[:5])
        log(
            f"Skipped {len(skipped)} unreadable input file(s): {names}"
            f"{', ...' if len(skipped) > 5 else ''}."
        )


def _health(state: TrainState) -> dict:
    return {"halted_at": state.halted_at, "skipped_in_a_row": state.skipped_in_a_row}


def accumulation_batch(local: np.ndarray, accum: int) -> np.ndarray:
    """This host's rows of one step, shaped [accum, rows // accum, T] for accumulation."""
    return local.reshape(accum, local.shape[0] // accum, local.shape[1])
