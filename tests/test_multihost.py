"""Multi-process training on one machine: 2 JAX processes over localhost, CPU only.

Each process is what a host of a real cluster runs: ``scripts/train.py`` joined through
``jax.distributed.initialize`` (coordinator address, process count and id on the
command line), reading only its own rows of every global batch. The run must train
exactly like one process holding the whole global batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO_ROOT, xla_flags
from sparse_lm.metrics import read_metrics

NUM_PROCESSES = 2
LOCAL_DEVICES = 2  # per process: 4 devices in all, so each process feeds two shards
STEPS = 3
# Generous for 2 shared CPU cores; a hung collective must not hang CI for longer.
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = {
        k: v for k, v in os.environ.items()
        # A cluster's own settings in the CI environment must not leak into these runs.
        if not k.startswith(("SPARSE_LM_COORDINATOR", "SPARSE_LM_NUM_PROCESSES",
                             "SPARSE_LM_PROCESS_ID", "JAX_COORDINATOR", "SLURM_"))
    }
    env.update(
        XLA_FLAGS=xla_flags(devices),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(REPO_ROOT),
    )
    return env


def _run_together(commands: list[list[str]], env: dict, logs: Path) -> list[str]:
    """Starts every command at once and waits for all; on any failure or timeout kills
    the rest (a process whose peer died would otherwise wait in a collective) and
    fails with the logs."""
    logs.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    for i, cmd in enumerate(commands):
        f = (logs / f"process_{i}.log").open("w+")
        files.append(f)
        procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT))
    deadline = time.monotonic() + TIMEOUT_S
    failed = None
    try:
        while any(p.poll() is None for p in procs):
            bad = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if bad:
                failed = f"process {bad[0]} exited with {procs[bad[0]].returncode}"
                break
            if time.monotonic() > deadline:
                failed = f"timed out after {TIMEOUT_S} s"
                break
            time.sleep(0.2)
        else:
            bad = [i for i, p in enumerate(procs) if p.returncode != 0]
            if bad:
                failed = f"process {bad[0]} exited with {procs[bad[0]].returncode}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    outputs = []
    for f in files:
        f.seek(0)
        outputs.append(f.read())
        f.close()
    if failed:
        tails = "\n".join(f"--- process {i} ---\n{out[-4000:]}" for i, out in enumerate(outputs))
        pytest.fail(f"multi-process run failed: {failed}\n{tails}")
    return outputs


def _train_command(data: Path, workdir: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable, str(REPO_ROOT / "scripts" / "train.py"),
        "--config", str(REPO_ROOT / "configs" / "enwik8.py") + ":smoke",
        "--workdir", str(workdir),
        f"--config.data.path={data / 'text' / 'enwik8_first_1MB.xml'}",
        f"--config.train.num_steps={STEPS}",
        "--config.train.log_every=1",
        "--config.train.eval_every=0",
        "--config.train.eval_max_batches=1",
        "--config.train.checkpoint_every=100",
        "--config.train.async_checkpoint=False",
        # data and fsdp both span the two processes: batch rows and parameter shards
        # cross the process boundary.
        "--config.mesh.data=2",
        "--config.mesh.fsdp=2",
        *extra,
    ]


def _distributed_flags(port: int, i: int) -> list[str]:
    return ["--coordinator_address", f"127.0.0.1:{port}",
            "--num_processes", str(NUM_PROCESSES), "--process_id", str(i)]


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, shared_data):
    total = NUM_PROCESSES * LOCAL_DEVICES
    _run_together(
        [_train_command(shared_data, tmp_path / "one", [])], _env(total), tmp_path / "logs_one"
    )
    port = _free_port()
    outputs = _run_together(
        [_train_command(shared_data, tmp_path / "multi", _distributed_flags(port, i))
         for i in range(NUM_PROCESSES)],
        _env(LOCAL_DEVICES),
        tmp_path / "logs_multi",
    )
    # One 4-device run, not two independent 2-device runs (only process 0 logs this).
    assert f"on {total} cpu device(s)" in outputs[0], outputs[0][-2000:]

    one = read_metrics(tmp_path / "one", "train")
    multi = read_metrics(tmp_path / "multi", "train")
    assert [r["step"] for r in one] == [r["step"] for r in multi] == list(range(1, STEPS + 1))
    np.testing.assert_allclose(
        [r["loss"] for r in multi], [r["loss"] for r in one], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        [r["grad_norm"] for r in multi], [r["grad_norm"] for r in one], rtol=1e-5, atol=1e-5
    )
    # Training moved: equal losses are not equal because nothing happened.
    assert one[-1]["loss"] != one[0]["loss"]
    # The joint checkpoint records the position in the global batch stream (3 steps of
    # 8 rows), not one host's share: the same state one process saves.
    saved = [json.loads((tmp_path / run / "checkpoints" / str(STEPS) / "data" / "metadata").read_text())
             for run in ("one", "multi")]
    assert saved[0] == saved[1] and saved[1]["position"] == STEPS * 8


_BATCH_CHECK = """
import json, sys
import numpy as np
from sparse_lm import distributed
distributed.initialize("127.0.0.1:{port}", {n}, int(sys.argv[1]))
import jax
from jax.experimental import multihost_utils
from tests.helpers import smoke_config
from pathlib import Path
from sparse_lm import data as data_lib, sharding
from sparse_lm.prefetch import DevicePrefetcher

