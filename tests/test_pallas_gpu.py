"""The Pallas block-sparse kernel equals the reference, forward and backward.

Runs in Pallas interpret mode on CPU. The interpreter allocates every kernel output
filled with NaN (checked below), so a tile the kernel never writes shows up as NaN,
and every comparison first requires finite outputs and gradients: NaN never passes.
"""

from __future__ import annotations

import itertools
import warnings

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from sparse_lm.attention import PatternError, PatternSpec, attention, reference_attention
from sparse_lm.attention import pallas_gpu
from sparse_lm.attention.layout import build_layout
from tests.helpers import attention_spec_cases, rel_err, spec_id

TOL = {jnp.bfloat16: 1e-2, jnp.float32: 1e-5}
_seed = itertools.count(1)

# (spec, layer): every pattern and combine mode (interleaved layers 0 and 1 differ).
PATTERNS, PATTERN_IDS = attention_spec_cases()


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
    # float32 at 1e-5 is the sharp test of the layout and the kernels' logic. The v1 path
    # (fuse_parts=False) here; the default v2 path has its own section below.
    assert_matches_reference(spec, layer, (1, 64, 4, 64), jnp.float32, block_q=16, block_k=32,
                             fuse_parts=False)


BF16_PATTERNS = [PATTERNS[i] for i in (0, 2, 8, 10)]


@pytest.mark.parametrize("spec,layer", BF16_PATTERNS,
                         ids=[PATTERN_IDS[i] for i in (0, 2, 8, 10)])
def test_bf16_operands_match_reference(spec, layer):
    assert_matches_reference(spec, layer, (1, 64, 4, 64), jnp.bfloat16, block_q=16, block_k=32,
                             fuse_parts=False)


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


# ------------------------------------------- v2 path (fuse_parts=True, the default)

# Strided parts need block_q and block_k to divide T/l (a tile is rows of one column):
# T=256 with l=16 gives 16-row columns. Fixed parts have no such constraint.
FUSED_PATTERNS = [
    (PatternSpec("strided", 16, combine="merged"), 0),
    (PatternSpec("strided", 16, combine="interleaved"), 1),
    (PatternSpec("strided", 16, combine="multihead"), 0),
    (PatternSpec("fixed", 16, 4, combine="merged"), 0),
    (PatternSpec("fixed", 16, 4, combine="interleaved"), 1),
    (PatternSpec("fixed", 16, 4, combine="multihead", distinct_summaries=True), 0),
]
FUSED_IDS = [spec_id(s, layer) for s, layer in FUSED_PATTERNS]


def forward_backward_jaxpr(pattern, shape, dtype=jnp.float32, **opts):
    """The jaxpr of the kernel's output and its gradients (traced, not run)."""
    q = jnp.zeros(shape, dtype)

    def f(q, k, v):
        o, vjp = jax.vjp(lambda *a: pallas_gpu.attention(*a, pattern, **opts), q, k, v)
        return o, vjp(o)

    return jax.make_jaxpr(f)(q, q, q)


def kernel_names(pattern, shape, dtype=jnp.float32, **opts):
    import re

    text = str(forward_backward_jaxpr(pattern, shape, dtype, **opts))
    return set(re.findall(r"name=(sparse_attn\w*)", text))


@pytest.mark.parametrize("spec,layer", FUSED_PATTERNS, ids=FUSED_IDS)
def test_fused_parts_match_reference_in_float32(spec, layer):
    assert_matches_reference(spec, layer, (1, 256, 2, 64), jnp.float32, block_q=16,
                             block_k=16, fuse_parts=True)


@pytest.mark.parametrize(
    "spec,shape,blocks,dtype",
    [(PatternSpec("strided", 8), (1, 128, 2, 128), (16, 16), jnp.bfloat16),
     (PatternSpec("strided", 16), (2, 512, 1, 64), (32, 16), jnp.bfloat16),
     (PatternSpec("fixed", 16, 4, distinct_summaries=True), (1, 64, 4, 128), (32, 16),
      jnp.float32)],
    ids=["strided-bf16-D128-T128-l8", "strided-bf16-T512-q32-k16", "fixed-distinct-f32-D128"],
)
def test_fused_parts_other_dtypes_head_dims_and_lengths(spec, shape, blocks, dtype):
    assert_matches_reference(spec, 0, shape, dtype, block_q=blocks[0], block_k=blocks[1],
                             fuse_parts=True)


@pytest.mark.parametrize("name,shape", [("strided", (1, 256, 2, 64)), ("fixed", (1, 64, 2, 64))])
def test_fused_parts_equal_v1_path(name, shape):
    spec = PatternSpec(name, 16, 4)
    pattern = spec.layer_pattern(0, shape[2])
    q, k, v, g = fresh_inputs(shape, jnp.float32)
    opts = dict(block_q=16, block_k=16)
    fused = output_and_grads(
        lambda *a: pallas_gpu.attention(*a, pattern, fuse_parts=True, **opts), q, k, v, g)
    v1 = output_and_grads(
        lambda *a: pallas_gpu.attention(*a, pattern, fuse_parts=False, **opts), q, k, v, g)
    assert kernel_names(pattern, shape, fuse_parts=False, **opts) == {
        "sparse_attn_fwd", "sparse_attn_bwd_dq", "sparse_attn_bwd_dkv"}
    for what, x, ref in zip(("out", "dq", "dk", "dv"), fused, v1):
        assert bool(jnp.isfinite(x).all()), what
        assert rel_err(x, ref) < 1e-5, what


def test_default_path_is_v2():
    pattern = PatternSpec("strided", 16).layer_pattern(0, 2)
    # The local part's dQ and dK/dV kernels, the strided part's column kernel.
    assert kernel_names(pattern, (1, 256, 2, 64), block_q=16, block_k=16) == {
        "sparse_attn_fwd_v2", "sparse_attn_bwd_dq_v2", "sparse_attn_bwd_dkv_v2", "sparse_attn_bwd_column_v2"}


def test_fused_parts_use_views_and_no_merge():
    """The strided v2 graph: only v2 kernels, and no transposed copy of a [B, T, H, D]
    array (the one transpose left is delta's [B, T, H] -> [B, H, T])."""
    pattern = PatternSpec("strided", 16).layer_pattern(0, 2)
    shape = (1, 256, 2, 64)
    assert kernel_names(pattern, shape, block_q=16, block_k=16, fuse_parts=True, column_bwd=False) == {
        "sparse_attn_fwd_v2", "sparse_attn_bwd_dq_v2", "sparse_attn_bwd_dkv_v2"}
    q = jnp.zeros(shape, jnp.float32)

    def f(q, k, v):
        o, vjp = jax.vjp(lambda *a: pallas_gpu.attention(
            *a, pattern, block_q=16, block_k=16, fuse_parts=True), q, k, v)
        return o, vjp(o)

    jaxpr = jax.make_jaxpr(f)(q, q, q).jaxpr
    transposes = [e for e in jaxpr.eqns if e.primitive.name == "transpose"]
    assert all(e.invars[0].aval.ndim < 4 for e in transposes), transposes
    assert not any(e.primitive.name == "exp" for e in jaxpr.eqns)  # no lse merge


def test_fused_parts_fall_back_when_blocks_span_columns():
    # T/l = 4 rows per column < 16-row blocks: the strided group takes the v1 path.
    pattern = PatternSpec("strided", 16).layer_pattern(0, 2)
    names = kernel_names(pattern, (1, 64, 2, 64), block_q=16, block_k=16, fuse_parts=True)
    assert names == {"sparse_attn_fwd", "sparse_attn_bwd_dq", "sparse_attn_bwd_dkv"}
    assert_matches_reference(PatternSpec("strided", 16), 0, (1, 64, 2, 64), jnp.float32,
                             block_q=16, block_k=16, fuse_parts=True)


def test_fused_parts_empty_rows_get_zero_output_and_gradient():
    spec = PatternSpec("fixed", 16, 4, combine="interleaved")
    pattern = spec.layer_pattern(1, 2)
    q, k, v, g = fresh_inputs((1, 32, 2, 64), jnp.float32)
    out, dq, dk, dv = output_and_grads(
        lambda *a: pallas_gpu.attention(*a, pattern, block_q=16, block_k=16, fuse_parts=True),
        q, k, v, g)
    assert bool((out[:, :12] == 0).all()) and bool((dq[:, :12] == 0).all())
    assert all(bool(jnp.isfinite(x).all()) for x in (out, dq, dk, dv))


