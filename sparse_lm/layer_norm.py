"""LayerNorm with a hand-written backward pass that keeps only its input.

Outside matmuls and attention, a training step is element-wise work bound by memory
traffic: on an H200 the enwik8 step moved ~10 GB per layer through XLA fusions
(BENCHMARKS.md, "Session 13"). Autodiff of the plain LayerNorm formula keeps the
centred input in float32 for the backward pass, a [B, T, d] tensor at 4 bytes per
value where a bfloat16 residual stream has 2, and the backward reads it back. The
function here computes the same forward values, keeps the input in its own dtype and
two float32 numbers per row (mean and 1/std), and rebuilds the normalised input
inside the backward's fusions.

With ``impl="pallas_gpu"`` the backward is one Pallas kernel over blocks of rows
(Triton lowering on GPU, the Pallas interpreter elsewhere): it reads x and dy once and
writes dx and per-block partial sums of the scale and bias gradients. XLA's fusions
instead write dy * xhat in float32 and read it back for those column sums, and read x
and dy again for dx. ``layer_norm_residual`` also hands x through as a second output for
its other use (the residual sum), so that use's cotangent is added to dx in the same
pass. Under a multi-device mesh it runs per batch shard (``jax.shard_map``), as the
attention kernels do. ``impl="auto"`` (the default) takes the kernel on GPU and XLA's
fusions elsewhere: on an H200 the kernel made the 8-layer enwik8 step 77.3 -> 74.8 ms
(same machine; BENCHMARKS.md, "Session 14").

The custom VJP means forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``) of a
model using it is not available; training and evaluation use reverse mode only.

(The same treatment of bias + GELU, keeping only the matmul output instead of it and
its tanh, was measured slower on an H200: XLA then materialised the float32 gradient
and summed the bias gradient in a separate pass; BENCHMARKS.md, "Session 13".)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from sparse_lm.attention.adapt import ambient_mesh, batch_split

LAYER_NORM_EPS = 1e-5
LAYER_NORM_IMPLS = ("auto", "xla", "pallas_gpu")
# The Pallas backward's work per step of its row loop: ROW_CHUNK_ELEMENTS values of each
# [rows, d] operand (32 float32 registers per thread at 4 warps), and up to
# ROWS_PER_PROGRAM rows per program, whose partial sums of dscale and dbias it writes.
ROW_CHUNK_ELEMENTS = 4096
ROWS_PER_PROGRAM = 128
NUM_WARPS = 4
NUM_STAGES = 1


def _normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, out_dtype: Any):
    """(y, row means, row 1/std) of x [..., d]; the statistics are float32 [...]."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1)
    rstd = lax.rsqrt(jnp.square(xf - mean[..., None]).mean(-1) + LAYER_NORM_EPS)
    y = (xf - mean[..., None]) * rstd[..., None] * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(out_dtype), mean, rstd


def resolve_impl(impl: str) -> str:
    """The backward ``impl`` runs: "auto" is the Pallas kernel where the default backend
    is a GPU (its Triton lowering), XLA's fusions elsewhere (the interpreter is slow)."""
    if impl not in LAYER_NORM_IMPLS:
        raise ValueError(f"layer norm impl {impl!r}; choose one of {', '.join(map(repr, LAYER_NORM_IMPLS))}.")
    if impl == "auto":
        return "pallas_gpu" if jax.default_backend() == "gpu" else "xla"
    return impl


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm(x, scale, bias, out_dtype, impl):
    return _normalize(x, scale, bias, out_dtype)[0]


def _layer_norm_fwd(x, scale, bias, out_dtype, impl):
    y, mean, rstd = _normalize(x, scale, bias, out_dtype)
    return y, (x, mean, rstd, scale, bias)


def _layer_norm_bwd(out_dtype, impl, res, dy):
    return _backward(*res, dy, None, impl)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm_residual(x, scale, bias, out_dtype, impl):
    return _normalize(x, scale, bias, out_dtype)[0], x


def _layer_norm_residual_fwd(x, scale, bias, out_dtype, impl):
    y, mean, rstd = _normalize(x, scale, bias, out_dtype)
    return (y, x), (x, mean, rstd, scale, bias)


