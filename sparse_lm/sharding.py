"""Device mesh and the rules that place parameters, optimizer state and batches on it.

The mesh has three axes: ``data`` (pure data parallelism: parameters replicated),
``fsdp`` (data parallelism with parameters and optimizer state sharded along their
``embed`` dimension) and ``tensor`` (heads, feed-forward and vocabulary dimensions
split across devices). Parameters carry *logical* axis names (see model.py); the
table below is the one place that maps them to mesh axes.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# Batch rows are split over every data-parallel axis.
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES: dict[str, str | None] = {
    "embed": "fsdp",
    "vocab": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "head_dim": None,
    "pos": None,
    # The stacking axis of scanned layers (model.scan_layers): each device holds every
    # layer's slice of its shard, as the scan reads one layer at a time.
    "layers": None,
}


class MeshError(ValueError):
    """The requested mesh does not fit the devices; the message says how to fix it."""


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 entries of (data, fsdp, tensor) and checks the product."""
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    for name, size in zip(MESH_AXES, sizes):
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
            raise MeshError(f"config.mesh.{name}={size!r}: each axis size must be a whole number "
                            ">= 1, or -1 for the devices the other axes leave.")
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise MeshError("at most one of config.mesh.data/fsdp/tensor may be -1.")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % fixed:
            raise MeshError(
                f"{num_devices} devices cannot be split with mesh {tuple(sizes)}: the fixed "
                f"axes' product {fixed} must divide the device count."
            )
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise MeshError(
            f"config.mesh (data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}) uses "
            f"{math.prod(sizes)} devices but {num_devices} are present; set one axis to -1 "
            "to take the rest."
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over ``devices`` (default: all devices of all hosts).

    Axes are ``Auto``: shardings are given on parameters and batches and the compiler
    propagates them through the model, which needs no sharding annotations of its own.
    """
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_mesh(names: tuple | P | None, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Mesh PartitionSpec for an array whose dimensions carry logical ``names``.

    A dimension whose size the mesh axis does not divide stays replicated: correct
    everywhere, and only small arrays (biases, norms) are affected in practice.
    """
    if names is None:
        return P()
    spec = []
    used: set[str] = set()
    for dim, name in zip(shape, tuple(names)):
        axis = LOGICAL_RULES.get(name) if name is not None else None
        if name is not None and name not in LOGICAL_RULES:
            raise MeshError(f"logical axis {name!r} has no rule in sharding.LOGICAL_RULES.")
        if axis is None or axis in used or dim % mesh.shape[axis]:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return P(*spec)


def tree_shardings(tree: Any, logical_specs: Any, mesh: Mesh) -> Any:
    """NamedShardings for every leaf of ``tree``, given matching logical PartitionSpecs."""

    def one(leaf, names):
        return NamedSharding(mesh, logical_to_mesh(names, np.shape(leaf), mesh))

    return jax.tree.map(one, tree, logical_specs, is_leaf=lambda x: x is None)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree``'s leaves carrying ``shardings``: a target to restore
    or compile for, without allocating anything."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, extra_leading: int = 0) -> NamedSharding:
    """Rows over (data, fsdp); ``extra_leading`` unsharded dims before them (accumulation)."""
    return NamedSharding(mesh, P(*([None] * extra_leading), BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_host_rows(mesh: Mesh, global_rows: int, extra_leading: int = 0,
                    process_of=lambda device: device.process_index) -> None:
    """Raises MeshError unless every host's devices hold exactly the block of batch rows
    that host reads: the data pipeline gives process p rows [p * L, (p + 1) * L) of each
    global batch of ``global_rows`` (L = global_rows / processes). A mesh whose batch
    axes have fewer shards than there are hosts (say data=1, tensor over two hosts)
    would otherwise make an array whose "replicated" rows differ from host to host, and
    train on it without an error. ``process_of``: a device's host (tests simulate
    several)."""
    sharding = batch_sharding(mesh, extra_leading)
    shape = (1,) * extra_leading + (global_rows,)
    held: dict[int, set[tuple[int, int]]] = {}
    for device, index in sharding.devices_indices_map(shape).items():
        rows = index[extra_leading]
        held.setdefault(process_of(device), set()).add(
            (rows.start or 0, global_rows if rows.stop is None else rows.stop))
    n = len(held)
    per_host = global_rows // n
    for p, blocks in sorted(held.items()):
        want = (p * per_host, (p + 1) * per_host)
        lo, hi = min(b[0] for b in blocks), max(b[1] for b in blocks)
        covered = sum(b - a for a, b in blocks)
        if global_rows % n or (lo, hi) != want or covered != hi - lo:
            raise MeshError(
                f"config.mesh (data={mesh.shape['data']}, fsdp={mesh.shape['fsdp']}, "
                f"tensor={mesh.shape['tensor']}) over {n} hosts: host {p}'s devices hold batch "
                f"rows {sorted(blocks)} of {global_rows}, but each host reads its own "
                f"{per_host}-row block. Make data * fsdp a multiple of the host count and keep "
                "the tensor axis within a host (mesh.tensor at most the devices per host).")


def global_batch(local: np.ndarray, mesh: Mesh, extra_leading: int = 0) -> jax.Array:
    """Builds the global batch array from this host's rows (the data shard it read)."""
    if jax.process_count() > 1:
        _check_host_rows_once(mesh, local.shape[extra_leading] * jax.process_count(), extra_leading)
    sharding = batch_sharding(mesh, extra_leading)
    return jax.make_array_from_process_local_data(sharding, local)


@functools.lru_cache(maxsize=16)
def _check_host_rows_once(mesh: Mesh, global_rows: int, extra_leading: int) -> None:
    check_host_rows(mesh, global_rows, extra_leading)
