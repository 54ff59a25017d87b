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
from jax import lax

from sparse_lm.attention.layout import PartLayout


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


def part_keys(x: jax.Array, part: PartLayout) -> jax.Array:
    """Key rows of the part ([B, T, H, D] -> [B, Tk, H, D]): the query order, or the
    gathered summary columns."""
    if part.k_index is None:
        return to_order(x, part, axis=1)
    idx = part.k_index
    if idx.shape[0] == 1:
        return jnp.take(x, jnp.asarray(idx[0]), axis=1)
    # Per-head columns (distinct summaries): idx [Hg, Tk] -> [1, Tk, Hg, 1].
    return jnp.take_along_axis(x, jnp.asarray(idx.T)[None, :, :, None], axis=1)


def scatter_keys(dx: jax.Array, dxg: jax.Array, part: PartLayout) -> jax.Array:
    """dx plus the gradient of the gathered key rows dxg, scattered to their positions.

    Padding rows read position 0 but are masked in every kernel, so their rows are 0.
    """
    idx = part.k_index
    if idx.shape[0] == 1:
        return dx.at[:, jnp.asarray(idx[0])].add(dxg)
    heads = jnp.arange(idx.shape[0])[None, :]
    return dx.at[:, jnp.asarray(idx.T), heads].add(dxg)


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
