"""The TPU path (splash attention) against the reference, in Pallas TPU interpret mode.

No TPU is available here: every kernel call runs in the Pallas TPU interpreter on CPU
(``interpret=None`` picks it off-TPU). Sizes are small (T 256-512, 2-4 heads, D 64/128)
so that the file runs in about a minute on two cores.

Tolerances. float32: max |kernel - reference| / max |reference| < 1e-5. The
interpreter runs the kernel's float32 arithmetic on CPU; the only difference from the
reference is summation order (online softmax over 128-key tiles versus one dense
softmax), which costs a few float32 ulps (observed ~1e-7 to 1e-6). bfloat16: < 1e-2 on
the same metric: both sides round their bf16 outputs and the reference also rounds its
probabilities to bf16 before the value product, so one or two bf16 ulps (2^-8 each)
at the largest entry are expected. Every comparison first asserts that the kernel's
result is finite, so NaN never passes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_lm.attention import (
    PatternError,
    PatternSpec,
    attention,
    layer_masks,
    reference_attention,
)
from sparse_lm.attention import pallas_tpu
from tests.helpers import xla_flags

REPO = Path(__file__).resolve().parents[1]
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}

# (id, spec, layer, T, H, D). Layer 1 of an interleaved pattern is its A2 component.
CASES = [
    ("dense", PatternSpec("dense"), 0, 256, 2, 64),
    # Window 64 crosses every 128-key tile boundary: partial tiles on both sides.
    ("local", PatternSpec("local", stride=64), 0, 256, 2, 64),
    ("strided-merged", PatternSpec("strided", stride=16, combine="merged"), 0, 256, 2, 64),
    ("strided-interleaved-A1", PatternSpec("strided", stride=32, combine="interleaved"), 0, 256, 2, 64),
    ("strided-interleaved-A2", PatternSpec("strided", stride=32, combine="interleaved"), 1, 256, 2, 128),
    ("strided-multihead", PatternSpec("strided", stride=16, combine="multihead"), 0, 256, 4, 64),
    ("fixed-merged", PatternSpec("fixed", stride=128, summary=32, combine="merged"), 0, 256, 2, 64),
    ("fixed-interleaved-A1", PatternSpec("fixed", stride=64, summary=16, combine="interleaved"), 0, 256, 2, 64),
    # A2 alone: rows 0..95 have no key, inside a query tile that other rows use.
    ("fixed-interleaved-A2", PatternSpec("fixed", stride=128, summary=32, combine="interleaved"), 1, 256, 2, 64),
    # A2 alone with l = 256: rows 0..223 have no key, so the whole first 128-row query
    # tile is skipped by splash (where it would otherwise produce 0/0).
    ("fixed-A2-empty-tile", PatternSpec("fixed", stride=256, summary=32, combine="interleaved"), 1, 256, 2, 64),
    ("fixed-multihead", PatternSpec("fixed", stride=128, summary=32, combine="multihead"), 0, 256, 4, 64),
    (
        "fixed-multihead-distinct",
        PatternSpec("fixed", stride=128, summary=32, combine="multihead", distinct_summaries=True),
        0, 256, 4, 64,
    ),
    (
        "fixed-merged-distinct",
        PatternSpec("fixed", stride=128, summary=32, combine="merged", distinct_summaries=True),
        0, 512, 4, 128,
    ),
    (
        "fixed-A2-distinct",
        PatternSpec("fixed", stride=128, summary=32, combine="interleaved", distinct_summaries=True),
        1, 256, 4, 64,
    ),
]
BF16_CASES = ("dense", "strided-merged", "fixed-A2-empty-tile", "fixed-multihead-distinct")


@pytest.fixture
def seed() -> int:
    """A fresh seed per test; it is in every failure message so a failure can be replayed."""
    return int(np.random.SeedSequence().entropy % 2**31)


def _inputs(seed: int, shape: tuple[int, ...], dtype) -> tuple[jax.Array, ...]:
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v = (jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in keys[:3])
    cotangent = jax.random.normal(keys[3], shape, jnp.float32)
    return q, k, v, cotangent


def _rel_err(got: jax.Array, want: jax.Array) -> float:
    got = np.asarray(got, dtype=np.float32)
    want = np.asarray(want, dtype=np.float32)
    assert np.isfinite(got).all(), "kernel result has NaN or inf"
    assert np.isfinite(want).all(), "reference result has NaN or inf"
    return float(np.abs(got - want).max() / np.abs(want).max())


def _value_and_grads(fn, q, k, v, cotangent):
    """fn's output and d<fn(q,k,v), cotangent>/d(q, k, v), under jit."""

    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _check_against_reference(pattern, q, k, v, cotangent, tol, seed, **options):
    out, grads = _value_and_grads(
        lambda q, k, v: pallas_tpu.attention(q, k, v, pattern, **options), q, k, v, cotangent
    )
    ref, ref_grads = _value_and_grads(
        lambda q, k, v: reference_attention(q, k, v, pattern), q, k, v, cotangent
    )
    assert out.dtype == q.dtype and out.shape == q.shape
    errs = {"out": _rel_err(out, ref)}
    errs.update({f"d{n}": _rel_err(g, r) for n, g, r in zip("qkv", grads, ref_grads)})
    assert all(e < tol for e in errs.values()), f"seed={seed} rel errors {errs} (tol {tol})"
    return out, grads


