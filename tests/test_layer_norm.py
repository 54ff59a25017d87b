"""sparse_lm.layer_norm: autodiff's values and gradients, with a backward pass that keeps
only its input (in the input's dtype) and two float32 numbers per row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from sparse_lm import layer_norm as ln
from sparse_lm.layer_norm import layer_norm, layer_norm_residual

B, T, D = 2, 16, 64


def autodiff_layer_norm(x, scale, bias, out_dtype):
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + 1e-5) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(out_dtype)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def inputs(dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    x = (3.0 + 2.0 * jax.random.normal(k[0], (B, T, D))).astype(dtype)  # rows off centre
    scale = 1.0 + 0.1 * jax.random.normal(k[1], (D,))
    bias = 0.1 * jax.random.normal(k[2], (D,))
    cot = jax.random.normal(k[3], (B, T, D))
    return x, scale, bias, cot


@pytest.mark.parametrize("dtype, out_dtype, tol", [
    (jnp.float32, jnp.float32, 1e-5), (jnp.bfloat16, jnp.bfloat16, 1e-2), (jnp.float32, jnp.bfloat16, 1e-2),
])
def test_values_and_gradients_match_autodiff(dtype, out_dtype, tol):
    x, scale, bias, cot = inputs(dtype)

    def loss(fn):
        return lambda x, s, b: jnp.sum(fn(x, s, b, out_dtype).astype(jnp.float32) * cot)

    y = layer_norm(x, scale, bias, out_dtype)
    assert y.dtype == out_dtype
    assert rel(y, autodiff_layer_norm(x, scale, bias, out_dtype)) < tol
    grads = jax.grad(loss(layer_norm), argnums=(0, 1, 2))(x, scale, bias)
    refs = jax.grad(loss(autodiff_layer_norm), argnums=(0, 1, 2))(x, scale, bias)
    for g, r, like in zip(grads, refs, (x, scale, bias)):
        assert g.dtype == like.dtype and g.shape == like.shape  # gradients in their inputs' dtypes
        assert np.all(np.isfinite(np.asarray(g, np.float32)))
        assert rel(g, r) < tol


def residual_shapes(fn, *args):
    return sorted((tuple(aval.shape), str(aval.dtype)) for aval, _ in saved_residuals(fn, *args))


def test_the_backward_keeps_the_input_in_its_dtype_and_two_numbers_per_row():
    # What autodiff of the plain formula keeps (the centred input in float32) is what
    # made the training step's LayerNorm passes move twice the bytes of a bfloat16
    # stream (BENCHMARKS.md, session 13).
    x, scale, bias, _ = inputs(jnp.bfloat16)
    kept = residual_shapes(lambda x, s, b: layer_norm(x, s, b, jnp.bfloat16), x, scale, bias)
    assert [r for r in kept if r[0] == (B, T, D)] == [((B, T, D), "bfloat16")], kept
    assert [r for r in kept if r[0] == (B, T)] == [((B, T), "float32")] * 2, kept
    plain = residual_shapes(lambda x, s, b: autodiff_layer_norm(x, s, b, jnp.bfloat16), x, scale, bias)
    assert ((B, T, D), "float32") in plain  # so the check above is not vacuous


def test_works_under_jit_and_vmap_and_on_constant_rows():
    x, scale, bias, _ = inputs(jnp.float32)
    f = jax.jit(jax.vmap(lambda r: layer_norm(r, scale, bias, jnp.float32)))
    np.testing.assert_allclose(f(x), autodiff_layer_norm(x, scale, bias, jnp.float32), rtol=1e-5, atol=1e-5)
    # A constant row normalises to the bias; its gradient stays finite (1/std of eps).
    const = jnp.full((1, 1, D), 7.0)
    np.testing.assert_allclose(layer_norm(const, scale, bias, jnp.float32)[0, 0], bias, atol=1e-6)
    g = jax.grad(lambda c: jnp.sum(layer_norm(c, scale, bias, jnp.float32) ** 2))(const)
    assert np.all(np.isfinite(g))


# -- the Pallas backward (run by the Pallas interpreter here) ----------------------------

def _kernel_ran(fn, *args) -> bool:
    jaxpr = jax.make_jaxpr(jax.grad(fn, argnums=(0, 1, 2)))(*args)
    return "pallas_call" in str(jaxpr)


@pytest.mark.parametrize("shape", [(4, 96, 128), (2, 64, 512), (3, 64, 64)])
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_the_pallas_backward_gives_the_xla_backwards_gradients(shape, dtype, tol):
    k = jax.random.split(jax.random.key(3), 5)
    x = (1.0 + 2.0 * jax.random.normal(k[0], shape)).astype(dtype)
    scale = 1.0 + 0.1 * jax.random.normal(k[1], shape[-1:])
    bias = 0.1 * jax.random.normal(k[2], shape[-1:])
    cot_y, cot_x = jax.random.normal(k[3], shape), jax.random.normal(k[4], shape)

    def loss(impl):
        def f(x, s, b):
            y, x_out = layer_norm_residual(x, s, b, dtype, impl)
            return jnp.sum(y.astype(jnp.float32) * cot_y) + jnp.sum(x_out.astype(jnp.float32) * cot_x)
        return f

    assert _kernel_ran(loss("pallas_gpu"), x, scale, bias)
    got = jax.grad(loss("pallas_gpu"), argnums=(0, 1, 2))(x, scale, bias)
    want = jax.grad(loss("xla"), argnums=(0, 1, 2))(x, scale, bias)
    auto = jax.grad(lambda x, s, b: jnp.sum(autodiff_layer_norm(x, s, b, dtype).astype(jnp.float32) * cot_y)
                    + jnp.sum(x.astype(jnp.float32) * cot_x), argnums=(0, 1, 2))(x, scale, bias)
    for g, w, a, like in zip(got, want, auto, (x, scale, bias)):
        assert g.dtype == like.dtype and g.shape == like.shape
        assert np.all(np.isfinite(np.asarray(g, np.float32)))
        assert rel(g, w) < tol and rel(g, a) < tol


def test_the_residual_output_is_the_input_and_plain_layer_norm_matches():
    x, scale, bias, cot = inputs(jnp.bfloat16)
    for impl in ("xla", "pallas_gpu"):
        y, x_out = layer_norm_residual(x, scale, bias, jnp.bfloat16, impl)
        assert x_out is x or bool(jnp.all(x_out == x))
        assert bool(jnp.all(y == layer_norm(x, scale, bias, jnp.bfloat16, impl)))


@pytest.mark.parametrize("shape", [(2, 16, 48), (1, 5, 64), (2, 3, 8)])
def test_shapes_the_kernel_cannot_take_fall_back_to_the_xla_backward(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    scale, bias = jnp.ones(shape[-1:]), jnp.zeros(shape[-1:])
    f = lambda impl: (lambda x, s, b: jnp.sum(layer_norm(x, s, b, jnp.float32, impl) ** 3))  # noqa: E731
    assert not _kernel_ran(f("pallas_gpu"), x, scale, bias)
    for g, w in zip(jax.grad(f("pallas_gpu"), argnums=(0, 1, 2))(x, scale, bias),
                    jax.grad(f("xla"), argnums=(0, 1, 2))(x, scale, bias)):
        np.testing.assert_array_equal(g, w)


def test_auto_takes_the_kernel_on_gpu_and_xla_elsewhere(monkeypatch):
    assert ln.resolve_impl("auto") == "xla"  # this CPU: the interpreter would be slow
    x = jax.random.normal(jax.random.key(0), (2, 64, 128))  # a shape the kernel takes
    scale, bias = jnp.ones((128,)), jnp.zeros((128,))
    f = lambda x, s, b: jnp.sum(layer_norm(x, s, b, jnp.float32) ** 3)  # noqa: E731 - default impl
    assert not _kernel_ran(f, x, scale, bias)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert ln.resolve_impl("auto") == "pallas_gpu"
    assert ln.resolve_impl("xla") == "xla" and ln.resolve_impl("pallas_gpu") == "pallas_gpu"
    monkeypatch.setattr(ln, "_interpret", lambda: True)  # no GPU here: run its kernel interpreted
    assert _kernel_ran(f, x, scale, bias)


def test_an_unknown_impl_is_refused_with_the_choices():
    x, scale, bias, _ = inputs(jnp.float32)
    with pytest.raises(ValueError, match="'xla', 'pallas_gpu'"):
        layer_norm(x, scale, bias, jnp.float32, "triton")


def test_the_pallas_backward_lowers_for_cuda_at_the_enwik8_shape(monkeypatch):
    # The GPU code path (Triton), not the interpreter, at [8, 12288, 512] bf16.
    monkeypatch.setattr(ln, "_interpret", lambda: False)
    x = jax.ShapeDtypeStruct((8, 12288, 512), jnp.bfloat16)
    s = jax.ShapeDtypeStruct((512,), jnp.float32)

    def loss(x, scale, bias):
        y, x_out = layer_norm_residual(x, scale, bias, jnp.bfloat16, "pallas_gpu")
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(x_out.astype(jnp.float32))

    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, s, s).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text and "layer_norm_bwd" in text


def test_the_pallas_backward_under_vmap():
    x, scale, bias, cot = inputs(jnp.float32)
    x = jnp.concatenate([x] * 4, axis=1)  # [2, 64, 64] -> 64 rows per vmapped slice
    cot = jnp.concatenate([cot] * 4, axis=1)

    def grads(impl):
        f = lambda r, c: jnp.sum(layer_norm(r, scale, bias, jnp.float32, impl) * c)  # noqa: E731
        return jax.vmap(jax.grad(f), in_axes=(0, 0))(x, cot)

    assert "pallas_call" in str(jax.make_jaxpr(lambda: grads("pallas_gpu"))())
    np.testing.assert_allclose(grads("pallas_gpu"), grads("xla"), rtol=1e-5, atol=1e-5)


_SHARDED = """
import json, jax, jax.numpy as jnp, numpy as np
from sparse_lm.layer_norm import layer_norm_residual
mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)  # as the trainer's
out = {}
for batch in (4, 3):  # 3 rows of the batch cannot split over data=2: every device takes all
    k = jax.random.split(jax.random.key(batch), 4)
    x = 1.0 + jax.random.normal(k[0], (batch, 64, 128))
    scale, bias = 1.0 + 0.1 * jax.random.normal(k[1], (128,)), jnp.zeros(128)
    cy, cx = jax.random.normal(k[2], x.shape), jax.random.normal(k[3], x.shape)
    def loss(impl):
        def f(x, s, b):
            y, x_out = layer_norm_residual(x, s, b, jnp.float32, impl)
            return jnp.sum(y * cy) + jnp.sum(x_out * cx)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))
    want = loss("xla")(x, scale, bias)
    with jax.set_mesh(mesh):
        text = loss("pallas_gpu").trace(x, scale, bias).jaxpr.pretty_print()
        got = loss("pallas_gpu")(x, scale, bias)
    out[str(batch)] = dict(shard_map="shard_map" in text, pallas="pallas_call" in text,
                           split="P('data', None, None)" in text,
                           err=max(float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))) for g, w in zip(got, want)))
with jax.set_mesh(mesh):  # one row of 16,384 features: no batch axis, nothing to split
    v = jax.random.normal(jax.random.key(0), (16384,))
    g = jax.grad(lambda v: jnp.sum(layer_norm_residual(v, jnp.ones(16384), jnp.zeros(16384), jnp.float32,
                                                       "pallas_gpu")[0] * v))(v)
out["1d_finite"] = bool(jnp.isfinite(g).all())
print(json.dumps(out))
"""


def test_the_pallas_backward_runs_per_batch_shard_under_a_mesh():
    from tests.helpers import run_python

    out = run_python(_SHARDED, devices=4)
    for batch in ("4", "3"):
        assert out[batch]["shard_map"] and out[batch]["pallas"], out
        assert out[batch]["err"] < 1e-5, out
    assert out["4"]["split"] and not out["3"]["split"], out  # 4 rows split over data=2, 3 cannot
    assert out["1d_finite"]
