"""Multi-process start-up: one call to ``jax.distributed.initialize`` before any JAX work.

Two ways in, both JAX's own runtime:

* explicit: a coordinator address (``host:port`` of process 0), the process count and
  this process's id, from flags or ``SPARSE_LM_COORDINATOR`` /
  ``SPARSE_LM_NUM_PROCESSES`` / ``SPARSE_LM_PROCESS_ID``;
* automatic: ``jax.distributed.initialize()`` with no arguments, which JAX fills in
  on the clusters it knows (SLURM, Open MPI, Cloud TPU pods, Kubernetes Jobs with the
  ``kubernetes`` package installed).

With neither, nothing happens and the run is single-process.
"""

from __future__ import annotations

import os

# JAX reads this itself at start-up; we only avoid overriding a user's choice (e.g. mpi).
_CPU_COLLECTIVES_ENV = "JAX_CPU_COLLECTIVES_IMPLEMENTATION"


class DistributedSetupError(ValueError):
    """The multi-process arguments are incomplete or inconsistent."""


def initialize(
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    *,
    auto: bool = False,
) -> bool:
    """Joins the multi-process run described by the arguments; returns whether it did.

    ``coordinator_address`` non-empty: explicit mode, ``num_processes >= 1`` and
    ``0 <= process_id < num_processes`` are required. Otherwise ``auto`` asks JAX to
    detect the cluster. Must run before anything touches a JAX backend, because the
    device list of every process is fixed when the backend starts.
    """
    import jax

    if coordinator_address:
        if num_processes < 1 or process_id < 0:
            raise DistributedSetupError(
                "--coordinator_address needs --num_processes and --process_id (or the "
                "SPARSE_LM_NUM_PROCESSES and SPARSE_LM_PROCESS_ID environment variables)."
            )
        if process_id >= num_processes:
            raise DistributedSetupError(
                f"--process_id={process_id} must be below --num_processes={num_processes} "
                "(ids run 0 .. num_processes - 1)."
            )
        if ":" not in coordinator_address:
            raise DistributedSetupError(
                f"--coordinator_address={coordinator_address!r} needs a port: host:port of "
                "process 0, the same on every process."
            )
        _use_cpu_collectives(jax)
        # Cluster detection off: given the three values, JAX would still detect SLURM
        # and take SLURM_LOCALID as this process's only device, so one task per node
        # would use one GPU of eight. Each process uses every device it sees (restrict
        # them with CUDA_VISIBLE_DEVICES, or JAX_LOCAL_DEVICE_IDS, which JAX reads).
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            cluster_detection_method="deactivate",
        )
        return True
    if auto:
        _use_cpu_collectives(jax)
        jax.distributed.initialize()
        return True
    return False


def _use_cpu_collectives(jax_module) -> None:
    """Cross-process collectives for the CPU backend (CPU-only runs and CI).

    Without a collectives implementation the CPU client of a multi-process run cannot
    run an all-reduce across processes, so a sharded train step fails. Gloo over TCP
    needs nothing beyond the coordinator JAX already connects to. It is JAX 0.11's
    default too; setting it here keeps CPU multi-process runs working if that default
    changes, while a value the user chose in the environment (mpi) wins. GPU and TPU
    backends use their own collectives and ignore this setting.
    """
    if os.environ.get(_CPU_COLLECTIVES_ENV):
        return
    jax_module.config.update("jax_cpu_collectives_implementation", "gloo")


def process_summary() -> str:
    """One line naming this process's place in the run, for logs."""
    import jax

    return (
        f"process {jax.process_index()} of {jax.process_count()}: "
        f"{jax.local_device_count()} local / {jax.device_count()} global "
        f"{jax.devices()[0].platform} device(s)"
    )