@pytest.mark.parametrize(
    "name,spec,layer,T,H,D", CASES, ids=[c[0] for c in CASES]
)
def test_forward_and_grads_float32(name, spec, layer, T, H, D, seed):
    pattern = spec.layer_pattern(layer, H)
    q, k, v, ct = _inputs(seed, (2, T, H, D), jnp.float32)
    out, grads = _check_against_reference(pattern, q, k, v, ct, TOL[jnp.float32], seed)

    # Queries with an empty allowed set: exactly zero output and zero dq.
    empty = ~layer_masks(pattern, T).any(-1)  # [H, T]
    if empty.any():
        rows = np.asarray(out).transpose(0, 2, 1, 3)[:, empty]  # [B, n_empty, D]
        assert (rows == 0).all(), f"seed={seed}: empty rows are not zero"
        assert (np.asarray(grads[0]).transpose(0, 2, 1, 3)[:, empty] == 0).all()


@pytest.mark.parametrize("name", BF16_CASES)
def test_forward_and_grads_bfloat16(name, seed):
    _, spec, layer, T, H, D = next(c for c in CASES if c[0] == name)
    pattern = spec.layer_pattern(layer, H)
    q, k, v, ct = _inputs(seed, (2, T, H, D), jnp.bfloat16)
    _check_against_reference(pattern, q, k, v, ct, TOL[jnp.bfloat16], seed)


def test_both_mask_paths_are_exercised():
    """Splash computes the mask in-kernel only when all heads share one mask; else it
    loads stored partial tiles. The cases above must cover both, or one path would go
    untested."""
    T = 256
    one = PatternSpec("strided", stride=16, combine="merged").layer_pattern(0, 2)
    many = PatternSpec("fixed", stride=128, summary=32, combine="multihead").layer_pattern(0, 4)
    interp = pallas_tpu._resolve_interpret(None)
    kernel_one, _ = pallas_tpu._make_kernel(one, T, 128, 128, interp, 1)
    kernel_many, _ = pallas_tpu._make_kernel(many, T, 128, 128, interp, 1)
    assert kernel_one.kwargs["mask_function"] is not None
    assert kernel_many.kwargs["mask_function"] is None
    assert kernel_many.fwd_mask_info.partial_mask_blocks is not None


def test_unequal_blocks_and_longer_sequence(seed):
    """block_q != block_kv, T = 512: tiles of different shapes in forward and backward."""
    spec = PatternSpec("fixed", stride=64, summary=16, combine="merged", distinct_summaries=True)
    pattern = spec.layer_pattern(0, 2)
    q, k, v, ct = _inputs(seed, (1, 512, 2, 64), jnp.float32)
    _check_against_reference(pattern, q, k, v, ct, 1e-5, seed, block_q=128, block_kv=256)


def test_vmap_batching_used_on_hardware(seed):
    """On TPU the batch is vmapped (one launch); the TPU interpreter cannot take a
    vmapped kernel, so check that path with Pallas's generic interpreter."""
    spec = PatternSpec("fixed", stride=128, summary=32, combine="interleaved")
    pattern = spec.layer_pattern(1, 2)
    q, k, v, ct = _inputs(seed, (2, 256, 2, 64), jnp.float32)
    _check_against_reference(pattern, q, k, v, ct, 1e-5, seed, interpret="hlo")


def test_dispatch_through_attention_entry_point(seed):
    pattern = PatternSpec("strided", stride=16, combine="merged").layer_pattern(0, 2)
    q, k, v, _ = _inputs(seed, (1, 256, 2, 64), jnp.float32)
    got = attention(q, k, v, pattern, impl="pallas_tpu")
    assert _rel_err(got, reference_attention(q, k, v, pattern)) < 1e-5, f"seed={seed}"


