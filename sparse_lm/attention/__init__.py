"""Attention for sparse_lm: patterns, the reference, and the one entry point the model calls.

``attention(q, k, v, pattern, impl=...)`` is that entry point. Kernels register
themselves in ``IMPLEMENTATIONS``; ``impl="auto"`` picks the fastest one for the
platform of the default backend (cuDNN for dense layers in half precision on GPU, the
block-sparse kernel otherwise), and the reference elsewhere.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import jax
import jax.numpy as jnp

from sparse_lm.attention import adapt
from sparse_lm.attention.patterns import (
    COMBINES,
    PATTERNS,
    Component,
    HeadPattern,
    LayerPattern,
    PatternError,
    PatternSpec,
    allowed_keys,
    allowed_pairs,
    head_mask,
    layer_masks,
)
from sparse_lm.attention.reference import masked_attention, reference_attention

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, LayerPattern], jax.Array]

# impl name -> function(q, k, v, pattern, **options). Kernels add themselves lazily in
# _load(), so importing this package never imports Pallas.
IMPLEMENTATIONS: dict[str, AttentionFn] = {"reference": reference_attention}
# impl name -> (module, function) of the kernels, imported on first use.
KERNELS = {
    "pallas_gpu": ("sparse_lm.attention.pallas_gpu", "attention"),
    "mosaic_gpu": ("sparse_lm.attention.mosaic_gpu", "attention"),
    "pallas_tpu": ("sparse_lm.attention.pallas_tpu", "attention"),
    "cudnn_dense": ("sparse_lm.attention.cudnn", "cudnn_dense_attention"),
}
# Every value config.attention.impl may take.
IMPL_NAMES = ("auto", "reference", *KERNELS)
# Which impl "auto" picks on each platform; platforms not listed use the reference.
AUTO_IMPL = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}
# A layer whose every head is dense causal has nothing for a block-sparse kernel to skip;
# on GPU "auto" gives it cuDNN's fused kernel (half precision only), the fastest there.
AUTO_DENSE_IMPL = {"gpu": "cudnn_dense"}
_DENSE_HEAD: HeadPattern = (Component("causal"),)


def _load(impl: str) -> AttentionFn:
    if impl not in IMPLEMENTATIONS:
        if impl not in KERNELS:
            raise PatternError(
                f"unknown attention impl {impl!r}; choose one of "
                + ", ".join(repr(name) for name in IMPL_NAMES)
                + " ('mosaic_gpu' is experimental)."
            )
        module, function = KERNELS[impl]
        IMPLEMENTATIONS[impl] = getattr(importlib.import_module(module), function)
        if impl != "cudnn_dense":
            # Lowering a Pallas call on the CPU (interpret mode) imports Pallas' fuser,
            # which registers a config option that is part of every jit's trace context
            # (JAX 0.11.2). Imported during a program's first trace, it changes the
            # context after that program's cache key was taken, so its second call
            # traces and compiles it again ("number of tracing context values
            # differs"). Imported here, before any trace that uses a kernel, it cannot.
            importlib.import_module("jax.experimental.pallas.fuser")
    return IMPLEMENTATIONS[impl]


def load(impl: str) -> None:
    """Imports what ``impl`` (after ``resolve_impl``) runs, ahead of tracing: call before
    jitting a program that uses it, so that its first trace changes no JAX state that
    the jit cache keys on (see ``_load``)."""
    impl = resolve_impl(impl)
    if impl != "reference":
        _load(impl)


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """The concrete implementation that ``impl`` means on ``platform`` (default backend)."""
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    candidate = AUTO_IMPL.get(platform)
    if candidate is None:
        return "reference"
    try:
        _load(candidate)
    except ImportError:
        return "reference"
    return candidate


def is_dense(pattern: LayerPattern) -> bool:
    """Whether every head of the layer attends to all earlier positions."""
    return all(tuple(head) == _DENSE_HEAD for head in pattern)


def auto_impl_for(pattern: LayerPattern, dtype, platform: str | None = None) -> str:
    """What ``impl="auto"`` runs for this layer pattern and dtype on ``platform``."""
    platform = platform or jax.default_backend()
    dense = AUTO_DENSE_IMPL.get(platform)
    if dense and is_dense(pattern) and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return dense
    return resolve_impl("auto", platform)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    pattern: LayerPattern,
    impl: str = "auto",
    gpu_kernel_options: tuple[tuple[str, Any], ...] = (),
    **options,
) -> jax.Array:
    """Causal sparse attention. q, k, v: [B, T, H, D]; returns [B, T, H, D].

    ``pattern`` gives each head's allowed set (see ``PatternSpec.layer_pattern``);
    ``options`` go to the implementation (block sizes, interpret mode). q and k may
    have a smaller head dim than v (half-size query/key projections).
    ``gpu_kernel_options`` ((name, value) pairs, e.g. ``(("colaunch", False),)``) go to
    ``pallas_gpu`` only, when it is the impl that runs: a config can set them once and
    still run on CPU or with cuDNN.
    """
    name = auto_impl_for(pattern, q.dtype) if impl == "auto" else resolve_impl(impl)
    fn = _load(name)
    if name == "pallas_gpu":
        options = {**dict(gpu_kernel_options), **options}
    if name == "reference":
        return fn(q, k, v, pattern, **options)
    q, k = adapt.equalize_head_dims(q, k, v)
    if name in ("pallas_gpu", "mosaic_gpu") and (mesh := adapt.ambient_mesh()) is not None:
        return adapt.run_sharded(fn, q, k, v, pattern, mesh, **options)
    # pallas_tpu shards itself (it shards splash's per-head schedule as well), and
    # cuDNN attention is an XLA custom call that the partitioner handles.
    return fn(q, k, v, pattern, **options)


__all__ = [
    "AUTO_IMPL",
    "IMPL_NAMES",
    "COMBINES",
    "IMPLEMENTATIONS",
    "PATTERNS",
    "Component",
    "HeadPattern",
    "LayerPattern",
    "PatternError",
    "PatternSpec",
    "allowed_keys",
    "allowed_pairs",
    "attention",
    "auto_impl_for",
    "is_dense",
    "head_mask",
    "layer_masks",
    "load",
    "masked_attention",
    "reference_attention",
    "resolve_impl",
]
