"""The Mosaic GPU block-sparse forward equals the reference.

Runs the kernel in Mosaic GPU interpret mode on CPU (``plgpu.InterpretGPUParams``): the
interpreter simulates the warpgroups as threads, SMEM, TMA copies and barriers, and
fills kernel outputs with NaN until written, so a tile the kernel skips fails the
finiteness check. The interpreter cannot run the FA3 form of P V (P from registers,
``pv_from_registers=True``); that form, and the interpret form, are checked to lower
through the real Mosaic GPU compiler to NVVM (``lowering_platforms=("cuda",)``), which
needs no GPU.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")

from sparse_lm.attention import (  # noqa: E402
    PatternError,
    PatternSpec,
    layer_masks,
    reference_attention,
)
from sparse_lm.attention import mosaic_gpu  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

TOL = {jnp.bfloat16: 1e-2, jnp.float32: 1e-5}
SHAPE = (1, 256, 2, 64)  # B, T, H, D
_seed = itertools.count(1)


@pytest.fixture(autouse=True)
def _reset_interpreter():
    """The interpreter keeps global state that an exception leaves dirty."""
    yield
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    interpret_pallas_call.reset_gpu_interpret_mode_state()


def inputs(shape, dtype):
    keys = jax.random.split(jax.random.PRNGKey(next(_seed)), 3)
    return [jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in keys]


def reference(q, k, v, pattern):
    with jax.default_matmul_precision("highest"):
        return reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)), pattern)


def check(spec, layer, dtype, shape=SHAPE, **opts):
    pattern = spec.layer_pattern(layer, shape[2])
    q, k, v = inputs(shape, dtype)
    out = mosaic_gpu.attention(q, k, v, pattern, interpret=True, **opts)
    assert out.shape == q.shape and out.dtype == dtype
    assert bool(jnp.isfinite(out.astype(jnp.float32)).all()), "output has NaN/inf"
    err = rel_err(out, reference(q, k, v, pattern))
    assert err < TOL[dtype], f"relative error {err:.2e} >= {TOL[dtype]:.0e}"


# T=256 with 128-row programs (two warpgroups of 64) and 64-key blocks: every pattern
# has both full and partial blocks; l=16 puts 16 columns in every strided block.
@pytest.mark.parametrize(
    "spec,layer,dtype",
    [
        (PatternSpec("dense"), 0, jnp.float32),
        (PatternSpec("local", 64), 0, jnp.float32),
        (PatternSpec("strided", 64), 0, jnp.float32),
        (PatternSpec("strided", 16), 0, jnp.float32),
        (PatternSpec("fixed", 64, 16), 0, jnp.float32),
        (PatternSpec("strided", 64), 0, jnp.bfloat16),
        (PatternSpec("fixed", 64, 16), 0, jnp.bfloat16),
    ],
    ids=["dense-f32", "local-f32", "strided-merged-f32", "strided-l16-merged-f32",
         "fixed-merged-f32", "strided-merged-bf16", "fixed-merged-bf16"],
)
def test_merged_patterns_match_reference(spec, layer, dtype):
    check(spec, layer, dtype)


def test_head_groups_distinct_summaries_and_other_tiles():
    # Multihead fixed: two head groups; distinct summaries: a per-head summary start;
    # summary-only heads: queries with no key (zero rows). One warpgroup of 64 rows,
    # 128-key blocks, three pipeline slots.
    check(PatternSpec("fixed", 64, 16, combine="multihead", distinct_summaries=True), 0,
          jnp.float32, shape=(2, 256, 4, 64), block_q=64, block_k=128, compute_wgs=1,
          max_concurrent_steps=3)


def test_log_sum_exp_and_no_races():
    spec = PatternSpec("fixed", 64, 16, combine="interleaved")
    pattern = spec.layer_pattern(1, SHAPE[2])  # summary heads: leading rows see nothing
    q, k, v = inputs(SHAPE, jnp.float32)
    params = plgpu.InterpretGPUParams(detect_races=True)
    out, lse = mosaic_gpu.attention(q, k, v, pattern, interpret=params, return_lse=True)
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    assert not interpret_pallas_call.get_races().races_found
    mask = np.asarray(layer_masks(pattern, SHAPE[1]))  # [H, T, T]
    s = np.einsum("bthd,bshd->bhts", np.asarray(q, np.float64), np.asarray(k, np.float64))
    s = np.where(mask[None], s * SHAPE[3] ** -0.5, -np.inf)
    top = s.max(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        want = (np.log(np.exp(s - np.where(np.isfinite(top), top, 0)).sum(-1))
                + np.where(np.isfinite(top), top, 0)[..., 0])
    lse = np.asarray(lse)
    assert np.array_equal(np.isneginf(lse), np.isneginf(want))
    assert (~np.isfinite(want)).any()  # the case of rows with no key is exercised
    fin = np.isfinite(want)
    np.testing.assert_allclose(lse[fin], want[fin], rtol=1e-5, atol=1e-5)
    assert rel_err(out, reference(q, k, v, pattern)) < 1e-5


@pytest.mark.parametrize(
    "spec,dtype,d,opts",
    [
        (PatternSpec("dense"), jnp.bfloat16, 64, {}),
        (PatternSpec("strided", 64), jnp.bfloat16, 128, {"block_k": 128}),
        (PatternSpec("fixed", 64, 16, distinct_summaries=True), jnp.float16, 64,
         {"max_concurrent_steps": 3}),
    ],
    ids=["dense-bf16-d64", "strided-bf16-d128-k128", "fixed-distinct-f16"],
)
@pytest.mark.parametrize("pv_from_registers", [True, False], ids=["pv-regs", "pv-smem"])
def test_lowers_through_mosaic_gpu_for_cuda(spec, dtype, d, opts, pv_from_registers):
    """Both P V forms go through the Mosaic GPU compiler without a GPU."""
    pattern = spec.layer_pattern(0, 2)
    x = jax.ShapeDtypeStruct((1, 256, 2, d), dtype)
    fn = jax.jit(lambda q, k, v: mosaic_gpu.attention(
        q, k, v, pattern, interpret=False, pv_from_registers=pv_from_registers, **opts))
    # Lowering runs the whole Mosaic GPU compiler down to NVVM (layouts, wgmma and TMA
    # shape rules, the shared memory limit); only PTX assembly is left for the GPU.
    text = fn.trace(x, x, x).lower(lowering_platforms=("cuda",)).as_text()
    assert "stablehlo.custom_call @mosaic_gpu" in text


@pytest.mark.parametrize(
    "shape,dtype,opts,match",
    [
        ((1, 256, 2, 48), jnp.float32, {}, "head dim D=48 must be a multiple of 64"),
        ((1, 256, 2, 64), jnp.float32, {"interpret": False}, "float32 is accepted in interpret"),
        ((1, 256, 2, 64), jnp.bfloat16, {"pv_from_registers": True}, "needs a GPU"),
        ((1, 256, 2, 64), jnp.float32, {"block_q": 96}, "multiple of 64 x compute_wgs=2"),
        ((1, 256, 2, 64), jnp.float32, {"block_k": 32}, "block_k=32 must be a multiple of 64"),
        ((1, 192, 2, 64), jnp.float32, {}, "not a multiple of block_q=128"),
        ((1, 256, 2, 64), jnp.int32, {}, "bfloat16, float16 or float32"),
    ],
    ids=["head-dim", "f32-on-gpu", "pv-regs-interpret", "block-q", "block-k", "length",
         "dtype"],
)
def test_unsupported_configs_raise_clear_errors(shape, dtype, opts, match):
    q = jnp.zeros(shape, dtype)
    pattern = PatternSpec("dense").layer_pattern(0, shape[2])
    opts = {"interpret": True, **opts}
    with pytest.raises(PatternError, match=match):
        mosaic_gpu.attention(q, q, q, pattern, **opts)


def test_shared_memory_overflow_raises_clear_error():
    q = jnp.zeros((1, 512, 2, 128), jnp.bfloat16)
    pattern = PatternSpec("dense").layer_pattern(0, 2)
    with pytest.raises(PatternError, match="bytes of shared memory"):
        mosaic_gpu.attention(q, q, q, pattern, interpret=False, block_k=256,
                             max_concurrent_steps=3)
