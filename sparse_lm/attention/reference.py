"""Reference attention: a masked dense softmax in plain JAX.

Every kernel is tested against this, and it is the CPU fallback. It materialises the
[H, T, T] mask and scores, so it is O(T^2) in time and memory by design.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparse_lm.attention.patterns import LayerPattern, layer_masks


def masked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | np.ndarray
) -> jax.Array:
    """Softmax attention under an explicit boolean mask.

    Args:
      q, k, v: [B, T, H, D] (keys and values may have their own length S).
      mask: [H, T, S] or [B, H, T, S] boolean; True where the query may read the key.

    Returns:
      [B, T, H, D] in q's dtype. Scores and softmax are computed in float32; a query
      with no allowed key gets zeros.
    """
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    mask = jnp.asarray(mask)
    if mask.ndim == 3:
        mask = mask[None]
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(scores - row_max)  # exp(-inf) = 0 for masked keys
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def reference_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, pattern: LayerPattern
) -> jax.Array:
    """Attention of q, k, v ([B, T, H, D]) under a layer pattern (one entry per head)."""
    if len(pattern) != q.shape[2]:
        raise ValueError(f"pattern has {len(pattern)} heads but q has {q.shape[2]}")
    return masked_attention(q, k, v, layer_masks(pattern, q.shape[1]))
