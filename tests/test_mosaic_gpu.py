"""The Mosaic GPU block-sparse attention (forward and backward) equals the reference.

Runs the kernel in Mosaic GPU interpret mode on CPU (``plgpu.InterpretGPUParams``): the
interpreter simulates the warpgroups as threads, SMEM, TMA copies and barriers, and
fills kernel outputs with NaN until written, so a tile the kernel skips fails the
finiteness check. The interpreter cannot run the FA3 form of P V (P from registers,
``pv_from_registers=True``); that form, and the interpret form, are checked to lower
through the real Mosaic GPU compiler to NVVM (``lowering_platforms=("cuda",)``), which
needs no GPU. The backward (dQ and dK/dV kernels behind a ``jax.custom_vjp``) is checked
the same two ways: gradients against ``jax.vjp`` of the reference in interpret mode, and
lowering of ``jax.grad`` for CUDA in both wgmma forms.
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
from sparse_lm.attention.part_order import part_keys  # noqa: E402
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


# ---------------------------------------------------------------------------- backward


def reference_with_lse(q, k, v, pattern):
    """(o, natural lse [B, H, T]) of the dense masked softmax in float32; lse = -inf for
    rows with no key, with gradients that stay finite there."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    mask = jnp.asarray(layer_masks(pattern, q.shape[1]))[None]
    with jax.default_matmul_precision("highest"):
        s = jnp.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5
        s = jnp.where(mask, s, -jnp.inf)
        top = jax.lax.stop_gradient(jnp.max(s, -1, keepdims=True))
        top = jnp.where(jnp.isfinite(top), top, 0.0)
        e = jnp.exp(s - top)
        total = e.sum(-1, keepdims=True)
        seen = total > 0
        safe = jnp.where(seen, total, 1.0)
        o = jnp.einsum("bhts,bshd->bthd", e / safe, v)
        lse = jnp.where(seen, jnp.log(safe) + top, -jnp.inf)[..., 0]
    return o, lse


def check_grads(spec, layer, dtype, shape=SHAPE, with_lse=False, **opts):
    """dq, dk, dv of the kernel equal those of the reference; returns them (float32)."""
    pattern = spec.layer_pattern(layer, shape[2])
    q, k, v = inputs(shape, dtype)
    do = inputs(shape, dtype)[0]
    dl = jax.random.normal(jax.random.PRNGKey(next(_seed)), (shape[0], shape[2], shape[1]))

    def cotangents(lse):
        # The lse cotangent is zero on rows with no key (their lse is -inf).
        return (do, jnp.where(jnp.isfinite(lse), dl, 0.0)) if with_lse else do

    def kernel(q, k, v):
        return mosaic_gpu.attention(q, k, v, pattern, interpret=True, return_lse=with_lse,
                                    **opts)

    def ref(q, k, v):
        o, lse = reference_with_lse(q, k, v, pattern)
        return (o, lse) if with_lse else o

    out, vjp = jax.vjp(kernel, q, k, v)
    got = vjp(cotangents(out[1] if with_lse else None))
    r32 = [x.astype(jnp.float32) for x in (q, k, v)]
    rout, rvjp = jax.vjp(ref, *r32)
    want = rvjp(jax.tree.map(lambda x: x.astype(jnp.float32),
                             cotangents(rout[1] if with_lse else None)))
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert g.shape == w.shape and g.dtype == dtype, name
        assert bool(jnp.isfinite(g.astype(jnp.float32)).all()), f"{name} has NaN/inf"
        err = rel_err(g, w)
        assert err < TOL[dtype], f"{name}: relative error {err:.2e} >= {TOL[dtype]:.0e}"
    return [np.asarray(x, np.float32) for x in got], [np.asarray(x) for x in want]


