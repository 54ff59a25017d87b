"""Sparse attention on TPU: JAX's splash attention driven by our patterns.

Splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) is a Pallas
TPU flash-attention kernel whose grid skips every (query block, key block) tile that
its mask marks empty, and which applies the mask element-wise only in partially
allowed tiles. We use it as a library: this module only turns a ``LayerPattern``
into splash masks and adapts shapes, scaling and the empty-row convention.

* Masks. ``PatternMask`` is a splash ``_ComputableMask`` whose mask function is the
  union of the head's ``Component.allowed`` rules. Splash evaluates it tile by tile
  while it builds its block-sparse schedule (it never asks for the whole T x T mask
  at once), and when a layer has a single distinct head mask (dense, local, strided
  merged/interleaved, fixed without distinct summaries) the kernel evaluates the
  same function on iota indices inside the kernel instead of loading mask tiles.
  Layers whose heads differ (multihead, distinct summaries) fall back to splash's
  stored partial tiles, which it deduplicates; our patterns are periodic, so few
  distinct tiles exist.
* Scale. Splash does not scale logits; we multiply q by 1/sqrt(D) as the reference does.
* Layout. Splash takes one sequence, [H, T, D]; we transpose [B, T, H, D] and vmap
  over B.
* Empty allowed sets. The fixed pattern's summary component (A2 alone) gives the
  first ``l - c - offset`` queries no key. Splash uses a finite mask value, so such
  a row averages v uniformly over the tiles it visits, or divides 0 by 0 (NaN) when
  its whole query tile is skipped. The reference gives zero. We add the diagonal
  (i, i) to exactly those rows, so that splash sees a well-posed softmax everywhere,
  and then zero those rows' outputs. Their cotangent is then zero, so they add
  exactly nothing to dq, dk or dv.

``shard_attention`` composes the kernel with a device mesh: a Pallas call cannot be
partitioned by XLA, so the kernel runs under ``jax.shard_map`` with the batch split
over the data axes and the heads over the tensor axis. ``attention`` does this by
itself when given ``mesh=`` or when traced under ``jax.set_mesh(mesh)`` (so the
model's plain ``attention(..., impl="pallas_tpu")`` call composes with a train step
jitted under that mesh); inside a ``shard_map`` it runs on the local shard as is.

Verified only in Pallas TPU interpret mode on CPU (see docs/tpu.md).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash_kernel,
)
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as splash_mask,
)
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sparse_lm.attention.patterns import Component, HeadPattern, LayerPattern, PatternError

# Splash tiles keys in units of the TPU's 128 vector lanes: every block size must be
# a multiple of it, so the sequence length must be too.
LANES = 128
# Default tile sizes tried largest first; 512 amortises the per-tile overhead on TPU
# while keeping the f32 score tile (512 x 512 x 4 B = 1 MiB) well inside VMEM.
_DEFAULT_BLOCKS = (512, 256, 128)
_DTYPES = (jnp.float32, jnp.bfloat16)


def first_nonempty_row(head: HeadPattern) -> int:
    """The first query position whose allowed set under ``head`` is non-empty.

    Every query before it has an empty allowed set and every query from it on has a
    non-empty one. ``causal``, ``local``, ``stride`` and ``block`` always allow the
    diagonal (j = i), so they are non-empty from row 0; ``summary(l, c, o)`` first
    allows key ``l - c - o`` (the start of the first summary sub-block), so rows
    before it are empty and every later row can read that key.
    """
    first = None
    for comp in head:
        if comp.kind in ("causal", "local", "stride", "block"):
            row = 0
        elif comp.kind == "summary":
            row = comp.l - comp.c - comp.offset
        else:
            raise PatternError(f"unknown component kind {comp.kind!r}")
        first = row if first is None else min(first, row)
    if first is None:
        raise PatternError("a head pattern needs at least one component")
    return max(first, 0)


class PatternMask(splash_mask._ComputableMask):
    """One head's allowed set as a splash mask, computed from ``Component.allowed``.

    The mask function must work both on numpy index arrays (splash's schedule
    building) and on traced int32 arrays (inside the kernel), which
    ``Component.allowed`` does since it uses only comparisons, ``%``, ``//`` and ``&``.

    Rows before ``first_nonempty_row(head)`` also get their diagonal (see the module
    docstring); the caller must zero those rows' outputs.
    """

    def __init__(self, head: HeadPattern, seq_len: int, shard_count: int = 1) -> None:
        self.head = tuple(head)
        self.empty_rows = min(first_nonempty_row(self.head), seq_len)
        components: tuple[Component, ...] = self.head
        empty_rows = self.empty_rows

        def mask_function(q_ids: Any, kv_ids: Any) -> Any:
            allowed = components[0].allowed(q_ids, kv_ids)
            for comp in components[1:]:
                allowed = allowed | comp.allowed(q_ids, kv_ids)
            if empty_rows:
                # Only rows that have no key at all get the diagonal, so the
                # softmax of every other row is untouched.
                allowed = allowed | ((q_ids == kv_ids) & (q_ids < empty_rows))
            return allowed

        super().__init__((seq_len, seq_len), mask_function, shard_count=shard_count)

    # Splash deduplicates head masks through hashing; two heads with the same
    # components over the same length are the same mask.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PatternMask):
            return NotImplemented
        return self.head == other.head and self.shape == other.shape

    def __hash__(self) -> int:
        return hash((PatternMask, self.head, self.shape))


Interpret = bool | str | pltpu.InterpretParams | None


def _resolve_interpret(interpret: Interpret) -> Any:
    """What splash's ``interpret`` argument should be.

    None: the TPU interpreter unless the backend is TPU (then the real kernel).
    True: the Pallas *TPU* interpreter (``pltpu.InterpretParams()``), which simulates
    the TPU's memory spaces, scalar prefetch and DMAs on CPU; a ``pltpu.InterpretParams``
    is passed through. ``"hlo"``: Pallas's generic interpreter (``interpret=True`` in
    ``pallas_call``), which checks less but, unlike the TPU interpreter, accepts a
    vmapped kernel; the tests use it to check the vmap batching used on hardware.
    """
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    if interpret is True:
        return pltpu.InterpretParams()
    if interpret == "hlo":
        return True
    if interpret is False or isinstance(interpret, pltpu.InterpretParams):
        return interpret
    raise PatternError(
        f"interpret={interpret!r}: use None, True, False, 'hlo' or a pltpu.InterpretParams"
    )


def _default_block(seq_len: int) -> int:
    for block in _DEFAULT_BLOCKS:
        if seq_len % block == 0:
            return block
    return LANES  # unreachable once seq_len % LANES == 0 has been checked


def _check_block(name: str, block: int, seq_len: int) -> None:
    if block <= 0 or block % LANES:
        raise PatternError(
            f"{name}={block} must be a positive multiple of {LANES} (the TPU lane "
            "width splash attention tiles by)."
        )
    if seq_len % block:
        raise PatternError(
            f"{name}={block} must divide the sequence length T={seq_len}; choose a "
            f"block among the multiples of {LANES} that divide T."
        )


def _block_sizes(seq_len: int, block_q: int | None, block_kv: int | None) -> tuple[int, int]:
    if seq_len % LANES:
        raise PatternError(
            f"pallas_tpu attention needs the sequence length to be a multiple of {LANES} "
            f"(splash attention's tile unit), got T={seq_len}; pad the sequence to "
            f"{-(-seq_len // LANES) * LANES} or use impl='reference'."
        )
    block_q = _default_block(seq_len) if block_q is None else block_q
    block_kv = _default_block(seq_len) if block_kv is None else block_kv
    _check_block("block_q", block_q, seq_len)
    _check_block("block_kv", block_kv, seq_len)
    return block_q, block_kv


def _check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, pattern: LayerPattern) -> None:
    if q.ndim != 4:
        raise PatternError(f"q, k, v must be [B, T, H, D]; got q of shape {q.shape}")
    if k.shape != q.shape or v.shape != q.shape:
        raise PatternError(
            "pallas_tpu attention needs q, k and v of one shape [B, T, H, D] (self-attention, "
            f"same head dim); got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if len(pattern) != q.shape[2]:
        raise PatternError(f"pattern has {len(pattern)} heads but q has {q.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise PatternError(
            f"pallas_tpu attention takes float32 or bfloat16 q, k, v of one dtype; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )


@functools.lru_cache(maxsize=64)
def _make_kernel(
    pattern: LayerPattern,
    seq_len: int,
    block_q: int,
    block_kv: int,
    interpret: Any,
    head_shards: int,
) -> tuple[splash_kernel.SplashAttentionKernel, np.ndarray]:
    """The splash kernel for ``pattern`` at ``seq_len``, and the [T, H] keep mask.

    Cached: building splash's block schedule walks every tile of every distinct head
    mask in numpy, and a fresh kernel would also carry a fresh mask function, which
    would make jit retrace on every call.
    """
    masks = [PatternMask(head, seq_len) for head in pattern]
    block_sizes = splash_kernel.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_kv_compute=block_kv,
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv,
        block_q_dq=block_q,
        block_kv_dq=block_kv,
    )
    # Splash turns its numpy schedule into jnp arrays. Built under a jit trace those
    # would be tracers, and caching them would leak them into later traces; compile-
    # time evaluation makes them concrete constants.
    with jax.ensure_compile_time_eval():
        kernel = splash_kernel.make_splash_mha(
            splash_mask.MultiHeadMask(masks),
            block_sizes=block_sizes,
            head_shards=head_shards,
            q_seq_shards=1,
            interpret=interpret,
        )
    rows = np.arange(seq_len)[:, None]
    keep = rows >= np.array([m.empty_rows for m in masks])[None, :]  # [T, H]
    return kernel, keep


def _run_kernel(
    kernel: splash_kernel.SplashAttentionKernel,
    keep: jax.Array | np.ndarray | None,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
) -> jax.Array:
    """Apply a built kernel to [B, T, H, D] arrays (the heads the kernel was built for)."""
    scale = q.shape[-1] ** -0.5
    # Splash has no scale argument, so fold 1/sqrt(D) into q: computed in float32 and
    # rounded once. For bf16 that one rounding is the only difference from the
    # reference (which scales float32 scores); it is exact when 1/sqrt(D) is a power
    # of two (D = 64) and a 2^-9 relative perturbation otherwise.
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    to_heads = lambda x: jnp.swapaxes(x, 1, 2)  # [B, T, H, D] -> [B, H, T, D]
    qkv = (to_heads(q), to_heads(k), to_heads(v))
    if isinstance(kernel.kwargs["interpret"], pltpu.InterpretParams):
        # The TPU interpreter (jax 0.11.2) rejects a vmapped pallas_call: vmap adds a
        # grid axis but the interpreter zips the grid with the kernel's unextended
        # dimension_semantics and fails. Run the sequences one after another instead;
        # each is the same kernel call as under vmap.
        out = jax.lax.map(lambda x: kernel(*x), qkv)
    else:
        # Hardware (and the generic interpreter): vmap, which Mosaic lowers to one
        # extra parallel grid axis, so the whole batch is one kernel launch.
        out = jax.vmap(kernel)(*qkv)
    out = jnp.swapaxes(out, 1, 2)
    if keep is not None:
        out = jnp.where(jnp.asarray(keep)[None, :, :, None], out, jnp.zeros((), out.dtype))
    return out


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    pattern: LayerPattern,
    *,
    interpret: Interpret = None,
    block_q: int | None = None,
    block_kv: int | None = None,
    mesh: Mesh | AbstractMesh | None = None,
    batch_axes: Sequence[str] = ("data", "fsdp"),
    head_axis: str | None = "tensor",
) -> jax.Array:
    """Causal sparse attention through splash attention. q, k, v: [B, T, H, D].

    Differentiable in q, k and v (splash's own backward kernels). Matches
    ``reference_attention``: logits scaled by 1/sqrt(D), a query with an empty allowed
    set gets zeros.

    Args:
      pattern: one entry per head (``PatternSpec.layer_pattern``).
      interpret: None runs the Pallas TPU interpreter unless the backend is TPU;
        True forces it; a ``pltpu.InterpretParams`` is passed through; "hlo" uses
        Pallas's generic interpreter (see ``_resolve_interpret``).
      block_q, block_kv: tile sizes, multiples of 128 dividing T (default: the
        largest of 512, 256, 128 that divides T). Used for forward and backward.
      mesh: run under ``shard_map`` over ``mesh`` (see ``shard_attention``); q, k, v
        are then global arrays. Default: the mesh set by ``jax.set_mesh`` if it has
        more than one device and we are not already inside a ``shard_map``.
      batch_axes, head_axis: mesh axes for the batch and head dims when ``mesh`` is set.

    Raises:
      PatternError: T or a block size breaks splash's tiling constraints, or the
        shapes, dtypes or head count do not fit.
    """
    if mesh is None:
        mesh = _ambient_mesh()
    if mesh is not None:
        fn = shard_attention(
            mesh,
            pattern,
            batch_axes=batch_axes,
            head_axis=head_axis,
            interpret=interpret,
            block_q=block_q,
            block_kv=block_kv,
        )
        return fn(q, k, v)
    _check_inputs(q, k, v, pattern)
    block_q, block_kv = _block_sizes(q.shape[1], block_q, block_kv)
    kernel, keep = _make_kernel(
        tuple(pattern), q.shape[1], block_q, block_kv, _resolve_interpret(interpret), 1
    )
    return _run_kernel(kernel, None if keep.all() else keep, q, k, v)


def _ambient_mesh() -> AbstractMesh | None:
    """The mesh of ``jax.set_mesh`` to shard over, or None to run as is.

    None when no mesh is set, when it has one device, or when some axis is already
    manual (we are inside a shard_map and q, k, v are local shards).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
        return None
    return mesh


def shard_attention(
    mesh: Mesh | AbstractMesh,
    pattern: LayerPattern,
    *,
    batch_axes: Sequence[str] = ("data", "fsdp"),
    head_axis: str | None = "tensor",
    interpret: Interpret = None,
    block_q: int | None = None,
    block_kv: int | None = None,
) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """Attention over global [B, T, H, D] arrays laid out on ``mesh``.

    Returns ``fn(q, k, v) -> out``, usable inside the jitted, sharded train step. XLA
    cannot partition a Pallas call, so the kernel runs under ``jax.shard_map``: the
    batch dim is split over ``batch_axes`` (those present in the mesh; e.g. data and
    fsdp), the head dim over ``head_axis`` (tensor), and T and D stay whole on every
    device, since splash does not split the key sequence. Splash builds its schedule
    for all heads with ``head_shards`` = the tensor-axis size and the kernel's
    schedule arrays are themselves sharded over heads, so each device runs exactly
    its own heads' masks, whatever the combine mode. ``mesh`` may be a concrete mesh
    or the abstract one that ``jax.sharding.get_abstract_mesh()`` gives inside jit.

    Raises:
      PatternError: B is not divisible by the batch-axes size or H by the head-axis size.
    """
    names = set(mesh.axis_names)
    batch = tuple(a for a in batch_axes if a in names)
    heads = head_axis if head_axis is not None and head_axis in names else None
    batch_shards = math.prod(mesh.shape[a] for a in batch)
    head_shards = mesh.shape[heads] if heads is not None else 1
    if len(pattern) % head_shards:
        raise PatternError(
            f"{len(pattern)} heads cannot be split over mesh axis {heads!r} of size "
            f"{head_shards}; choose a tensor-parallel size that divides the head count."
        )
    interp = _resolve_interpret(interpret)
    data_spec = P(batch or None, None, heads, None)

    def fn(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        _check_inputs(q, k, v, pattern)
        if q.shape[0] % batch_shards:
            raise PatternError(
                f"batch size {q.shape[0]} is not divisible by the {batch_shards} devices "
                f"of mesh axes {batch}; choose a (per-step) batch size they divide."
            )
        bq, bkv = _block_sizes(q.shape[1], block_q, block_kv)
        kernel, keep = _make_kernel(tuple(pattern), q.shape[1], bq, bkv, interp, head_shards)
        # The kernel is a pytree of schedule arrays with a head axis; splash tells us
        # how to shard them so that each device holds its own heads' schedule.
        kernel_spec = kernel.manual_sharding_spec(NamedSharding(mesh, P(heads, None)))

        def local(kernel_shard, keep_shard, q, k, v):
            return _run_kernel(kernel_shard, keep_shard, q, k, v)

        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(kernel_spec, P(None, heads), data_spec, data_spec, data_spec),
            out_specs=data_spec,
            # Splash declares its outputs with plain ShapeDtypeStructs (no
            # varying-axes annotation), which shard_map's check_vma rejects.
            check_vma=False,
        )(kernel, jnp.asarray(keep), q, k, v)

    return fn


__all__ = ["LANES", "PatternMask", "attention", "first_nonempty_row", "shard_attention"]
