"""The Pallas block-sparse kernel equals the reference, forward and backward.

Runs in Pallas interpret mode on CPU. The interpreter allocates every kernel output
filled with NaN (checked below), so a tile the kernel never writes shows up as NaN,
and every comparison first requires finite outputs and gradients: NaN never passes.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from sparse_lm.attention import PatternError, PatternSpec, attention, reference_attention
from sparse_lm.attention import pallas_gpu

TOL = {jnp.bfloat16: 1e-2, jnp.float32: 1e-5}
_seed = itertools.count(1)

# (spec, layer): every pattern and combine mode (interleaved layers 0 and 1 differ).
PATTERNS = [
    (PatternSpec("dense"), 0),
    (PatternSpec("local", 16), 0),
    (PatternSpec("strided", 16, combine="merged"), 0),
    (PatternSpec("strided", 16, combine="interleaved"), 0),
    (PatternSpec("strided", 16, combine="interleaved"), 1),
    (PatternSpec("strided", 16, combine="multihead"), 0),
    (PatternSpec("fixed", 16, 4, combine="merged"), 0),
    (PatternSpec("fixed", 16, 4, combine="interleaved"), 0),
    (PatternSpec("fixed", 16, 4, combine="interleaved"), 1),
    (PatternSpec("fixed", 16, 4, combine="multihead"), 0),
    (PatternSpec("fixed", 16, 4, combine="merged", distinct_summaries=True), 0),
    (PatternSpec("fixed", 16, 4, combine="interleaved", distinct_summaries=True), 1),
    (PatternSpec("fixed", 16, 4, combine="multihead", distinct_summaries=True), 0),
]
PATTERN_IDS = [f"{s.name}-{s.combine}-L{layer}{'-distinct' if s.distinct_summaries else ''}"
               for s, layer in PATTERNS]


def rel_err(x, ref) -> float:
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def fresh_inputs(shape, dtype):
    """New random q, k, v and output cotangent for every call (never zeros)."""
    keys = jax.random.split(jax.random.PRNGKey(next(_seed)), 4)
    return [jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in keys]


def output_and_grads(fn, q, k, v, g):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(g))


def assert_matches_reference(spec, layer, shape, dtype, **opts):
    b, t, h, d = shape
    pattern = spec.layer_pattern(layer, h)
    q, k, v, g = fresh_inputs(shape, dtype)
    got = output_and_grads(lambda *a: attention(*a, pattern, impl="pallas_gpu", **opts), q, k, v, g)
    # The reference runs in float32 on the same (rounded) inputs, at full precision.
    with jax.default_matmul_precision("highest"):
        want = output_and_grads(lambda *a: reference_attention(*a, pattern),
                                *(x.astype(jnp.float32) for x in (q, k, v, g)))
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
        assert x.shape == ref.shape and x.dtype == dtype, name
        assert bool(jnp.isfinite(x.astype(jnp.float32)).all()), f"{name} has NaN/inf"
        err = rel_err(x, ref)
        assert err < TOL[dtype], f"{name}: relative error {err:.2e} >= {TOL[dtype]:.0e}"


@pytest.mark.parametrize("spec,layer", PATTERNS, ids=PATTERN_IDS)
def test_every_pattern_matches_reference_in_float32(spec, layer):
    # float32 at 1e-5 is the sharp test of the layout and the kernels' logic.
    assert_matches_reference(spec, layer, (1, 64, 4, 64), jnp.float32, block_q=16, block_k=32)


BF16_PATTERNS = [PATTERNS[i] for i in (0, 2, 8, 10)]


@pytest.mark.parametrize("spec,layer", BF16_PATTERNS,
                         ids=[PATTERN_IDS[i] for i in (0, 2, 8, 10)])
def test_bf16_operands_match_reference(spec, layer):
    assert_matches_reference(spec, layer, (1, 64, 4, 64), jnp.bfloat16, block_q=16, block_k=32)


@pytest.mark.parametrize(
    "spec,dtype",
    [(PatternSpec("strided", 16), jnp.bfloat16),
     (PatternSpec("fixed", 16, 4, distinct_summaries=True), jnp.float32)],
    ids=["strided-merged-bf16", "fixed-merged-distinct-f32"],
)
def test_head_dim_128(spec, dtype):
    assert_matches_reference(spec, 0, (1, 64, 4, 128), dtype, block_q=32, block_k=16)


@pytest.mark.parametrize(
    "name,t,l,blocks",
    [("strided", 192, 16, (64, 32)), ("fixed", 32, 8, None)],
    ids=["strided-T192-l16-q64-k32", "fixed-T32-l8-default-blocks"],
)
def test_other_lengths_block_shapes_and_batch(name, t, l, blocks):  # noqa: E741
    opts = {} if blocks is None else {"block_q": blocks[0], "block_k": blocks[1]}
    assert_matches_reference(PatternSpec(name, l, l // 4), 0, (2, t, 2, 64), jnp.float32, **opts)


def test_interpreter_poisons_unwritten_outputs_with_nan():
    """What the tests rely on: a tile the kernel skips is NaN, which every check rejects."""

    def writes_first_tile_only(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = x_ref[...]

    x = jnp.ones((32, 16), jnp.float32)
    out = pl.pallas_call(
        writes_first_tile_only,
        grid=(2,),
        in_specs=[pl.BlockSpec((16, 16), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((16, 16), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        interpret=True,
    )(x)
    assert bool(jnp.isnan(out[16:]).all()) and bool((out[:16] == 1).all())


def test_query_with_no_allowed_key_gets_zero_output_and_gradient():
    # Summary-only heads: positions before the first summary column attend to nothing.
    spec = PatternSpec("fixed", 16, 4, combine="interleaved")
    pattern = spec.layer_pattern(1, 2)
    q, k, v, g = fresh_inputs((1, 32, 2, 64), jnp.float32)
    out, dq, dk, dv = output_and_grads(
        lambda *a: pallas_gpu.attention(*a, pattern, block_q=16, block_k=16), q, k, v, g)
    assert bool((out[:, :12] == 0).all()) and bool((dq[:, :12] == 0).all())
    assert bool(jnp.isfinite(out).all()) and bool(jnp.isfinite(dk).all())


@pytest.mark.parametrize(
    "shape,dtype,opts,match",
    [
        ((1, 100, 2, 64), jnp.float32, {}, "not a multiple of block_q"),
        ((1, 64, 2, 64), jnp.float32, {"block_q": 48}, "power of two"),
        ((1, 64, 2, 64), jnp.float32, {"block_k": 8}, "power of two >= 16"),
        ((1, 64, 2, 48), jnp.float32, {}, "head dim D=48 must be a power of two"),
        ((1, 64, 2, 64), jnp.float16, {}, "bfloat16 or all float32"),
    ],
    ids=["length-vs-block", "block-not-pow2", "block-too-small", "head-dim", "dtype"],
)
def test_unsupported_shapes_raise_clear_errors(shape, dtype, opts, match):
    q = jnp.zeros(shape, dtype)
    pattern = PatternSpec("dense").layer_pattern(0, shape[2])
    with pytest.raises(PatternError, match=match):
        pallas_gpu.attention(q, q, q, pattern, **opts)


def test_length_not_multiple_of_stride_raises():
    q = jnp.zeros((1, 96, 2, 64), jnp.float32)
    pattern = PatternSpec("strided", 64).layer_pattern(0, 2)
    with pytest.raises(PatternError, match="multiple of the stride l=64"):
        pallas_gpu.attention(q, q, q, pattern, block_q=16, block_k=16)