@pytest.mark.parametrize("spec", [
    PatternSpec("dense"),
    PatternSpec("local", stride=8),
    PatternSpec("strided", stride=8, combine="interleaved"),
    PatternSpec("fixed", stride=16, summary=4, combine="interleaved"),
    PatternSpec("fixed", stride=16, summary=4, combine="multihead", distinct_summaries=True),
    PatternSpec("fixed", stride=16, summary=16, combine="interleaved"),
])
def test_mask_matches_pattern(spec):
    """PatternMask is the allowed set plus the diagonal of exactly the empty rows, and
    first_nonempty_row marks exactly those rows."""
    T, H = 64, 4
    for layer in (0, 1):
        pattern = spec.layer_pattern(layer, H)
        masks = layer_masks(pattern, T)
        for h, head in enumerate(pattern):
            empty = ~masks[h].any(-1)
            first = pallas_tpu.first_nonempty_row(head)
            np.testing.assert_array_equal(empty, np.arange(T) < first)
            want = masks[h] | (np.eye(T, dtype=bool) & empty[:, None])
            got = pallas_tpu.PatternMask(head, T)[0:T, 0:T]
            np.testing.assert_array_equal(got, want)


def test_errors_name_the_constraint():
    pattern = PatternSpec("dense").layer_pattern(0, 2)
    x = jnp.zeros((1, 200, 2, 64), jnp.float32)
    with pytest.raises(PatternError, match="multiple of 128"):
        pallas_tpu.attention(x, x, x, pattern)
    x = jnp.zeros((1, 384, 2, 64), jnp.float32)
    with pytest.raises(PatternError, match="block_q=256 must divide"):
        pallas_tpu.attention(x, x, x, pattern, block_q=256)
    with pytest.raises(PatternError, match="block_kv=192 must be a positive multiple of 128"):
        pallas_tpu.attention(x, x, x, pattern, block_kv=192)
    with pytest.raises(PatternError, match="pattern has 2 heads"):
        pallas_tpu.attention(x[:, :, :1], x[:, :, :1], x[:, :, :1], pattern)
    with pytest.raises(PatternError, match="same head dim"):
        pallas_tpu.attention(x, x, x[..., :32], pattern)


# Runs in a subprocess: the 4 virtual CPU devices must be requested before jax is
# imported, and must not leak into the other tests of this process.
_SHARD_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from sparse_lm.attention import PatternError, PatternSpec, attention, reference_attention
    from sparse_lm.attention import pallas_tpu

    assert jax.device_count() == 4, jax.devices()
    seed = int(sys.argv[1])
    mesh = Mesh(np.array(jax.devices()).reshape(2, 1, 2), ("data", "fsdp", "tensor"))
    # Heads 0-1 use the block component, heads 2-3 two different summary sub-blocks:
    # each tensor shard must run its own heads' masks.
    spec = PatternSpec("fixed", stride=128, summary=32, combine="multihead",
                       distinct_summaries=True)
    pattern = spec.layer_pattern(0, 4)
    keys = jax.random.split(jax.random.key(seed), 4)
    shape = (2, 256, 4, 64)
    q, k, v, ct = (jax.random.normal(kk, shape, jnp.float32) for kk in keys)
    sharding = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    qs, ks, vs = (jax.device_put(x, sharding) for x in (q, k, v))

    def loss(fn):
        def f(q, k, v):
            out = fn(q, k, v)
            return jnp.sum(out * ct), out
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

    sharded = pallas_tpu.shard_attention(mesh, pattern)
    (_, out), grads = loss(sharded)(qs, ks, vs)
    (_, ref), ref_grads = loss(lambda q, k, v: reference_attention(q, k, v, pattern))(q, k, v)
    assert out.sharding.spec == sharding.spec, out.sharding
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.isfinite(a).all(), name
        err = np.abs(a - b).max() / np.abs(b).max()
        assert err < 1e-5, (name, err, seed)

    # The same through the model's entry point, with the mesh as an option.
    via_entry = jax.jit(lambda q, k, v: attention(q, k, v, pattern, impl="pallas_tpu",
                                                  mesh=mesh))(qs, ks, vs)
    np.testing.assert_allclose(np.asarray(via_entry), np.asarray(out), rtol=0, atol=0)

    # The model calls attention(...) with no mesh; under jax.set_mesh it must shard
    # itself (a shard_map in the trace), forward and backward.
    entry = lambda q, k, v: attention(q, k, v, pattern, impl="pallas_tpu")
    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(entry)(qs, ks, vs))
        (_, ambient), ambient_grads = loss(entry)(qs, ks, vs)
    for a, b in zip((ambient, *ambient_grads), (out, *grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=0)
    assert "shard_map" not in str(jax.make_jaxpr(entry)(q, k, v))  # no mesh set

    try:
        pallas_tpu.shard_attention(mesh, pattern)(q[:1], k[:1], v[:1])
    except PatternError as e:
        assert "batch size 1" in str(e), e
    else:
        raise AssertionError("batch 1 on 2 data shards did not raise")
    print("SHARD_OK")
    """
)


def test_shard_map_composition(seed):
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(4)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", _SHARD_SCRIPT, str(seed)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0 and "SHARD_OK" in proc.stdout, (
        f"seed={seed}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    )
