"""XLA-side glue shared by the GPU kernels: a part's row order, its gathered keys, and
the exact merge of disjoint parts.

A part of a head's allowed set (``layout.PartLayout``) is computed in one of two query
orders: natural, or strided (the sequence viewed as [T/l, l] and transposed, so that a
strided column is contiguous). Its keys are either the queries' own order or the
summary columns of the fixed pattern, gathered. Parts of one head are disjoint, so the
softmax over their union follows exactly from each part's (o, lse).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparse_lm.attention.layout import PAD_POSITION, PartLayout


def to_order(x: jax.Array, part: PartLayout, axis: int) -> jax.Array:
    """Rows of x (along ``axis``) in the part's query order."""
    if part.spec.order == "natural":
        return x
    l, t = part.spec.l, x.shape[axis]  # noqa: E741
    # Reshape to [T/l, l] and transpose: a copy, but of contiguous tiles.
    y = x.reshape(x.shape[:axis] + (t // l, l) + x.shape[axis + 1 :])
    return jnp.swapaxes(y, axis, axis + 1).reshape(x.shape)


def from_order(x: jax.Array, part: PartLayout, axis: int) -> jax.Array:
    """The inverse of ``to_order``."""
    if part.spec.order == "natural":
        return x
    l, t = part.spec.l, x.shape[axis]  # noqa: E741
    y = x.reshape(x.shape[:axis] + (l, t // l) + x.shape[axis + 1 :])
    return jnp.swapaxes(y, axis, axis + 1).reshape(x.shape)


def summary_slice(part: PartLayout) -> tuple[int, int, int] | None:
    """(l, lo, c) when the part's gathered rows, shared by its heads, are the columns
    [lo, lo + c) of every block of l rows (the fixed pattern's summaries), in order and
    followed only by padding: then a reshape to [T/l, l] and a slice reach them, which
    XLA does as plain copying fusions instead of a gather or scatter (on an H200 the
    scatter of the fixed pattern's dk, dv took 37 us each at (2, 16384, 8, 64), the
    slices ~6 us). None otherwise."""
    if part.k_index is None or part.k_index.shape[0] != 1 or part.spec.summary is None:
        return None
    l, c = part.spec.summary  # noqa: E741
    t = part.seq_len
    real = part.k_index[0][part.k_pos[0] != PAD_POSITION]
    if t % l or real.size != t // l * c or not np.all(part.k_pos[0][real.size :] == PAD_POSITION):
        return None
    lo = int(real[0]) if real.size else 0
    if lo + c > l or not np.array_equal(real, (np.arange(0, t, l)[:, None] + lo + np.arange(c)).ravel()):
        return None
    return l, lo, c


def _blocks(x: jax.Array, l: int) -> jax.Array:  # noqa: E741
    """[B, T, ...] -> [B, T/l, l, ...]."""
    return x.reshape(x.shape[0], x.shape[1] // l, l, *x.shape[2:])


def part_keys(x: jax.Array, part: PartLayout) -> jax.Array:
    """Key rows of the part ([B, T, H, D] -> [B, Tk, H, D]): the query order, or the
    gathered summary columns (padding rows: zeros or row 0, masked in every kernel)."""
    if part.k_index is None:
        return to_order(x, part, axis=1)
    if (sl := summary_slice(part)) is not None:
        l, lo, c = sl  # noqa: E741
        rows = _blocks(x, l)[:, :, lo : lo + c]
        rows = rows.reshape(x.shape[0], -1, *x.shape[2:])
        pad = [(0, 0)] * x.ndim
        pad[1] = (0, part.kv_len - rows.shape[1])
        return jnp.pad(rows, pad)
    idx = part.k_index
    if idx.shape[0] == 1:
        return jnp.take(x, jnp.asarray(idx[0]), axis=1)
    # Per-head columns (distinct summaries): idx [Hg, Tk] -> [1, Tk, Hg, 1].
    return jnp.take_along_axis(x, jnp.asarray(idx.T)[None, :, :, None], axis=1)


def scatter_keys(dx: jax.Array, dxg: jax.Array, part: PartLayout) -> jax.Array:
    """dx plus the gradient of the gathered key rows dxg, scattered to their positions.

    Padding rows are masked in every kernel, so their rows of dxg are 0.
    """
    idx = part.k_index
    if idx.shape[0] == 1:
        return dx.at[:, jnp.asarray(idx[0])].add(dxg)
    heads = jnp.arange(idx.shape[0])[None, :]
    return dx.at[:, jnp.asarray(idx.T), heads].add(dxg)


def add_at_keys(dx: jax.Array, dxg: jax.Array, part: PartLayout) -> jax.Array:
    """``scatter_keys`` in dx's dtype: each gathered row is summed with its dxg row in
    float32 and rounded once; the other rows are copied as they are (a slice of a
    reshape where ``summary_slice`` applies, else a scatter of those rows only).

    The same values as ``scatter_keys(dx.astype(float32), dxg, part).astype(dx.dtype)``
    (one rounding of the same float32 sum) without converting the whole of dx twice:
    on an H200 those two conversions and the float32 scatter of the fixed pattern's
    dk and dv took 0.14 ms of its 1.91 ms forward+backward at (2, 16384, 8, 64).
    A gathered row's position is unique within its head, so the scatter has no
    conflicts; padding rows are sent past the end and dropped.
    """
    t = dx.shape[1]
    if (sl := summary_slice(part)) is not None:
        l, lo, c = sl  # noqa: E741
        blocks = _blocks(dx, l)
        g = dxg[:, : t // l * c].reshape(blocks.shape[:2] + (c,) + blocks.shape[3:])
        new = (blocks[:, :, lo : lo + c].astype(jnp.float32) + g).astype(dx.dtype)
        # A concatenation is one fusion writing the whole array; an in-place slice update
        # was slower on an H200 (XLA copied dx first): 1.86 vs 1.83 ms for the fixed
        # pattern's forward+backward at (2, 16384, 8, 64).
        parts = (blocks[:, :, :lo], new, blocks[:, :, lo + c :])
        return jnp.concatenate(parts, axis=2).reshape(dx.shape)
    idx = np.where(part.k_pos == PAD_POSITION, t, part.k_index)  # [Hg, Tk]
    if idx.shape[0] == 1:
        rows = jnp.asarray(idx[0])
        cur = jnp.take(dx, rows, axis=1, mode="fill", fill_value=0)
        new = (cur.astype(jnp.float32) + dxg).astype(dx.dtype)
        return dx.at[:, rows].set(new, mode="drop")
    rows, heads = jnp.asarray(idx.T), jnp.arange(idx.shape[0])[None, :]  # [Tk, Hg], [1, Hg]
    cur = dx.at[:, rows, heads].get(mode="fill", fill_value=0)
    new = (cur.astype(jnp.float32) + dxg).astype(dx.dtype)
    return dx.at[:, rows, heads].set(new, mode="drop")


def merge(outs: list[tuple[jax.Array, jax.Array]]) -> tuple[jax.Array, jax.Array]:
    """Exact softmax over the union of disjoint parts from their (o [B, T, H, D],
    lse [B, H, T]) pairs: the union's (o, lse). A row empty in every part gets o = 0
    and lse = -inf."""
    lses = jnp.stack([lse for _, lse in outs])  # [P, B, H, T]
    top = jnp.max(lses, axis=0)
    # o is invariant to the shift, so no gradient flows through it.
    top = lax.stop_gradient(jnp.where(top == -jnp.inf, 0.0, top))
    weights = jnp.exp(lses - top)  # 0 for a part where the row is empty
    total = jnp.sum(weights, axis=0)
    safe_total = jnp.where(total > 0, total, 1.0)
    weights = weights / safe_total
    out = 0.0
    for (o, _), w in zip(outs, weights):
        out = out + o * jnp.swapaxes(w, 1, 2)[..., None]
    lse = jnp.where(total > 0, top + jnp.log(safe_total), -jnp.inf)
    return out, lse