def _layer_norm_residual_bwd(out_dtype, impl, res, cts):
    dy, dx_through = cts
    return _backward(*res, dy, dx_through, impl)


_layer_norm_residual.defvjp(_layer_norm_residual_fwd, _layer_norm_residual_bwd)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, out_dtype: Any, impl: str = "auto") -> jax.Array:
    """LayerNorm over the last axis, computed in float32, returned as ``out_dtype``.

    x [..., d] in any float dtype; scale, bias [d] (their gradients come back in their
    own dtype, summed in float32). The backward saves x, its row means and 1/std.
    ``impl``: "xla" (jnp, fused by XLA), "pallas_gpu" (the backward as one Pallas
    kernel; see the module docstring) or "auto" (the kernel on GPU, else XLA).
    """
    return _layer_norm(x, scale, bias, jnp.dtype(out_dtype), resolve_impl(impl))


def layer_norm_residual(
    x: jax.Array, scale: jax.Array, bias: jax.Array, out_dtype: Any, impl: str = "auto"
) -> tuple[jax.Array, jax.Array]:
    """(``layer_norm(x, ...)``, x): the second output is x itself, for x's other use.

    Use it there instead of x: its cotangent is then added to dx inside the LayerNorm's
    backward (one pass over the stream) rather than by a separate sum.
    """
    return _layer_norm_residual(x, scale, bias, jnp.dtype(out_dtype), resolve_impl(impl))


def _backward(x, mean, rstd, scale, bias, dy, dx_through, impl):
    grads = _sharded_pallas_backward(x, mean, rstd, scale, dy, dx_through) if impl == "pallas_gpu" else None
    if grads is None:  # the XLA backward, or a shape the kernel cannot take
        grads = _xla_backward(x, mean, rstd, scale, dy, dx_through)
    dx, dscale, dbias = grads
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


def _xla_backward(x, mean, rstd, scale, dy, dx_through):
    xhat = (x.astype(jnp.float32) - mean[..., None]) * rstd[..., None]
    dyf = dy.astype(jnp.float32)
    g = dyf * scale.astype(jnp.float32)
    # d/dx of (x - mean) * rstd applied to g, with both row statistics differentiated.
    dx = rstd[..., None] * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    if dx_through is not None:
        dx = dx + dx_through.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    return dx, (dyf * xhat).sum(axes), dyf.sum(axes)