cfg = smoke_config("enwik8", Path({data!r}), **{{"mesh.data": 2, "mesh.fsdp": 2}})
mesh = sharding.make_mesh(cfg.mesh)
source = data_lib.load_split(cfg.data, "train")
mine = data_lib.TrainIterator(source, cfg.data.batch_size, cfg.seed)
alone = data_lib.TrainIterator(source, cfg.data.batch_size, cfg.seed, process_index=0, process_count=1)
# The same stream again through the device prefetcher: its background thread builds the
# global arrays from this process's rows while the main thread runs collectives.
ahead = DevicePrefetcher(
    data_lib.TrainIterator(source, cfg.data.batch_size, cfg.seed),
    lambda b: sharding.global_batch(b[None], mesh, extra_leading=1), size=2,
)
same, same_prefetched, local_rows = [], [], []
for _ in range(3):
    local = next(mine)[None]  # [accum=1, rows, T], as the train step takes it
    local_rows.append(local.shape[1])
    glob = sharding.global_batch(local, mesh, extra_leading=1)
    want = next(alone)[None]
    # Every row of the global array, gathered back to each host, against one process's batch.
    gathered = multihost_utils.process_allgather(glob, tiled=True)
    same.append(bool(np.array_equal(np.asarray(gathered), want)))
    placed, state = next(ahead)
    gathered = multihost_utils.process_allgather(placed, tiled=True)
    same_prefetched.append(bool(np.array_equal(np.asarray(gathered), want))
                           and state == alone.get_state())
ahead.close()
print(json.dumps({{"process": jax.process_index(), "count": jax.process_count(),
                  "local_rows": local_rows, "same": same, "same_prefetched": same_prefetched,
                  "state": mine.get_state()["position"], "alone": alone.get_state()["position"]}}))
"""


def test_each_process_reads_its_own_shard_of_the_one_process_global_batch(tmp_path, shared_data):
    port = _free_port()
    code = _BATCH_CHECK.format(port=port, n=NUM_PROCESSES, data=str(shared_data))
    outputs = _run_together(
        [[sys.executable, "-c", code, str(i)] for i in range(NUM_PROCESSES)],
        _env(LOCAL_DEVICES),
        tmp_path / "logs",
    )
    # JAX may log after the result (its shutdown at exit), so look for the line itself.
    results = [json.loads([ln for ln in out.splitlines() if ln.startswith('{"process"')][-1])
               for out in outputs]
    assert sorted(r["process"] for r in results) == list(range(NUM_PROCESSES))
    for r in results:
        assert r["count"] == NUM_PROCESSES
        assert r["local_rows"] == [8 // NUM_PROCESSES] * 3  # smoke batch 8, half each
        assert r["same"] == [True, True, True], r
        assert r["same_prefetched"] == [True, True, True], r
        assert r["state"] == r["alone"]  # the position counts global rows on every host
