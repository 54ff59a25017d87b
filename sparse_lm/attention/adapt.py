"""Adapting kernel calls to what the model and the mesh give them.

Two gaps between the model and a fused kernel are closed here, once for every kernel:

* Head sizes. With the paper's half-size query/key projections (CIFAR-10), q and k
  have a smaller head dim than v, while the kernels take one D for all three. q and k
  are zero-padded to v's D, which leaves every q.k product unchanged, and q is
  rescaled so that the kernel's 1/sqrt(D_v) becomes the intended 1/sqrt(D_qk).
* Sharding. XLA cannot partition a Pallas call. Under a multi-device mesh (set with
  ``jax.set_mesh`` around the jitted step) the kernel runs under ``jax.shard_map``:
  batch split over the data-parallel axes, heads over ``tensor`` when every tensor
  shard has the same heads' pattern (the kernel's layout is static, traced once for
  all shards), otherwise heads stay whole on each device.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sparse_lm.attention.patterns import LayerPattern

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"

KernelFn = Callable[..., jax.Array]


def equalize_head_dims(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """q, k zero-padded to v's head dim, q rescaled to keep the 1/sqrt(D_qk) softmax scale."""
    d_qk, d_v = q.shape[-1], v.shape[-1]
    if d_qk == d_v:
        return q, k
    if d_qk > d_v:
        raise ValueError(f"query/key head dim {d_qk} larger than the value head dim {d_v}.")
    pad = [(0, 0)] * (q.ndim - 1) + [(0, d_v - d_qk)]
    q = (q * jnp.asarray(math.sqrt(d_v / d_qk), q.dtype)).astype(q.dtype)
    return jnp.pad(q, pad), jnp.pad(k, pad)


def ambient_mesh() -> jax.sharding.AbstractMesh | None:
    """The multi-device mesh set by ``jax.set_mesh``, unless we already run per shard."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
        return None
    return mesh


def head_shards(pattern: LayerPattern, mesh) -> int:
    """How many ways the heads can be split: the tensor axis if its shards agree."""
    n = mesh.shape.get(HEAD_AXIS, 1) if HEAD_AXIS in mesh.axis_names else 1
    if n == 1 or len(pattern) % n:
        return 1
    per = len(pattern) // n
    first = tuple(pattern[:per])
    if all(tuple(pattern[i * per : (i + 1) * per]) == first for i in range(n)):
        return n
    return 1


def batch_split(mesh, rows: int) -> tuple[str, ...]:
    """The data-parallel axes of ``mesh`` (those of size > 1) that split a batch of
    ``rows``, or () where they cannot split it evenly (e.g. sampling one sequence):
    then every device takes the whole batch."""
    batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    return batch if rows % math.prod(mesh.shape[a] for a in batch) == 0 else ()


def run_sharded(kernel: KernelFn, q, k, v, pattern: LayerPattern, mesh, **options) -> jax.Array:
    """``kernel(q, k, v, pattern, **options)`` under shard_map over ``mesh``."""
    batch = batch_split(mesh, q.shape[0])
    shards = head_shards(pattern, mesh)
    heads = HEAD_AXIS if shards > 1 else None
    local_pattern = tuple(pattern[: len(pattern) // shards])
    spec = P(batch or None, None, heads, None)

    def local(q, k, v):
        return kernel(q, k, v, local_pattern, **options)

    return jax.shard_map(
        local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
        # Pallas outputs carry no varying-axes annotation, which check_vma would reject.
        check_vma=False,
    )(q, k, v)