def _sharded_pallas_backward(x, mean, rstd, scale, dy, dx_through):
    """The Pallas backward per shard of the batch, or None where it does not apply.

    XLA cannot partition a Pallas call; under a multi-device mesh (``jax.set_mesh``)
    the kernel runs under ``jax.shard_map`` with the leading (batch) axis split over
    the data-parallel axes as the attention kernels do (``attention.adapt``), each
    shard returning its own partial sums of dscale and dbias, added up here.
    """
    mesh = ambient_mesh() if x.ndim >= 2 else None  # a 1-D x has no batch axis to split
    batch = batch_split(mesh, x.shape[0]) if mesh is not None else ()
    shards = math.prod(mesh.shape[a] for a in batch)
    blocks = _pallas_blocks((x.shape[0] // shards, *x.shape[1:]))
    if blocks is None:
        return None

    def local(x, mean, rstd, scale, dy, *through):
        dx, dscale, dbias = _pallas_backward(x, mean, rstd, scale, dy, *(through or (None,)), *blocks)
        return dx, dscale[None], dbias[None]

    args = (x, mean, rstd, scale, dy) + (() if dx_through is None else (dx_through,))
    if mesh is None:
        dx, dscale, dbias = local(*args)
    else:
        lead = batch or None
        row, stat = P(lead, *[None] * (x.ndim - 1)), P(lead, *[None] * (mean.ndim - 1))
        specs = (row, stat, stat, P(None), row) + (() if dx_through is None else (row,))
        dx, dscale, dbias = jax.shard_map(
            local, mesh=mesh, in_specs=specs, out_specs=(row, P(lead, None), P(lead, None)),
            check_vma=False,  # Pallas outputs carry no varying-axes annotation
        )(*args)
    return dx, dscale.sum(0), dbias.sum(0)


def _pallas_blocks(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(rows per loop step, loop steps per program) of the Pallas backward for an x of
    ``shape``, or None where it does not apply (Triton blocks are powers of two: d
    must be one, and the rows a multiple of one step); those take the XLA backward."""
    d = shape[-1]
    n = math.prod(shape) // d if d else 0
    if d < 16 or d & (d - 1) or d > ROW_CHUNK_ELEMENTS:
        return None
    rows = ROW_CHUNK_ELEMENTS // d
    if n == 0 or n % rows:
        return None
    steps = max(1, ROWS_PER_PROGRAM // rows)
    while n % (rows * steps):
        steps //= 2
    return rows, steps


def _ln_bwd_kernel(x_ref, dy_ref, mean_ref, rstd_ref, scale_ref, *refs, rows: int, steps: int,
                   with_through: bool):
    """One program: ``steps`` blocks of ``rows`` rows; dx for each, and the program's
    partial sums of dscale and dbias over its rows."""
    if with_through:
        through_ref, dx_ref, dscale_ref, dbias_ref = refs
    else:
        dx_ref, dscale_ref, dbias_ref = refs
    scale = scale_ref[...].astype(jnp.float32)
    inv_d = 1.0 / scale.shape[0]

    def step(i, sums):
        sl = pl.ds(pl.multiple_of(i * rows, rows), rows)
        dy = dy_ref[sl, :].astype(jnp.float32)
        rstd = rstd_ref[sl][:, None]
        xhat = (x_ref[sl, :].astype(jnp.float32) - mean_ref[sl][:, None]) * rstd
        g = dy * scale[None, :]
        g_mean = jnp.sum(g, axis=1, keepdims=True) * inv_d
        gx_mean = jnp.sum(g * xhat, axis=1, keepdims=True) * inv_d
        dx = rstd * (g - g_mean - xhat * gx_mean)
        if with_through:
            dx = dx + through_ref[sl, :].astype(jnp.float32)
        dx_ref[sl, :] = dx.astype(dx_ref.dtype)
        return sums[0] + jnp.sum(dy * xhat, axis=0), sums[1] + jnp.sum(dy, axis=0)

    zero = jnp.zeros(scale.shape, jnp.float32)
    dscale, dbias = lax.fori_loop(0, steps, step, (zero, zero))
    dscale_ref[...] = dscale
    dbias_ref[...] = dbias


def _interpret() -> bool:
    """The Pallas interpreter unless the default backend is a GPU (as the attention
    kernels decide): a computation placed on the CPU of a GPU host is not supported."""
    return jax.default_backend() != "gpu"


def _pallas_backward(x, mean, rstd, scale, dy, dx_through, rows: int, steps: int):
    d = x.shape[-1]
    n = x.size // d
    per_program = rows * steps
    flat = lambda a: a.reshape(n, d)  # noqa: E731
    row_spec = pl.BlockSpec((per_program, d), lambda i: (i, 0))
    stat_spec = pl.BlockSpec((per_program,), lambda i: (i,))
    sum_spec = pl.BlockSpec((None, d), lambda i: (i, 0))
    args = [flat(x), flat(dy), mean.reshape(n), rstd.reshape(n), scale]
    in_specs = [row_spec, row_spec, stat_spec, stat_spec, pl.BlockSpec((d,), lambda i: (0,))]
    if dx_through is not None:
        args.append(flat(dx_through))
        in_specs.append(row_spec)
    kernel = functools.partial(_ln_bwd_kernel, rows=rows, steps=steps, with_through=dx_through is not None)

    def launch(interpret: bool):
        params = None
        if not interpret:
            from jax.experimental.pallas import triton as pltriton

            params = pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)
        return pl.pallas_call(
            kernel,
            grid=(n // per_program,),
            in_specs=in_specs,
            out_specs=[row_spec, sum_spec, sum_spec],
            out_shape=[
                jax.ShapeDtypeStruct((n, d), x.dtype),
                jax.ShapeDtypeStruct((n // per_program, d), jnp.float32),
                jax.ShapeDtypeStruct((n // per_program, d), jnp.float32),
            ],
            interpret=interpret,
            compiler_params=params,
            name="layer_norm_bwd",
        )

    dx, dscale, dbias = launch(_interpret())(*args)
    return dx.reshape(x.shape), dscale.sum(0), dbias.sum(0)
