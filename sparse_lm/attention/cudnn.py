"""Dense causal attention through cuDNN's fused kernel: the baseline the sparse kernel is
measured against (``attention.impl = "cudnn_dense"``).

It ignores the sparsity pattern on purpose: every query reads every earlier key, so
a model with this impl is the *dense* Sparse Transformer of the same size, not the
sparse one. Use it for speed comparisons, not to train a sparse model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_lm.attention.patterns import LayerPattern

# cuDNN's flash attention takes half-precision inputs only.
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def cudnn_dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    pattern: LayerPattern,
    *,
    implementation: str | None = None,
    **_,
) -> jax.Array:
    """Causal dense attention of q, k, v ([B, T, H, D]); ``pattern`` only fixes the head count.

    ``implementation`` defaults to ``"cudnn"`` on GPU and ``"xla"`` elsewhere, so CPU
    smoke runs of the benchmark exercise the same code path with the same numbers.
    """
    if len(pattern) != q.shape[2]:
        raise ValueError(f"pattern has {len(pattern)} heads but q has {q.shape[2]}")
    if implementation is None:
        implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"
    if implementation == "cudnn" and q.dtype not in _CUDNN_DTYPES:
        raise ValueError(
            f"cuDNN attention needs bfloat16 or float16 inputs, got {q.dtype}; set "
            "config.model.dtype='bfloat16' to benchmark the cudnn_dense impl."
        )
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