def test_bench_script_variants_parse_and_take_the_fused_path_at_bench_shapes():
    """CPU side of ``scripts/bench_attention.py --variants`` (tracing only, no kernel run)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_attention.py"
    mod_spec = importlib.util.spec_from_file_location("bench_attention", path)
    bench = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(bench)
    args = bench.parse_args(["out.json", "--variants", "--no-sweep"])
    assert args.variants and args.no_sweep and not bench.parse_args(["o.json"]).variants
    assert bench.parse_args(["o.json", "--check-only"]).check_only and not args.check_only
    assert [s for s, _ in bench.variants(("v1",))] == ["", "_v1"]
    assert bench.variants() == [bench.DEFAULT_VARIANT]
    assert bench.extra_variants(args) == ("v1",)
    assert bench.V1_VARIANT[1] == {"fuse_parts": False}
    assert [s for s, _ in bench.variants(("mosaic",))] == ["", "_mosaic"]
    assert bench.parse_args(["o.json", "--mosaic"]).mosaic and not args.mosaic
    assert [s for s, _ in bench.variants(("split_launch",))] == ["", "_splitlaunch"]
    assert bench.applies("_splitlaunch", "fixed", jnp.bfloat16)
    assert not bench.applies("_splitlaunch", "strided", jnp.bfloat16)
    assert not bench.applies("_mosaic", "fixed", jnp.float32)
    assert bench.applies("_f32chain", "strided", jnp.bfloat16)
    assert not bench.applies("_f32chain", "local", jnp.bfloat16)
    assert bench.extra_variants(bench.parse_args(["o.json", "--wide-chain"])) == ("wide_chain",)
    assert bench.parse_args(["o.json", "--split-launch"]).split_launch and not args.split_launch
    assert bench.extra_variants(bench.parse_args(["o.json", "--split-bwd"])) == ("split_bwd",)
    assert bench.applies("_splitbwd", "strided", jnp.bfloat16)
    strided = PatternSpec("strided", 128, combine="merged")
    assert bench.column_taken(strided, (1, 16384, 2, 64), 64, 64)  # 2 tiles per column
    assert not bench.column_taken(strided, (1, 16384, 2, 128), 64, 64)  # D=128: split kernels
    assert not bench.column_taken(PatternSpec("strided", 256, combine="merged"), (1, 65536, 2, 64), 64, 64)
    assert not bench.applies("_splitbwd", "fixed", jnp.bfloat16)
    assert bench.extra_variants(bench.parse_args(["o.json", "--summary-dkv-128"])) == ("summary_dkv_128",)
    assert bench.applies("_sdkv128", "fixed", jnp.bfloat16) and not bench.applies("_sdkv128", "strided", jnp.bfloat16)
    assert bench.extra_variants(bench.parse_args(["o.json", "--mosaic-summary-dkv"])) == ("mosaic_summary_dkv",)
    assert bench.applies("_mosaicdkv", "fixed", jnp.bfloat16) and not bench.applies("_mosaicdkv", "local", jnp.bfloat16)
    both = bench.parse_args(["o.json", "--mosaic-forward", "--mosaic-forward-persistent"])
    assert bench.extra_variants(both) == ("mosaic_forward", "mosaic_forward_persistent")
    assert bench.kernel_fn(bench.MOSAIC_FWD_PERSISTENT_VARIANT[1]).keywords == {
        "mosaic_forward": True, "mosaic_forward_persistent": True}
    assert bench.applies("_mosaicfwdpers", "fixed", jnp.bfloat16)
    assert not bench.applies("_mosaicfwdpers", "strided", jnp.bfloat16)
    fixed = PatternSpec("fixed", 128, 32, combine="merged")
    assert bench.mosaic_dkv_taken(fixed, (1, 16384, 2, 64), 64, 64)
    assert not bench.mosaic_dkv_taken(fixed, (1, 16384, 2, 128), 64, 64)  # D=128: Triton's kernel
    assert bench.kernel_fn(bench.MOSAIC_VARIANT[1]).func.__module__ == "sparse_lm.attention.mosaic_gpu"
    assert bench.kernel_fn(bench.V1_VARIANT[1]).keywords == {"fuse_parts": False}
    assert args.shapes is None and args.blocks is None  # main(): the three shapes
    assert bench.parse_args(["o.json", "--blocks", "64x64,32x32"]).blocks == [(64, 64), (32, 32)]
    assert bench.parse_args(["o.json", "--shapes", "1x65536x8x64,2x4096x4x128"]).shapes == [
        (1, 65536, 8, 64), (2, 4096, 4, 128)]
    with pytest.raises(SystemExit):  # argparse: "shape '1x2x3' is not BxTxHxD ..."
        bench.parse_args(["o.json", "--shapes", "1x2x3"])
    bench.check_pair_counts()
    # The benchmark's strided shapes and tiles really run the v2 kernels.
    assert bench.fused_taken(PatternSpec("strided", 128), (2, 16384, 8, 64), 64, 64)
    assert bench.fused_taken(PatternSpec("strided", 128), (2, 16384, 8, 64), 128, 128)
    assert bench.fused_taken(PatternSpec("strided", 256), (1, 65536, 8, 64), 64, 64)
    assert bench.fused_taken(PatternSpec("fixed", 128, 32), (2, 16384, 8, 64), 64, 64)
    # The GPU check's fused cases (T=4096, l=64, default 64-row tiles) as well.
    assert bench.fused_taken(PatternSpec("strided", 64), (1, 4096, 4, 64))
    assert not bench.fused_taken(PatternSpec("strided", 64), (1, 1024, 4, 64))
    # The model's strided lengths whose columns 64-row tiles cannot divide (T/l = 96, 32)
    # get 32-row tiles by default, and so the v2 path.
    assert bench.fused_taken(PatternSpec("strided", 128), (2, 12288, 4, 64))
    assert bench.fused_taken(PatternSpec("strided", 96), (2, 3072, 2, 64))


def test_default_tiles_follow_the_strided_columns():
    def blocks(t, spec):
        return pallas_gpu.default_blocks(t, 64, spec.layer_pattern(0, 2))

    assert blocks(16384, PatternSpec("strided", 128)) == (64, 64)  # 128 rows per column
    assert blocks(12288, PatternSpec("strided", 128)) == (32, 32)  # 96
    assert blocks(3072, PatternSpec("strided", 96)) == (32, 32)  # 32
    assert blocks(1024, PatternSpec("strided", 64)) == (64, 64)  # 16: v1 at its best tiles
    assert blocks(12288, PatternSpec("fixed", 128, 32)) == (64, 64)  # no column constraint
    assert blocks(32, PatternSpec("dense")) == (32, 32)


def test_uneven_parts_launch_their_longest_tiles_first():
    from sparse_lm.attention.layout import build_layout

    pattern = PatternSpec("fixed", 16, 4).layer_pattern(0, 2)
    block, summary = build_layout(pattern, 256, 16, 16).groups[0].parts
    assert summary.k_index is not None and block.k_index is None
    # Summary queries: later tiles visit more key blocks -> tile axis last, reversed.
    grid, remap = pallas_gpu._launch_order(summary.fwd, 3, 2, heavy_first=True)
    assert grid == (2, 3, 16)
    spec = remap(pl.BlockSpec((16,), lambda i, j, n: (i, j, n)))
    assert spec.index_map(1, 2, 0) == (15, 2, 1)  # (head, batch, tile 0) -> last tile
    # Summary keys: earlier key tiles are seen by more queries -> not reversed.
    grid, remap = pallas_gpu._launch_order(summary.bwd, 3, 2, heavy_first=True)
    spec = remap(pl.BlockSpec((16,), lambda i, j, n: (i, j, n)))
    assert grid == (2, 3, 4) and spec.index_map(1, 2, 0) == (0, 2, 1)
    # Even work (the block part) and heavy_first=False keep the tile-major grid.
    assert pallas_gpu._launch_order(block.fwd, 3, 2, heavy_first=True)[0] == (16, 3, 2)
    assert pallas_gpu._launch_order(summary.fwd, 3, 2, heavy_first=False)[0] == (16, 3, 2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_longest_first_order_gives_the_same_results(dtype):
    spec = PatternSpec("fixed", 16, 4, combine="merged")
    pattern = spec.layer_pattern(0, 2)
    shape = (2, 256, 2, 64)
    assert_matches_reference(spec, 0, shape, dtype, block_q=16, block_k=16)
    q, k, v, g = fresh_inputs(shape, dtype)
    a = output_and_grads(lambda *x: pallas_gpu.attention(*x, pattern, block_q=16, block_k=16), q, k, v, g)
    b = output_and_grads(lambda *x: pallas_gpu.attention(*x, pattern, block_q=16, block_k=16,
                                                         heavy_first=False), q, k, v, g)
    for what, x, y in zip(("out", "dq", "dk", "dv"), a, b):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32), err_msg=what)


def assert_matches_default_launches(pattern, shape, dtype, **opts):
    """Output and gradients with ``opts`` equal the plainest v2 arrangement's (16x16 tiles,
    one launch per part, float32 partials, split backward kernels, Triton's kernels only)
    within float rounding: the options regroup the same arithmetic, they do not change it."""
    q, k, v, g = fresh_inputs(shape, dtype)
    got = output_and_grads(lambda *x: pallas_gpu.attention(*x, pattern, **opts), q, k, v, g)
    want = output_and_grads(lambda *x: pallas_gpu.attention(*x, pattern, block_q=16, block_k=16,
                                                            colaunch=False, narrow_chain=False,
                                                            column_bwd=False, diag_bwd=False,
                                                            mosaic_summary_dq=False),
                            q, k, v, g)
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
    for what, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        assert bool(jnp.isfinite(x).all()), what
        assert rel_err(x, y) < tol, what


@pytest.mark.parametrize("name,opts", [("strided", {}), ("fixed", {}),
                                       ("fixed", {"diag_bwd": False, "mosaic_summary_dq": False}),
                                       ("fixed", {"colaunch": False, "narrow_chain": False}),
                                       ("strided", {"narrow_chain": False})],
                         ids=["strided", "fixed", "fixed-split-bwd", "fixed-split-launch-f32-chain",
                              "strided-f32-chain"])
def test_kernels_lower_for_cuda_at_the_benchmark_shape(name, opts):
    """The real Triton lowering (not the interpreter) on a CPU machine: an abstract H100
    stands in for the GPU, so the launch order and the Mosaic kernels of the GPU path
    are lowered in CI, not first on the GPU."""
    spec = PatternSpec(name, 128, 32, combine="merged")
    pattern = spec.layer_pattern(0, 8)
    x = jax.ShapeDtypeStruct((2, 16384, 8, 64), jnp.bfloat16)

    def grads(q, k, v):
        loss = lambda *a: pallas_gpu.attention(*a, pattern, interpret=False, **opts).astype(jnp.float32).sum()  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(grads).trace(x, x, x).lower(lowering_platforms=("cuda",)).as_text()
    import re

    kernels = set(re.findall(r"sparse_attn_\w+?_v2\b", text))
    if name == "fixed" and opts.get("diag_bwd", True):
        # The default for merged fixed heads: the Mosaic summary dK/dV+dq kernel, then
        # the block part's dq, dk, dv in one diagonal-block launch.
        assert kernels == {"sparse_attn_fwd_v2", "sparse_attn_bwd_diag_v2"}, kernels
        assert "mosaic_gpu" in text
        return
    assert {"sparse_attn_fwd_v2", "sparse_attn_bwd_dq_v2", "sparse_attn_bwd_dkv_v2"} <= kernels, kernels


COLAUNCH_CASES = [
    (PatternSpec("fixed", 16, 4, combine="merged"), 0, (1, 256, 2, 64), jnp.float32, {}),
    (PatternSpec("fixed", 16, 4, combine="merged"), 0, (2, 128, 2, 64), jnp.bfloat16, {}),
    (PatternSpec("fixed", 16, 4, combine="multihead", distinct_summaries=True), 0, (1, 128, 4, 128),
     jnp.float32, {}),
    (PatternSpec("strided", 16, combine="merged"), 0, (1, 256, 2, 64), jnp.float32, {}),
]


@pytest.mark.parametrize("spec,layer,shape,dtype,opts", COLAUNCH_CASES,
                         ids=["fixed-f32", "fixed-bf16-B2", "multihead-distinct-D128",
                              "strided-unchanged"])
def test_colaunched_parts_match_reference_and_the_chained_launches(spec, layer, shape, dtype, opts):
    opts = dict(block_q=16, block_k=16, colaunch=True, **opts)
    assert_matches_reference(spec, layer, shape, dtype, **opts)
    assert_matches_default_launches(spec.layer_pattern(layer, shape[2]), shape, dtype, **opts)


def test_colaunch_puts_the_fixed_patterns_parts_in_one_forward_and_one_dq_launch():
    import re

    pattern = PatternSpec("fixed", 16, 4, combine="merged").layer_pattern(0, 2)
    q = jnp.zeros((1, 256, 2, 64), jnp.float32)

    def launches(**opts):
        def f(q, k, v):
            o, vjp = jax.vjp(lambda *a: pallas_gpu.attention(*a, pattern, block_q=16, block_k=16,
                                                             **opts), q, k, v)
            return o, vjp(o)
        names = re.findall(r"name=(sparse_attn\w*)", str(jax.make_jaxpr(f)(q, q, q)))
        return {n: names.count(n) for n in set(names)}

    assert launches(colaunch=False) == {"sparse_attn_fwd_v2": 2, "sparse_attn_bwd_dq_v2": 2,
                                        "sparse_attn_bwd_dkv_v2": 2}
    assert launches() == {"sparse_attn_fwd_v2": 1, "sparse_attn_bwd_dq_v2": 1,  # colaunch: the default
                          "sparse_attn_bwd_dkv_v2": 2}


def test_bench_shape_times_every_pattern_tile_and_path(monkeypatch):
    """bench_attention.bench_shape with the timer and kernels stubbed out: one row per
    (pattern, tile, path) and no error, so a GPU run is not cut short by the script."""
    import importlib.util

    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_attention.py"
    mod_spec = importlib.util.spec_from_file_location("bench_attention_stubbed", path)
    bench = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "time_jax", lambda fn, *args, **kw: 1.0)
    monkeypatch.setattr(bench, "fused_taken", lambda *a: True)
    monkeypatch.setattr(bench, "ours_fn", lambda spec, h, **opts: (lambda q, k, v: q))
    bench.RESULTS.update(check=[], timings=[], errors=[], layout=[])
    bench.bench_shape((1, 1024, 2, 64), quick=True, sweep=False, blocks=[(64, 64), (32, 32)],
                      extra=("v1", "split_launch", "summary_dkv_128"))
    assert bench.RESULTS["errors"] == []
    rows = {(r["impl"], r["pattern"]) for r in bench.RESULTS["timings"]}
    for name in ("strided", "fixed", "local"):
        for tile in ("64x64", "32x32"):
            assert (f"ours_{tile}", name) in rows and (f"ours_{tile}_v1", name) in rows
    fixed_only = {impl for impl, name in rows if impl.endswith(("_splitlaunch", "_sdkv128"))}
    assert fixed_only == {"ours_64x64_splitlaunch", "ours_32x32_splitlaunch", "ours_64x64_sdkv128",
                          "ours_32x32_sdkv128"}
    assert all(name == "fixed" for impl, name in rows if impl in fixed_only)
    assert ("cudnn_dense_causal", "dense") in rows


@pytest.mark.parametrize("name", ["strided", "fixed"])
def test_narrow_chain_hands_bf16_partials_between_launches_within_bf16_error(name):
    spec = PatternSpec(name, 16, 4, combine="merged")
    shape = (1, 256, 2, 64)
    opts = dict(block_q=16, block_k=16, narrow_chain=True)
    assert_matches_reference(spec, 0, shape, jnp.bfloat16, **opts)
    assert_matches_default_launches(spec.layer_pattern(0, 2), shape, jnp.bfloat16, **opts)
    pattern = spec.layer_pattern(0, 2)

    def result_dtypes(dtype, **kw):
        """dtypes of the kernels' full-length results: o, dq, dk, dv and the partial ones
        handed between launches (views included; not lse, not the gathered summary
        columns' dk, dv, which are float32 by design and scatter-added in float32).
        Triton's kernels only: the Mosaic summary kernel adds into a float32 dq by
        design (mosaic_summary_dq)."""
        q = jnp.zeros(shape, dtype)

        def f(q, k, v):
            o, vjp = jax.vjp(lambda *a: pallas_gpu.attention(*a, pattern, block_q=16, block_k=16,
                                                             mosaic_summary_dq=False, **kw),
                             q, k, v)
            return o, vjp(o)

        with warnings.catch_warnings():  # e.g. a bf16 + float32 scatter-add: JAX warns
            warnings.simplefilter("error", FutureWarning)
            jaxpr = jax.make_jaxpr(f)(q, q, q).jaxpr
        out = set()
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                out |= {str(v.aval.dtype) for v in eqn.outvars if v.aval.size == np.prod(shape)}
        return out

    assert result_dtypes(jnp.bfloat16, narrow_chain=False) == {"bfloat16", "float32"}  # float32 chain
    assert result_dtypes(jnp.bfloat16) == {"bfloat16"}  # the default: narrow
    assert result_dtypes(jnp.float32) == {"float32"}


@pytest.mark.parametrize("d", [64, 128])
def test_gpu_launches_use_four_warps_at_both_head_dims(d):
    """At D=128 eight warps measured 2.1x slower than four (H200, tune_attention.py)."""
    import re

    pattern = PatternSpec("fixed", 16, 4, combine="merged").layer_pattern(0, 2)
    q = jnp.zeros((1, 256, 2, d), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(jax.grad(lambda q: pallas_gpu.attention(
        q, q, q, pattern, interpret=False, block_q=16, block_k=16).astype(jnp.float32).sum()))(q)
    assert set(re.findall(r"num_warps=\d+", str(jaxpr))) == {"num_warps=4"}


def test_bench_attention_writes_its_json_when_stopped_inside_the_check(monkeypatch, tmp_path):
    """A `timeout` that lands in the GPU check still leaves the cases checked so far."""
    import importlib.util
    import json
    import signal
    import sys

    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_attention.py"
    mod_spec = importlib.util.spec_from_file_location("bench_attention_stopped", path)
    bench = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(bench)

    def check_then_stop(quick, extra):
        bench.RESULTS["check"].append({"pattern": "strided", "ok": True})
        raise KeyboardInterrupt  # what the script's SIGTERM handler raises

    monkeypatch.setattr(bench, "gpu_check", check_then_stop)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # keep pytest's own handlers
    out = tmp_path / "b.json"
    monkeypatch.setattr(sys, "argv", ["bench_attention.py", str(out), "--check-only"])
    bench.RESULTS.update(check=[], timings=[], errors=[], layout=[])
    bench.main()
    saved = json.loads(out.read_text())
    assert saved["check"] == [{"pattern": "strided", "ok": True}]
    assert saved["errors"][0]["what"] == "interrupted" and saved["timings"] == []


def test_bench_attention_gpu_check_runs_every_option_case(monkeypatch):
    """The GPU check's own logic, on the CPU: its kernels and the reference replaced by
    the identity (output q, gradients q, k, v). Every case of the default path and of
    two options runs, and each row is within tolerance. Whether the Mosaic kernel ran is
    traced for real, layer by layer: an interleaved layer of block heads only has no
    summary keys, so it need not (and does not) run it."""
    import importlib.util

    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_attention.py"
    mod_spec = importlib.util.spec_from_file_location("bench_attention_check", path)
    bench = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "value_and_grads", lambda fn: lambda q, k, v, g: (q, (q, k, v)))
    monkeypatch.setattr(bench, "column_taken", lambda *a, **k: True)
    bench.gpu_check(quick=True, extra=("mosaic_summary_dkv", "split_bwd"))
    rows = bench.RESULTS["check"]
    assert [r for r in rows if not r["ok"]] == []
    assert {r["variant"] for r in rows} == {"default", "_mosaicdkv", "_splitbwd"}
    assert {r["pattern"] for r in rows if r["variant"] == "_splitbwd"} == {"strided"}
    mosaic = {(r["combine"], r["layer"], r["d"], r["dtype"]): r["mosaic_dkv_taken"]
              for r in rows if r["variant"] == "_mosaicdkv"}
    assert mosaic[("merged", 0, 64, "bfloat16")] and mosaic[("interleaved", 1, 64, "bfloat16")]
    assert not mosaic[("interleaved", 0, 64, "bfloat16")]  # block heads only
    assert not mosaic[("merged", 0, 128, "float32")]  # Triton's kernel there


COLUMN_BWD_CASES = [
    # (spec, layer, shape, dtype, (block_q, block_k)); l=16: columns of T/16 rows
    (PatternSpec("strided", 16, combine="merged"), 0, (2, 512, 2, 64), jnp.bfloat16, (16, 16)),  # 2 tiles
    (PatternSpec("strided", 16, combine="merged"), 0, (1, 256, 2, 64), jnp.float32, (16, 16)),  # 1 tile
    (PatternSpec("strided", 16, combine="multihead"), 0, (1, 512, 4, 128), jnp.float32, (16, 16)),
    (PatternSpec("strided", 16, combine="interleaved"), 1, (1, 512, 2, 64), jnp.float32, (16, 16)),
    (PatternSpec("strided", 16, combine="merged"), 0, (2, 512, 2, 64), jnp.float32, (16, 32)),
]


@pytest.mark.parametrize("spec,layer,shape,dtype,blocks", COLUMN_BWD_CASES,
                         ids=["merged-bf16-2tiles", "merged-f32-1tile", "multihead-D128", "stride-only-layer",
                              "key-tiles-of-32"])
def test_column_backward_matches_reference_and_the_split_kernels(spec, layer, shape, dtype, blocks, monkeypatch):
    # The kernel is also checked at D=128, where the default leaves it off (slower there).
    monkeypatch.setattr(pallas_gpu, "COLUMN_BWD_MAX_HEAD_DIM", 128)
    opts = dict(block_q=blocks[0], block_k=blocks[1])
    pattern = spec.layer_pattern(layer, shape[2])
    assert "sparse_attn_bwd_column_v2" in kernel_names(pattern, shape, **opts)  # the default
    assert_matches_reference(spec, layer, shape, dtype, **opts)
    assert_matches_default_launches(pattern, shape, dtype, **opts)


def test_column_backward_takes_only_columns_of_at_most_two_tiles_and_head_dims_up_to_64():
    pattern = PatternSpec("strided", 16, combine="merged").layer_pattern(0, 2)
    column = "sparse_attn_bwd_column_v2"
    assert column in kernel_names(pattern, (1, 512, 2, 64), block_q=16, block_k=16)  # 2 tiles: default
    # T=768: 48-row columns, three 16-row tiles: the split kernels run.
    names = kernel_names(pattern, (1, 768, 2, 64), block_q=16, block_k=16)
    assert column not in names and "sparse_attn_bwd_dkv_v2" in names
    # D=128 (measured slower there) and column_bwd=False keep the split kernels too;
    # patterns without a strided part never take it.
    assert column not in kernel_names(pattern, (1, 512, 2, 128), block_q=16, block_k=16)
    assert column not in kernel_names(pattern, (1, 512, 2, 64), block_q=16, block_k=16, column_bwd=False)
    fixed = PatternSpec("fixed", 16, 4, combine="merged").layer_pattern(0, 2)
    assert column not in kernel_names(fixed, (1, 256, 2, 64), block_q=16, block_k=16)


def lowered_for_cuda(spec: PatternSpec, **opts) -> str:
    """The gradient of the kernel at the benchmark shape (2, 16384, 8, 64), bf16, lowered
    for an H100 (GPU code paths, not the interpreter) as text."""
    pattern = spec.layer_pattern(0, 8)
    x = jax.ShapeDtypeStruct((2, 16384, 8, 64), jnp.bfloat16)
    loss = lambda q, k, v: pallas_gpu.attention(q, k, v, pattern, interpret=False,  # noqa: E731
                                                **opts).astype(jnp.float32).sum()
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.trace(x, x, x).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("combine", ["merged", "multihead"])
def test_summary_dkv_tiles_change_only_the_summary_dkv_kernel(combine, monkeypatch):
    spec = PatternSpec("fixed", 16, 4, combine=combine)
    pattern, shape = spec.layer_pattern(0, 2), (1, 256, 2, 64)
    seen = []  # (query tile rows, gathered?) of every dK/dV launch
    real = pallas_gpu._dkv_call_v2

    def spy(q, k, v, do, lse, delta, dkv0, part, *a, **kw):
        seen.append((part.block_q, part.k_index is not None))
        return real(q, k, v, do, lse, delta, dkv0, part, *a, **kw)

    monkeypatch.setattr(pallas_gpu, "_dkv_call_v2", spy)
    # diag_bwd off: the block parts keep the split dK/dV kernel this test watches.
    opts = dict(block_q=16, block_k=16, summary_dkv_block_q=32, diag_bwd=False)
    assert_matches_reference(spec, 0, shape, jnp.float32, **opts)
    assert_matches_default_launches(pattern, shape, jnp.bfloat16, **opts)
    assert (32, True) in seen and (16, False) in seen and (32, False) not in seen
    with pytest.raises(PatternError, match="summary_dkv_block_q=24 must be a power of two"):
        pallas_gpu.attention(*fresh_inputs(shape, jnp.float32)[:3], pattern, summary_dkv_block_q=24)


def test_column_backward_lowers_for_cuda_at_the_benchmark_shape():
    """Strided l=128: 128-row columns of two 64-row tiles."""
    assert "sparse_attn_bwd_column_v2" in lowered_for_cuda(PatternSpec("strided", 128, combine="merged"))


# delta_in_dq: the backward's delta = rowsum(do * o) comes from the first dQ launch.
def xla_reductions(pattern, shape, dtype=jnp.float32, **opts) -> int:
    """reduce_sum equations outside the kernels in the jaxpr of a forward+backward."""

    def count(jaxpr) -> int:
        n = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                continue  # inside a kernel
            n += eqn.primitive.name == "reduce_sum"
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                n += count(sub)
        return n

    return count(forward_backward_jaxpr(pattern, shape, dtype, **opts).jaxpr)


# (spec, layer, options, XLA delta passes with delta_in_dq, without): one pass per head
# group without it; with it, only groups whose backward has no dQ launch keep theirs
# (the block-only head group of multihead: its one diag_bwd kernel).
@pytest.mark.parametrize("spec,layer,opts,on,off", [
    (PatternSpec("strided", 16, combine="merged"), 0, {}, 0, 1),
    (PatternSpec("local", 16), 0, {}, 0, 1),
    (PatternSpec("fixed", 16, 4, combine="multihead"), 0, {}, 1, 2),
    (PatternSpec("fixed", 16, 4, combine="interleaved"), 1, {}, 0, 1),
    # The stride part alone, split kernels: the first dQ launch reads and writes rows in
    # column order (delta through the strided view).
    (PatternSpec("strided", 16, combine="interleaved"), 1, {"column_bwd": False}, 0, 1),
], ids=["strided", "local", "fixed-multihead", "summary-only-layer", "stride-only-layer"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_delta_comes_from_the_first_dq_launch_not_xla(spec, layer, opts, on, off, dtype):
    shape = (1, 256, 2, 64)
    pattern = spec.layer_pattern(layer, shape[2])
    opts = dict(block_q=16, block_k=16, **opts)
    assert xla_reductions(pattern, shape, dtype, **opts) == on
    assert xla_reductions(pattern, shape, dtype, delta_in_dq=False, **opts) == off
    # The same arithmetic in another kernel: equal up to the order of delta's float32
    # sum (a last bit of a bf16 output can flip: ~1e-7 measured).
    q, k, v, g = fresh_inputs(shape, dtype)
    got, want = (output_and_grads(lambda *x: pallas_gpu.attention(*x, pattern, delta_in_dq=flag, **opts),
                                  q, k, v, g) for flag in (True, False))
    for what, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        assert bool(jnp.isfinite(x.astype(jnp.float32)).all()) and rel_err(x, y) < 1e-5, what


def test_merged_fixed_heads_keep_the_xla_delta():
    """In bf16 their backward has no dQ launch (the Mosaic kernel's dq and diag_bwd): the
    option changes nothing there."""
    pattern = PatternSpec("fixed", 64, 16, combine="merged").layer_pattern(0, 2)
    shape = (1, 256, 2, 64)
    assert "sparse_attn_bwd_dq_v2" not in kernel_names(pattern, shape, jnp.bfloat16)
    assert xla_reductions(pattern, shape, jnp.bfloat16) == 1


# mosaic_summary_dkv: the fixed pattern's summary dK/dV from the Mosaic GPU kernel (its
# interpret mode here) at 64 x 128 tiles, the rest of the Triton chain unchanged.
MOSAIC_DKV_CASES = [
    (PatternSpec("fixed", 64, 16, combine="merged"), 0),  # block part + summary part
    # Two head groups; the summary heads' columns differ per head (their own lo) and
    # their rule is causal, so a wrong lo changes the mask.
    (PatternSpec("fixed", 64, 16, combine="multihead", distinct_summaries=True), 0),
    (PatternSpec("fixed", 64, 16, combine="interleaved"), 1),  # the summary part alone
]


def mosaic_kernels(pattern, shape, dtype=jnp.bfloat16, **opts) -> set[str]:
    """The Mosaic GPU kernels a forward+backward launches: mgpu_attn_dkv_summary (dK/dV),
    mgpu_attn_dkvdq_summary (dK/dV and dq by reductions; a core_map: kernel_name='...')."""
    import re

    q = jnp.zeros(shape, dtype)
    jaxpr = jax.make_jaxpr(lambda q: jax.vjp(
        lambda x: pallas_gpu.attention(x, x, x, pattern, **opts), q)[1](q))(q)
    return set(re.findall(r"name='?(mgpu_attn_\w+)", str(jaxpr)))


def mosaic_dkv_runs(pattern, shape, dtype, **opts) -> bool:
    """Whether a forward+backward with mosaic_summary_dkv=True (and its dq from Triton)
    launches the Mosaic dK/dV kernel."""
    opts = dict(mosaic_summary_dkv=True, mosaic_summary_dq=False) | opts
    return "mgpu_attn_dkv_summary" in mosaic_kernels(pattern, shape, dtype, **opts)


@pytest.mark.parametrize("spec,layer", MOSAIC_DKV_CASES, ids=["merged", "multihead-distinct-summaries", "summary-only-layer"])
def test_mosaic_summary_dkv_matches_reference_and_the_triton_kernel(spec, layer):
    shape = (1, 256, 4 if spec.combine == "multihead" else 2, 64)  # multihead: two summary heads
    pattern = spec.layer_pattern(layer, shape[2])
    opts = dict(mosaic_summary_dkv=True, mosaic_summary_dq=False)
    assert mosaic_dkv_runs(pattern, shape, jnp.bfloat16)
    # Triton's dK/dV kernel runs for the merged block part only: multihead's block heads
    # take the one-launch diag_bwd kernel, the summary-only layer has no block part.
    names = kernel_names(pattern, shape, jnp.bfloat16, **opts)
    assert ("sparse_attn_bwd_dkv_v2" in names) == (spec.combine == "merged")
    assert ("sparse_attn_bwd_diag_v2" in names) == (spec.combine == "multihead")
    assert_matches_reference(spec, layer, shape, jnp.bfloat16, **opts)
    assert_matches_default_launches(pattern, shape, jnp.bfloat16, **opts)


def test_mosaic_summary_dkv_applies_only_where_it_can():
    fixed = PatternSpec("fixed", 64, 16, combine="merged").layer_pattern(0, 2)
    assert mosaic_dkv_runs(fixed, (1, 256, 2, 64), jnp.bfloat16)
    assert not mosaic_dkv_runs(fixed, (1, 256, 2, 64), jnp.float32)  # wgmma: 16-bit operands
    assert not mosaic_dkv_runs(fixed, (1, 256, 2, 128), jnp.bfloat16)  # slower at D=128 (session 3)
    assert not mosaic_dkv_runs(fixed, (1, 192, 2, 64), jnp.bfloat16)  # T not a multiple of 128
    strided = PatternSpec("strided", 16, combine="merged").layer_pattern(0, 2)
    assert not mosaic_dkv_runs(strided, (1, 256, 2, 64), jnp.bfloat16)  # no gathered keys
    x = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    with pytest.raises(PatternError, match="set only one"):
        pallas_gpu.attention(x, x, x, fixed, mosaic_summary_dkv=True, summary_dkv_block_q=128)
    # Where it would not apply anyway, the other option simply runs.
    pallas_gpu.attention(x.astype(jnp.float32), x.astype(jnp.float32), x.astype(jnp.float32),
                         fixed, mosaic_summary_dkv=True, summary_dkv_block_q=128)


def test_mosaic_summary_dkv_lowers_for_cuda_at_the_benchmark_shape():
    """Fixed l=128 c=32: the Mosaic kernel (register-operand wgmma, as on the GPU)
    inside the Triton chain, lowered through both compilers' front ends."""
    text = lowered_for_cuda(PatternSpec("fixed", 128, 32, combine="merged"), mosaic_summary_dkv=True,
                            mosaic_summary_dq=False)
    assert "mgpu_attn_dkv_summary" in text and "sparse_attn_bwd_dq_v2" in text


# mosaic_summary_dq: the Mosaic dK/dV kernel also emits the summary part's dq, by TMA
# bulk-add reductions on the GPU; in the interpreter by a read-add-write of dq, one
# compute warpgroup per step in turn (the same order the GPU uses for its reductions).
@pytest.mark.parametrize("spec,layer", [MOSAIC_DKV_CASES[0], MOSAIC_DKV_CASES[2]], ids=["merged", "summary-only-layer"])
def test_mosaic_summary_dq_matches_reference_and_the_triton_kernels(spec, layer):
    # (the multihead layout: the jitted test below)
    shape = (1, 256, 2, 64)
    pattern = spec.layer_pattern(layer, shape[2])
    assert mosaic_kernels(pattern, shape, mosaic_summary_dq=True) == {"mgpu_attn_dkvdq_summary"}
    assert_matches_reference(spec, layer, shape, jnp.bfloat16, mosaic_summary_dq=True)
    assert_matches_default_launches(pattern, shape, jnp.bfloat16, mosaic_summary_dq=True)


@pytest.mark.parametrize("spec,shape", [
    (PatternSpec("fixed", 64, 16, combine="merged", distinct_summaries=True), (1, 256, 4, 64)),
    (PatternSpec("fixed", 128, 32, combine="merged"), (2, 512, 2, 64)),
], ids=["l64-distinct-summaries", "l128-B2"])
def test_persistent_dkvdq_matches_reference_and_the_triton_kernels(spec, shape):
    """``mosaic_dkvdq_persistent``: three programs (in the interpreter) walk all the
    (head, key tile, batch) items, of different lengths, back to back, with the query
    stream, the K/V slots and the dq turns carried across items; alone and with the
    persistent forward."""
    pattern = spec.layer_pattern(0, shape[2])
    opts = dict(mosaic_dkvdq_persistent=True)
    assert mosaic_kernels(pattern, shape, **opts) == {"mgpu_attn_dkvdq_persistent_summary"}
    assert_matches_reference(spec, 0, shape, jnp.bfloat16, **opts)
    assert_matches_default_launches(pattern, shape, jnp.bfloat16, **opts)
    both = dict(opts, mosaic_forward=True, mosaic_forward_persistent=True)
    assert mosaic_kernels(pattern, shape, **both) == {"mgpu_attn_dkvdq_persistent_summary",
                                                      "mgpu_attn_fwd_merged_persistent"}
    assert_matches_reference(spec, 0, shape, jnp.bfloat16, **both)


def test_persistent_dkvdq_lowers_for_cuda_and_needs_the_mosaic_dq():
    text = lowered_for_cuda(PatternSpec("fixed", 128, 32, combine="merged"),
                            mosaic_dkvdq_persistent=True, mosaic_forward=True,
                            mosaic_forward_persistent=True)
    assert "mgpu_attn_fwd_merged_persistent" in text
    # The in-place dK/dV+dq launch carries no kernel name in the text: its schedule's item
    # table, [32 key tiles x 8 heads x 2 batches, 3], tells the persistent form.
    assert "output_operand_aliases" in text and "tensor<512x3xi32>" in text
    # Where the Mosaic dq does not run (reproducible dq), the option changes nothing.
    merged = PatternSpec("fixed", 64, 16, combine="merged").layer_pattern(0, 2)
    assert mosaic_kernels(merged, (1, 256, 2, 64), mosaic_summary_dq=False,
                          mosaic_dkvdq_persistent=True) == set()


@pytest.mark.parametrize("form", ["key_major", "query_major", "persistent"])
def test_mosaic_summary_dq_under_jit_with_two_head_groups(form, monkeypatch):
    """Two groups' kernels in one jitted program (a multihead layer with per-head summary
    columns): each runs to completion and their dq are right, in every form of the
    Mosaic dK/dV+dq kernel (pallas_gpu.MOSAIC_DKVDQ_FORM, and the key-major kernel's
    persistent launch)."""
    persistent = form == "persistent"
    monkeypatch.setattr(pallas_gpu, "MOSAIC_DKVDQ_FORM", "key_major" if persistent else form)
    spec = PatternSpec("fixed", 64, 16, combine="multihead", distinct_summaries=True)
    shape = (1, 256, 4, 64)
    pattern = spec.layer_pattern(0, 4)
    kernel = {"key_major": "mgpu_attn_dkvdq_summary", "query_major": "mgpu_attn_dkvdq_qm_summary",
              "persistent": "mgpu_attn_dkvdq_persistent_summary"}[form]
    opts = dict(mosaic_summary_dq=True, mosaic_dkvdq_persistent=persistent)
    assert mosaic_kernels(pattern, shape, **opts) == {kernel}
    q, k, v, g = fresh_inputs(shape, jnp.bfloat16)
    got = jax.jit(lambda *a: output_and_grads(
        lambda *x: pallas_gpu.attention(*x, pattern, **opts), *a))(q, k, v, g)
    with jax.default_matmul_precision("highest"):
        want = output_and_grads(lambda *a: reference_attention(*a, pattern),
                                *(x.astype(jnp.float32) for x in (q, k, v, g)))
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(x, ref) < TOL[jnp.bfloat16], name


def test_mosaic_summary_dq_is_on_by_default_for_merged_summary_heads_only():
    """Measured on an H200 (BENCHMARKS.md, session 7): faster for merged fixed heads,
    slower for a group of summary heads alone (multihead, or a summary-only layer)."""
    shape = (1, 256, 4, 64)
    merged = PatternSpec("fixed", 64, 16, combine="merged").layer_pattern(0, 4)
    multihead = PatternSpec("fixed", 64, 16, combine="multihead").layer_pattern(0, 4)
    summary_only = PatternSpec("fixed", 64, 16, combine="interleaved").layer_pattern(1, 4)
    dq_kernel = {"mgpu_attn_dkvdq_summary"}
    assert mosaic_kernels(merged, shape) == dq_kernel
    assert mosaic_kernels(multihead, shape) == set()
    assert mosaic_kernels(summary_only, shape) == set()
    assert mosaic_kernels(multihead, shape, mosaic_summary_dq=True) == dq_kernel
    assert mosaic_kernels(summary_only, shape, mosaic_summary_dq=True) == dq_kernel
    assert mosaic_kernels(merged, shape, mosaic_summary_dq=False) == set()  # reproducible dq
    # Where the Mosaic kernel cannot run, Triton's kernels do.
    assert mosaic_kernels(merged, shape, jnp.float32) == set()
    assert mosaic_kernels(merged, (1, 256, 4, 128)) == set()
    # The option that configures Triton's summary dK/dV kernel turns the default off...
    assert mosaic_kernels(merged, shape, summary_dkv_block_q=128) == set()
    # ... and asking for both is an error that names the fix.
    x = jnp.zeros(shape, jnp.bfloat16)
    with pytest.raises(PatternError, match="set only one.*mosaic_summary_dq=False"):
        pallas_gpu.attention(x, x, x, merged, mosaic_summary_dq=True, summary_dkv_block_q=128)
    # mosaic_summary_dkv with the default: merged groups still get dq from Mosaic.
    assert mosaic_kernels(merged, shape, mosaic_summary_dkv=True) == dq_kernel
    assert mosaic_kernels(multihead, shape, mosaic_summary_dkv=True) == {"mgpu_attn_dkv_summary"}


def test_mosaic_summary_dq_lowers_for_cuda_with_dq_updated_in_place():
    """The default at the benchmark shape: the Mosaic kernel adds into a zero float32 dq
    (an aliased operand), which the block part's diag_bwd kernel then finishes; with
    diag_bwd=False it adds into the block part's dq from the dQ kernel. Lowered for an
    H100."""
    text = lowered_for_cuda(PatternSpec("fixed", 128, 32, combine="merged"))
    assert "stablehlo.custom_call @mosaic_gpu_v2" in text and "output_operand_aliases" in text
    assert "sparse_attn_bwd_diag_v2" in text and "sparse_attn_bwd_dq_v2" not in text
    text = lowered_for_cuda(PatternSpec("fixed", 128, 32, combine="merged"), diag_bwd=False)
    assert "output_operand_aliases" in text and "sparse_attn_bwd_dq_v2" in text


def test_head_groups_of_consecutive_heads_are_sliced_not_gathered():
    """multihead: heads 0..H/2-1 are one group, the rest another. Gathers and scatters of
    those heads cost 2.9 of 4.7 ms per layer at the enwik8 shape on an H200."""
    pattern = PatternSpec("fixed", 16, 4, combine="multihead").layer_pattern(0, 4)
    q = jnp.zeros((1, 64, 4, 64), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda q: jax.vjp(
        lambda x: pallas_gpu.attention(x, x, x, pattern, block_q=16, block_k=16), q)[1](q))(q))
    assert "gather" not in jaxpr and "scatter" not in jaxpr
    assert_matches_reference(PatternSpec("fixed", 16, 4, combine="multihead"), 0, (1, 64, 4, 64),
                             jnp.float32, block_q=16, block_k=16)


def test_mosaic_dkv_scheduling_knobs_off_keep_the_gradients(monkeypatch):
    """overlap_wgmma (S^T and dP^T issued together; on the GPU dV, dK and dq too) and
    max_registers (both on by default, measured faster) change when the matmuls run, not
    what they compute: with them off (every other test runs them on) the gradients are
    the same. The interpreter runs wgmma synchronously: this checks the arithmetic and
    the barriers; the GPU form (one wgmma at a time) is lowered for CUDA."""
    assert pallas_gpu.MOSAIC_DKV_OPTIONS == dict(overlap_wgmma=True, max_registers=True)
    monkeypatch.setattr(pallas_gpu, "MOSAIC_DKV_OPTIONS", dict(overlap_wgmma=False, max_registers=False))
    spec = PatternSpec("fixed", 64, 16, combine="merged")
    assert_matches_reference(spec, 0, (1, 256, 2, 64), jnp.bfloat16)  # dK/dV and dq
    assert_matches_reference(spec, 0, (1, 256, 2, 64), jnp.bfloat16, mosaic_summary_dkv=True,
                             mosaic_summary_dq=False)  # dK/dV only
    text = lowered_for_cuda(PatternSpec("fixed", 128, 32, combine="merged"))
    assert "stablehlo.custom_call @mosaic_gpu_v2" in text


# The query-major form of the dK/dV+dq kernel (MOSAIC_DKVDQ_FORM="query_major",
# FlashAttention-3's layout: 128 x 128 steps whose query rows the two compute warpgroups
# split; one accumulates dV, the other dK). Same contract as the key-major form.
@pytest.mark.parametrize("spec,layer,shape", [
    (PatternSpec("fixed", 64, 16, combine="merged"), 0, (1, 256, 2, 64)),
    (PatternSpec("fixed", 128, 32, combine="merged"), 0, (2, 512, 2, 64)),  # the bench's l, c
    (PatternSpec("fixed", 64, 16, combine="interleaved"), 1, (1, 256, 2, 64)),  # summary alone
], ids=["merged", "merged-l128-batch2", "summary-only-layer"])
def test_query_major_dkvdq_matches_reference_and_the_default_launches(spec, layer, shape, monkeypatch):
    monkeypatch.setattr(pallas_gpu, "MOSAIC_DKVDQ_FORM", "query_major")
    pattern = spec.layer_pattern(layer, shape[2])
    assert mosaic_kernels(pattern, shape, mosaic_summary_dq=True) == {"mgpu_attn_dkvdq_qm_summary"}
    assert_matches_reference(spec, layer, shape, jnp.bfloat16, mosaic_summary_dq=True)
    assert_matches_default_launches(pattern, shape, jnp.bfloat16, mosaic_summary_dq=True)


def test_query_major_dkvdq_lowers_for_cuda_and_a_wrong_form_is_named(monkeypatch):
    """The GPU code path (register-operand wgmma for dq, per-warpgroup TMA reductions)
    through the Mosaic GPU compiler's front end, at the benchmark shape."""
    monkeypatch.setattr(pallas_gpu, "MOSAIC_DKVDQ_FORM", "query_major")
    text = lowered_for_cuda(PatternSpec("fixed", 128, 32, combine="merged"))
    assert "stablehlo.custom_call @mosaic_gpu_v2" in text and "output_operand_aliases" in text
    monkeypatch.setattr(pallas_gpu, "MOSAIC_DKVDQ_FORM", "query-major")
    x = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    pattern = PatternSpec("fixed", 64, 16, combine="merged").layer_pattern(0, 2)
    with pytest.raises(ValueError, match="MOSAIC_DKVDQ_FORM='query-major'.*'key_major' or 'query_major'"):
        jax.vjp(lambda q: pallas_gpu.attention(q, x, x, pattern), x)


# diag_bwd: a part that stays inside diagonal blocks (the fixed pattern's block part)
# gets dq, dk, dv from one program per block; in merged fixed heads that program also
# adds the Mosaic kernel's summary dq, dk, dv and writes the input dtype.
DIAG_BWD_CASES = [
    # (spec, layer, shape, dtype, opts)
    # merged, Mosaic summary first: l=64, c=16 -> key tiles of 32, 16 and 16 rows (cut at
    # the summary columns 48..63), two 32-row query tiles
    (PatternSpec("fixed", 64, 16, combine="merged"), 0, (2, 256, 2, 64), jnp.bfloat16, dict(block_q=32)),
    # the block heads of a multihead layer (no summary part in their group), float32
    (PatternSpec("fixed", 32, 8, combine="multihead"), 0, (1, 128, 4, 64), jnp.float32,
     dict(block_q=16, block_k=16)),
    # the block layer of an interleaved pair, one 32-row query tile per block
    (PatternSpec("fixed", 32, 8, combine="interleaved"), 0, (1, 128, 2, 64), jnp.float32, {}),
]


@pytest.mark.parametrize("spec,layer,shape,dtype,opts", DIAG_BWD_CASES,
                         ids=["merged-mosaic-bf16", "multihead-block-heads-f32", "block-layer-f32"])
def test_diag_backward_matches_reference_and_the_split_kernels(spec, layer, shape, dtype, opts):
    pattern = spec.layer_pattern(layer, shape[2])
    names = kernel_names(pattern, shape, dtype, **opts)
    assert "sparse_attn_bwd_diag_v2" in names  # the default
    if spec.combine != "multihead":  # (multihead's summary heads keep their dQ launch)
        assert "sparse_attn_bwd_dq_v2" not in names and "sparse_attn_bwd_dkv_v2" not in names
    assert_matches_reference(spec, layer, shape, dtype, **opts)
    assert_matches_default_launches(pattern, shape, dtype, **opts)
    assert "sparse_attn_bwd_diag_v2" not in kernel_names(pattern, shape, dtype, diag_bwd=False, **opts)


def test_diag_and_column_backward_never_both_take_a_part():
    """``_fused_bwd`` runs a part through every one-kernel backward whose schedule takes
    it; a part taken twice would get its dq, dk and dv twice. Diagonal blocks are natural
    order and columns strided, so no part of any pattern qualifies for both."""
    seen = {"diag": 0, "column": 0}
    for (spec, layer), (t, block) in itertools.product(PATTERNS, [(256, 16), (128, 32), (128, 64)]):
        pattern = tuple(tuple(head) for head in spec.layer_pattern(layer, 2))
        try:
            layout = build_layout(pattern, t, block, block)
        except PatternError:
            continue
        for part in (p for group in layout.groups for p in group.parts):
            diag, column = pallas_gpu._diag_schedule(part, t, 64), pallas_gpu._column_schedule(part, t, 64)
            assert diag is None or column is None, (spec, layer, t, block)
            seen["diag"] += diag is not None
            seen["column"] += column is not None
    assert seen["diag"] and seen["column"], seen


def test_diag_backward_adds_the_previous_parts_gradients():
    """The chained form (``init``: earlier parts' dq, dk, dv, any dtype) adds them to the
    block's own: the same as adding afterwards, in float32."""
    spec = PatternSpec("fixed", 32, 8, combine="interleaved")
    t, d = 128, 64
    layout = build_layout(tuple(map(tuple, spec.layer_pattern(0, 2))), t, 32, 32)
    part = layout.groups[0].parts[0]
    schedule = pallas_gpu._diag_schedule(part, t, d)
    q, k, v, do = fresh_inputs((1, t, 2, d), jnp.float32)
    lse = jax.random.normal(jax.random.PRNGKey(3), (1, 2, t)) + 5.0
    delta = jax.random.normal(jax.random.PRNGKey(4), (1, 2, t))
    cfg = pallas_gpu.KernelConfig(interpret=True, num_warps=4, num_stages=2, out_dtype=jnp.float32)
    init = [x.astype(jnp.bfloat16) for x in fresh_inputs((1, t, 2, d), jnp.float32)[:3]]
    alone = pallas_gpu._diag_bwd_call(q, k, v, do, lse, delta, part, cfg, jnp.float32, schedule)
    chained = pallas_gpu._diag_bwd_chained(q, k, v, do, lse, delta, init, part, cfg, jnp.float32,
                                           schedule)
    for name, a, x0, c in zip(("dq", "dk", "dv"), alone, init, chained):
        assert bool(jnp.isfinite(c).all()), name
        np.testing.assert_allclose(c, a + x0.astype(jnp.float32), rtol=1e-6, atol=1e-6, err_msg=name)


# mosaic_forward: merged fixed heads' forward from one Mosaic GPU kernel (block and
# summary parts in one online softmax, 128-row query tiles, two compute warpgroups).
@pytest.mark.parametrize("spec,shape", [
    (PatternSpec("fixed", 64, 16, combine="merged", distinct_summaries=True), (1, 256, 4, 64)),
    (PatternSpec("fixed", 128, 32, combine="merged"), (2, 256, 2, 128)),
], ids=["l64-distinct-summaries-D64", "l128-D128-B2"])
def test_mosaic_forward_matches_reference_and_the_triton_forward(spec, shape):
    # l=64: a 128-row query tile spans two blocks, so the block part's key tile is masked
    # across two blocks; distinct summaries: a summary start per head.
    pattern = spec.layer_pattern(0, shape[2])
    assert "mgpu_attn_fwd_merged" in mosaic_kernels(pattern, shape, mosaic_forward=True)
    assert_matches_reference(spec, 0, shape, jnp.bfloat16, mosaic_forward=True)
    assert_matches_default_launches(pattern, shape, jnp.bfloat16, mosaic_forward=True)


@pytest.mark.parametrize("spec,shape", [
    (PatternSpec("fixed", 64, 16, combine="merged", distinct_summaries=True), (1, 256, 4, 64)),
    (PatternSpec("fixed", 128, 32, combine="merged"), (2, 512, 2, 64)),
], ids=["l64-distinct-summaries", "l128-B2"])
def test_persistent_mosaic_forward_matches_reference_and_the_triton_forward(spec, shape):
    """``mosaic_forward_persistent``: a few programs walk all the (head, query tile,
    batch) items (three in the interpreter, so each runs several, of different lengths,
    back to back, with the key stream, the query slots and the turns carried across
    items)."""
    pattern = spec.layer_pattern(0, shape[2])
    opts = dict(mosaic_forward=True, mosaic_forward_persistent=True)
    assert "mgpu_attn_fwd_merged_persistent" in mosaic_kernels(pattern, shape, **opts)
    assert_matches_reference(spec, 0, shape, jnp.bfloat16, **opts)
    assert_matches_default_launches(pattern, shape, jnp.bfloat16, **opts)


def test_persistent_mosaic_forward_lowers_for_cuda():
    text = lowered_for_cuda(PatternSpec("fixed", 128, 32, combine="merged"), mosaic_forward=True,
                            mosaic_forward_persistent=True)
    assert "mgpu_attn_fwd_merged_persistent" in text


def test_persistent_forward_needs_the_mosaic_forward_and_falls_back_where_it_does_not_fit():
    merged = PatternSpec("fixed", 64, 16, combine="merged").layer_pattern(0, 2)
    with pytest.raises(PatternError, match="mosaic_forward=True"):
        mosaic_kernels(merged, (1, 128, 2, 64), mosaic_forward_persistent=True)
    # D=128: two query slots and the output tile do not fit next to the key slots.
    assert not pallas_gpu._mosaic_forward_persistent_fits(128, jnp.bfloat16, False)
    kernels = mosaic_kernels(merged, (1, 128, 2, 128), mosaic_forward=True,
                             mosaic_forward_persistent=True)
    assert "mgpu_attn_fwd_merged" in kernels and "mgpu_attn_fwd_merged_persistent" not in kernels


def test_work_items_run_batch_by_batch_longest_tiles_first_heads_fastest():
    from sparse_lm.attention import mosaic_gpu

    items = mosaic_gpu._work_items(np.array([1, 3, 2]), h=2, b=2, heavy_first=True)
    assert items.tolist() == [[0, 1, 0], [1, 1, 0], [0, 2, 0], [1, 2, 0], [0, 0, 0], [1, 0, 0],
                              [0, 1, 1], [1, 1, 1], [0, 2, 1], [1, 2, 1], [0, 0, 1], [1, 0, 1]]
    plain = mosaic_gpu._work_items(np.array([1, 3, 2]), h=1, b=1, heavy_first=False)
    assert plain[:, 1].tolist() == [0, 1, 2]


def test_persistent_schedule_runs_every_item_once_with_balanced_programs():
    from sparse_lm.attention import mosaic_gpu

    cost = np.sort(np.random.default_rng(0).integers(1, 40, size=500))[::-1]
    table, counts = mosaic_gpu._persistent_schedule(cost, 7)
    runs = np.concatenate([table[p, :n] for p, n in enumerate(counts)])
    assert sorted(runs.tolist()) == list(range(500))
    assert (table[np.arange(table.shape[1])[None, :] >= counts[:, None]] == -1).all()
    for p, n in enumerate(counts):  # each program's items in the given (longest-first) order
        assert (np.diff(table[p, :n]) > 0).all()
    loads = np.array([cost[table[p, :n]].sum() for p, n in enumerate(counts)])
    assert loads.max() - loads.min() <= cost.max()
    # One program per item: program p runs item p (the one-item-per-program launch).
    table, counts = mosaic_gpu._persistent_schedule(cost[:5], 5)
    assert table[:, 0].tolist() == list(range(5)) and counts.tolist() == [1] * 5


def test_persistent_forward_that_does_not_fit_in_shared_memory_says_so():
    from sparse_lm.attention import mosaic_gpu

    cfg = mosaic_gpu.KernelConfig(interpret=True, compute_wgs=2, max_concurrent_steps=4,
                                  pv_from_registers=True)
    assert mosaic_gpu.merged_forward_smem(128, jnp.bfloat16, 128, 128, cfg, True) > mosaic_gpu.SMEM_BUDGET
    spec = PatternSpec("fixed", 128, 32, combine="merged")
    layout = build_layout(tuple(map(tuple, spec.layer_pattern(0, 1))), 256, 128, 128)
    own, summary = layout.groups[0].parts
    x = jnp.zeros((1, 256, 1, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="shared memory.*persistent=False"):
        mosaic_gpu.merged_forward(x, x, x, x, x, own, summary, cfg, jnp.bfloat16, persistent=True)


def test_mosaic_forward_applies_only_to_merged_heads_where_it_can():
    merged = PatternSpec("fixed", 64, 16, combine="merged").layer_pattern(0, 2)
    fwd = "mgpu_attn_fwd_merged"
    assert fwd not in mosaic_kernels(merged, (1, 256, 2, 64))  # off by default (untimed)
    assert fwd in mosaic_kernels(merged, (1, 256, 2, 64), mosaic_forward=True)
    assert fwd not in mosaic_kernels(merged, (1, 256, 2, 64), jnp.float32, mosaic_forward=True)
    assert fwd not in mosaic_kernels(merged, (1, 192, 2, 64), mosaic_forward=True)  # T % 128
    for other in (PatternSpec("fixed", 64, 16, combine="multihead").layer_pattern(0, 4),
                  PatternSpec("fixed", 64, 16, combine="interleaved").layer_pattern(1, 4),
                  PatternSpec("strided", 16, combine="merged").layer_pattern(0, 4)):
        assert fwd not in mosaic_kernels(other, (1, 256, 4, 64), mosaic_forward=True)


def test_mosaic_forward_lowers_for_cuda_with_the_warpgroups_taking_turns():
    """The GPU form (turns through a shared barrier, P from registers) lowered for an
    H100 at the benchmark shape; the interpreter runs the turns' arithmetic only."""
    text = lowered_for_cuda(PatternSpec("fixed", 128, 32, combine="merged"), mosaic_forward=True)
    assert "mgpu_attn_fwd_merged" in text and "sparse_attn_fwd_v2" not in text


def test_layers_running_the_same_mosaic_kernel_share_one_lowered_module():
    """Three layers of the enwik8 shape (merged fixed heads, forward and backward): one
    Mosaic forward module and one dK/dV+dq module in the lowered program, each called
    three times. Before, every call lowered its own module, unique by the name Mosaic
    GPU stamps on it, so a 30-layer model carried 30 copies of each kernel to build."""
    import re

    pattern = PatternSpec("fixed", 128, 32, combine="merged").layer_pattern(0, 8)
    x = jax.ShapeDtypeStruct((8, 12288, 8, 64), jnp.bfloat16)

    def loss(q, k, v):
        o = q * 2  # an intermediate, as a model's queries are
        for _ in range(3):
            o = pallas_gpu.attention(o, k, v, pattern, interpret=False, mosaic_forward=True)
        return o.astype(jnp.float32).sum()

    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x).lower(
            lowering_platforms=("cuda",)).as_text()
    kernels = [line for line in text.split("\n") if "@mosaic_gpu_v2" in line]
    hashes = {re.search(r'kernel_hash = "((?:[^"\\]|\\.)*)"', line).group(1) for line in kernels}
    assert len(kernels) == len(hashes) == 2
    callers = re.findall(r"call @(merged_forward\w*|_dkv_part\w*)\(", text)
    assert sorted(callers) == ["_dkv_part"] * 3 + ["merged_forward"] * 3


def test_mosaic_kernels_raise_and_lower_registers_in_pairs(monkeypatch):
    """setmaxnreg.inc waits for registers the memory warpgroup must give back: a kernel
    that raises the compute warpgroups' limit without lowering the memory warpgroup's
    hangs on the GPU (merged_forward's first version did, session 8)."""
    from sparse_lm.attention import mosaic_gpu

    plgpu = mosaic_gpu._plgpu()
    real, calls = plgpu.set_max_registers, []

    def spy(n, *, action):
        calls.append(action)
        return real(n, action=action)

    monkeypatch.setattr(plgpu, "set_max_registers", spy)
    # The kernels are traced once per signature, whose layouts are cached by identity:
    # new layouts, so that this lowering traces them again.
    for cached in (build_layout, pallas_gpu._with_dkv_tiles, pallas_gpu._with_fwd_tiles):
        cached.cache_clear()
    lowered_for_cuda(PatternSpec("fixed", 128, 32, combine="merged"), mosaic_forward=True)
    # Two kernels (the merged forward, the dK/dV+dq kernel), each traced once.
    assert calls.count("increase") == calls.count("decrease") == 2, calls


def test_diag_schedule_cuts_key_tiles_at_the_summary_columns():
    """l=128, c=32 (the benchmark's fixed pattern), 64-row query tiles: key tiles of 64,
    32 and 32 rows, so the summary columns 96..127 are whole tiles; each key tile lists
    the query tiles that see it, masked where the causal edge crosses the pair."""
    spec = PatternSpec("fixed", 128, 32, combine="merged")
    t = 512
    layout = build_layout(tuple(map(tuple, spec.layer_pattern(0, 2))), t, 64, 64)
    block = next(p for p in layout.groups[0].parts if p.k_index is None)
    big, bq, schedule = pallas_gpu._diag_schedule(block, t, 64, summary=(128, 96, 32))
    assert (big, bq) == (128, 64)
    assert schedule == ((0, 64, ((0, True), (1, False))), (64, 32, ((1, True),)), (96, 32, ((1, True),)))
    # Without summary rows to add: two 64-row key tiles.
    assert [(a, n) for a, n, _ in pallas_gpu._diag_schedule(block, t, 64)[2]] == [(0, 64), (64, 64)]
    # Where it does not apply: head dim over the limit, summary columns of another l, a
    # tile under 16 rows, a block of more than two query tiles, a part of another rule.
    assert pallas_gpu._diag_schedule(block, t, 128) is None
    assert pallas_gpu._diag_schedule(block, t, 64, summary=(64, 48, 16)) is None
    assert pallas_gpu._diag_schedule(block, t, 64, summary=(128, 120, 8)) is None
    small = build_layout(tuple(map(tuple, spec.layer_pattern(0, 2))), t, 32, 32)
    assert pallas_gpu._diag_schedule(small.groups[0].parts[0], t, 64) is None
    strided = build_layout(tuple(map(tuple, PatternSpec("strided", 16).layer_pattern(0, 2))), 256, 16, 16)
    assert all(pallas_gpu._diag_schedule(p, 256, 64) is None for g in strided.groups for p in g.parts)


def test_pow2_pieces_are_aligned_powers_of_two_covering_the_range():
    assert pallas_gpu._pow2_pieces(0, 128, 64) == [(0, 64), (64, 64)]
    assert pallas_gpu._pow2_pieces(0, 48, 64) == [(0, 32), (32, 16)]
    assert pallas_gpu._pow2_pieces(48, 64, 64) == [(48, 16)]
    assert pallas_gpu._pow2_pieces(96, 128, 64) == [(96, 32)]


def test_mosaic_fills_depend_on_the_cotangent():
    """The Mosaic dK/dV+dq kernel's starting buffers are tied to do: a constant fill has
    no operand and XLA scheduled all 30 layers' fills early (+7 GiB peak in the enwik8
    train step on an H200, session 8). Same values as a plain fill."""
    from sparse_lm.attention import mosaic_gpu

    x = jnp.arange(6.0).reshape(2, 3)
    got = mosaic_gpu.filled_after(x, (4, 5), 2.0, jnp.bfloat16)
    assert got.dtype == jnp.bfloat16 and bool((got == 2).all()) and got.shape == (4, 5)
    jaxpr = jax.make_jaxpr(lambda x: mosaic_gpu.filled_after(x, (4, 5), 0.0))(x).jaxpr
    assert any(v is jaxpr.invars[0] for eqn in jaxpr.eqns for v in eqn.invars)