# Same tiles as the forward tests: dQ programs of 128 query rows (2 x 64) over 64-key
# blocks; dK/dV programs of 128 key rows (2 x 64) over 64-query blocks. Every pattern
# has full and partial blocks in both kernels; merged parts use the final lse and delta.
@pytest.mark.parametrize(
    "spec,dtype",
    [
        (PatternSpec("dense"), jnp.float32),
        (PatternSpec("local", 64), jnp.float32),
        (PatternSpec("strided", 64), jnp.float32),
        (PatternSpec("fixed", 64, 16), jnp.float32),
        (PatternSpec("strided", 64), jnp.bfloat16),
        (PatternSpec("fixed", 64, 16), jnp.bfloat16),
    ],
    ids=["dense-f32", "local-f32", "strided-merged-f32", "fixed-merged-f32",
         "strided-merged-bf16", "fixed-merged-bf16"],
)
def test_gradients_match_reference(spec, dtype):
    check_grads(spec, 0, dtype)


def test_gradients_head_groups_distinct_summaries_and_lse():
    # Multihead fixed: two head groups (block heads, summary heads); distinct summaries:
    # per-head gathered keys, scattered back per head; the lse cotangent enters through
    # delta. One warpgroup, 128-key forward blocks, 64-row dK/dV tiles, three slots.
    check_grads(PatternSpec("fixed", 64, 16, combine="multihead", distinct_summaries=True),
                0, jnp.float32, shape=(1, 256, 4, 64), with_lse=True, block_q=64,
                block_k=128, compute_wgs=1, max_concurrent_steps=3)


def test_rows_and_keys_that_see_nothing_get_zero_gradient():
    # Interleaved fixed, layer 1: summary-only heads. Queries of the first block see no
    # key and keys outside the summary columns are seen by no query.
    spec = PatternSpec("fixed", 64, 16, combine="interleaved")
    pattern = spec.layer_pattern(1, SHAPE[2])
    (dq, dk, dv), _ = check_grads(spec, 1, jnp.float32, with_lse=True)
    mask = np.asarray(layer_masks(pattern, SHAPE[1]))  # [H, T, T]
    no_key = ~mask.any(-1)  # [H, T] queries
    unseen = ~mask.any(-2)  # [H, T] keys
    assert no_key.any() and unseen.any()
    for h in range(SHAPE[2]):
        assert not dq[:, no_key[h], h].any()
        assert not dk[:, unseen[h], h].any() and not dv[:, unseen[h], h].any()


@pytest.mark.parametrize(
    "spec,d,opts",
    [
        (PatternSpec("dense"), 64, {}),
        (PatternSpec("strided", 64), 128, {}),
        (PatternSpec("fixed", 64, 16, distinct_summaries=True), 128,
         {"max_concurrent_steps": 3, "block_k": 64}),
    ],
    ids=["dense-d64", "strided-merged-d128", "fixed-distinct-merged-d128"],
)
@pytest.mark.parametrize("in_place", [True, False], ids=["regs", "smem"])
def test_backward_lowers_through_mosaic_gpu_for_cuda(spec, d, opts, in_place):
    """jax.grad of the kernel (forward, dQ and dK/dV kernels of every part) goes through
    the Mosaic GPU compiler, with the register-operand in-place wgmma (GPU default) and
    the SMEM form the interpreter runs."""
    pattern = spec.layer_pattern(0, 2)
    x = jax.ShapeDtypeStruct((1, 256, 2, d), jnp.bfloat16)

    def loss(q, k, v):
        o = mosaic_gpu.attention(q, k, v, pattern, interpret=False,
                                 pv_from_registers=in_place, **opts)
        return o.astype(jnp.float32).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    text = grad.trace(x, x, x).lower(lowering_platforms=("cuda",)).as_text()
    parts = 1 if spec.name == "dense" else 2
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 3 * parts


def test_backward_kernels_have_no_races():
    # Each kernel launch resets the race detector: check the dQ and dK/dV kernels one by
    # one (the stride part of merged strided; one slot, so every step waits for the
    # refill of the slot just consumed).
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    pattern = PatternSpec("strided", 64).layer_pattern(0, SHAPE[2])
    params = plgpu.InterpretGPUParams(detect_races=True)
    cfg = mosaic_gpu.KernelConfig(interpret=True, compute_wgs=2, max_concurrent_steps=1,
                                  pv_from_registers=False, interpret_params=params)
    part = mosaic_gpu.build_layout(pattern, SHAPE[1], 128, 64).groups[0].parts[1]
    kv_part = mosaic_gpu.build_layout(pattern, SHAPE[1], 64, 128).groups[0].parts[1]
    q, k, do = inputs(SHAPE, jnp.float32)
    ld = jnp.stack([jnp.full(SHAPE[:1] + SHAPE[2:3] + SHAPE[1:2], 4.0),
                    jnp.ones(SHAPE[:1] + SHAPE[2:3] + SHAPE[1:2])], axis=2)
    dq = mosaic_gpu._dq_part(q, k, k, do, ld, part, cfg, jnp.float32)
    assert bool(jnp.isfinite(dq).all())
    assert not interpret_pallas_call.get_races().races_found
    dk, dv = mosaic_gpu._dkv_part(q, k, k, do, ld, kv_part, cfg, jnp.float32)
    assert bool(jnp.isfinite(dk).all() & jnp.isfinite(dv).all())
    assert not interpret_pallas_call.get_races().races_found


@pytest.mark.parametrize("with_dq", [False, True], ids=["dkv", "dkvdq"])
def test_persistent_dkv_kernel_equals_the_per_tile_launch_without_races(with_dq, monkeypatch):
    """``_dkv_part(persistent=True)``: three programs walk the summary part's 8 key-tile
    items (two lengths, two heads, two batches): dk and dv equal the
    one-program-per-tile launch's bit for bit (each tile's sums run in the same order),
    dq within float rounding (additions in another order). One program walking all 8
    items has no race: the K/V slots, the query stream, the staging tiles and the dq
    turns are handed over correctly between items. (Several programs adding into the
    same dq rows race in the interpreter, persistent or not: its stand-in for the TMA
    reduction is a read-add-write, the GPU's reduction is atomic.)"""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    shape = (2, 512, 2, 64)
    pattern = PatternSpec("fixed", 32, 16, combine="merged").layer_pattern(0, shape[2])
    summary = mosaic_gpu.build_layout(pattern, shape[1], 64, 128).groups[0].parts[1]
    steps = summary.bwd[:, 0] + summary.bwd[:, 1]
    assert summary.k_index is not None and len(steps) == 2 and steps[0] != steps[1]
    params = plgpu.InterpretGPUParams(detect_races=True)
    cfg = mosaic_gpu.KernelConfig(interpret=True, compute_wgs=2, max_concurrent_steps=2,
                                  pv_from_registers=False, interpret_params=params)
    q, k, do = inputs(shape, jnp.bfloat16)
    kg = part_keys(k, summary)
    ld = jnp.stack([jnp.full((shape[0], shape[2], shape[1]), 4.0),
                    jnp.ones((shape[0], shape[2], shape[1]))], axis=2)
    dq0 = jnp.zeros(shape, jnp.float32) if with_dq else None

    def run(**kw):
        return mosaic_gpu._dkv_part(q, kg, kg, do, ld, summary, cfg, jnp.float32, dq0=dq0, **kw)

    per_tile = run()
    runs = [run(persistent=True)]  # three programs in the interpreter
    monkeypatch.setattr(mosaic_gpu, "_resident_programs", lambda cfg, n: 1)
    runs.append(run(persistent=True))
    assert not interpret_pallas_call.get_races().races_found
    for got in runs:
        np.testing.assert_array_equal(got[0], per_tile[0])
        np.testing.assert_array_equal(got[1], per_tile[1])
        if with_dq:
            assert float(jnp.abs(per_tile[2]).max()) > 0
            np.testing.assert_allclose(got[2], per_tile[2], rtol=1e-5, atol=1e-5)


def test_persistent_dkv_kernel_that_does_not_fit_in_shared_memory_says_so():
    cfg = mosaic_gpu.KernelConfig(interpret=True, compute_wgs=2, max_concurrent_steps=4,
                                  pv_from_registers=False)
    assert mosaic_gpu.dkv_smem(128, jnp.bfloat16, 64, 128, cfg, jnp.float32, True, True) \
        > mosaic_gpu.SMEM_BUDGET
    pattern = PatternSpec("fixed", 64, 16, combine="merged").layer_pattern(0, 1)
    summary = mosaic_gpu.build_layout(pattern, 256, 64, 128).groups[0].parts[1]
    x = jnp.zeros((1, 256, 1, 128), jnp.bfloat16)
    ld = jnp.zeros((1, 1, 2, 256), jnp.float32)
    with pytest.raises(ValueError, match="shared memory.*persistent=False"):
        mosaic_gpu._dkv_part(x, x, x, x, ld, summary, cfg, jnp.float32,
                             dq0=jnp.zeros(x.shape, jnp.float32), persistent=True)


def test_selected_through_the_attention_dispatcher_and_config():
    """``impl="mosaic_gpu"`` reaches this kernel (interpret mode off GPU), so models and
    benchmarks can opt in by config; it stays out of ``auto`` until measured on a GPU."""
    from sparse_lm.attention import attention, auto_impl_for
    from sparse_lm.config import base_config, validate

    spec = PatternSpec("fixed", 64, 16)
    pattern = spec.layer_pattern(0, SHAPE[2])
    q, k, v = inputs(SHAPE, jnp.float32)
    out = attention(q, k, v, pattern, impl="mosaic_gpu")
    assert rel_err(out, reference(q, k, v, pattern)) < TOL[jnp.float32]
    assert auto_impl_for(pattern, jnp.bfloat16, platform="gpu") == "pallas_gpu"
    c = base_config()
    c.attention.impl = "mosaic_gpu"
    validate(c)


def test_launch_order_starts_the_longest_tiles_first():
    # Query tiles of a causal-like part grow: the tile axis runs backwards.
    grows = np.array([1, 2, 3, 5, 8])
    assert mosaic_gpu._launch_order(grows, 8, 2, "q_seq", True) == ((8, 5, 2), ("heads", "q_seq", "batch"), True)
    # Key tiles of the summary part shrink, and even work keeps its order: forwards.
    assert mosaic_gpu._launch_order(grows[::-1], 8, 2, "k_seq", True)[2] is False
    assert mosaic_gpu._launch_order(np.full(4, 3), 8, 2, "q_seq", True)[2] is False
    # Off: ascending, the order before session 9.
    assert mosaic_gpu._launch_order(grows, 8, 2, "q_seq", False) == ((8, 5, 2), ("heads", "q_seq", "batch"), False)
    tab = np.array([[1, 2, 0, 0, 0], [0, 1, 0, 0, 0]])  # n_full, n_partial, ids
    assert mosaic_gpu._tile_work(tab, tab).tolist() == [6, 2]


def test_launch_order_changes_no_result(monkeypatch):
    # Every tile is computed by exactly one program whichever order they start in: the
    # forward and all three gradients are bitwise the same (dq is summed per program in
    # a fixed order in the interpreter). The fixed pattern's summary part grows along
    # the query tiles, so its forward and dQ launches do run backwards.
    reversed_launches = []

    def spy(*args):
        grid, names, reverse = launch_order(*args)
        reversed_launches.append(reverse)
        return grid, names, reverse

    launch_order = mosaic_gpu._launch_order
    monkeypatch.setattr(mosaic_gpu, "_launch_order", spy)
    pattern = PatternSpec("fixed", 32, 16).layer_pattern(0, SHAPE[2])  # 2 summary key tiles
    q, k, v = inputs(SHAPE, jnp.bfloat16)
    g = inputs(SHAPE, jnp.bfloat16)[0]

    def run(heavy_first):
        f = lambda *a: mosaic_gpu.attention(*a, pattern, interpret=True, heavy_first=heavy_first)  # noqa: E731
        out, vjp = jax.vjp(f, q, k, v)
        return out, *vjp(g)

    for a, b in zip(run(True), run(False), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert any(reversed_launches) and not all(reversed_launches), reversed_launches
