"""The Sparse Transformer (Child et al. 2019) as a Flax NNX module.

A decoder-only byte model: factorized learned position embeddings, pre-activation
residual blocks whose attention goes through ``sparse_lm.attention.attention`` (the
one entry point kernels plug into), a final LayerNorm and an output projection.

``logits[:, t]`` predicts ``tokens[:, t]`` from ``tokens[:, :t]``: the input is the
byte sequence shifted right by one with a learned start vector at position 0, so
every byte of a window is predicted and bits per byte counts all of them.

Parameters carry logical axis names ('vocab', 'embed', 'mlp', 'heads', 'head_dim',
'pos', 'layers' or None) through ``nnx.with_partitioning``; the trainer maps them to
mesh axes.

With ``model.scan_layers`` the blocks' parameters are stacked along a leading
'layers' axis and applied by ``jax.lax.scan``, so the traced program, and with it the
compile time, no longer grows with depth. Layers differ only in their attention
pattern, which repeats with a period of 1 or 2 layers (``interleaved`` alternates),
so the scan runs over groups of ``period`` blocks, each with its static pattern.

The pieces the parallel forward pass is made of (``embed_inputs``, ``Block.qkv``,
``Block.finish``, ``logits``) are public so that ``sparse_lm.decode`` runs the same
computation one position at a time against its cache.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import meta as flax_meta

from sparse_lm.attention import LayerPattern, PatternSpec, attention
from sparse_lm.attention import load as load_attention_impl
from sparse_lm.config import REMOVED_FIELDS, ConfigError, removed_field_error
from sparse_lm.layer_norm import LAYER_NORM_IMPLS, layer_norm, layer_norm_residual
from sparse_lm.layer_norm import resolve_impl as resolve_layer_norm_impl

AXIS_NAMES = ("vocab", "embed", "mlp", "heads", "head_dim", "pos", "layers")
# config.attention fields passed to the pallas_gpu kernel when it runs (see
# pallas_gpu.attention): boolean options, passed whenever the config has them (so False
# reaches the kernel even where its default is True), and launch parameters, passed
# when set (0 leaves the kernel's default: 64x64 tiles, or 32x32 where a strided part
# needs them; 4 warps; 2 stages; the summary dK/dV kernel at block_q).
GPU_KERNEL_FLAGS = ("colaunch", "narrow_chain", "column_bwd", "diag_bwd", "delta_in_dq",
                    "mosaic_forward", "mosaic_forward_persistent", "mosaic_summary_dkv",
                    "mosaic_summary_dq", "mosaic_dkvdq_persistent")
GPU_KERNEL_TUNING = ("block_q", "block_k", "num_warps", "num_stages", "summary_dkv_block_q")
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
# "none": keep every activation; "save_attention": recompute all but the attention
# kernel (see Transformer._run_block); "save_attention_dots": that, and the matmul
# outputs are kept too (only norms, GELU, dropout and sums are recomputed); the others:
# jax.checkpoint with the policy above.
REMAT_MODES = ("none", "save_attention", "save_attention_dots", *REMAT_POLICIES)


def _param(
    rngs: nnx.Rngs,
    init: Callable[..., jax.Array],
    shape: Sequence[int],
    names: tuple[str | None, ...],
    dtype: Any,
) -> nnx.Param:
    """A parameter annotated with logical axis names.

    Flax 0.12 shards annotated variables eagerly by default, which needs a mesh; we
    only do that when the caller has set one (``jax.set_mesh`` plus logical axis
    rules), so the model also builds plainly on one device, in tests and in decoding.
    """
    assert len(names) == len(shape) and all(n is None or n in AXIS_NAMES for n in names)
    eager = bool(nnx.using_eager_sharding() and flax_meta.global_mesh_defined())
    value = nnx.with_partitioning(init, names)(rngs.params(), tuple(shape), dtype)
    return nnx.Param(value, eager_sharding=eager)


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32 (bf16 variance is too coarse), output in ``dtype``.

    ``sparse_lm.layer_norm``: its backward keeps only the input and two row statistics;
    ``impl`` (``model.layer_norm_impl``) picks XLA's fusions or a Pallas kernel for it
    ("auto": the kernel on GPU).
    """

    def __init__(self, dim: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs, impl: str = "auto"):
        self.scale = _param(rngs, nnx.initializers.ones, (dim,), ("embed",), param_dtype)
        self.bias = _param(rngs, nnx.initializers.zeros, (dim,), ("embed",), param_dtype)
        self.dtype = dtype
        self.impl = impl

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.scale[...], self.bias[...], self.dtype, self.impl)

    def with_residual(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(norm(x), x): use the second output for x's other use. With the Pallas
        backward, that use's gradient is then added to dx inside the kernel; XLA fuses
        the same sum into its own dx pass, so the XLA path leaves it to autodiff (the
        form timed in session 13)."""
        impl = resolve_layer_norm_impl(self.impl)
        if impl == "xla":
            return self(x), x
        return layer_norm_residual(x, self.scale[...], self.bias[...], self.dtype, impl)


def dropout_keep_mask(key: jax.Array, rate: float, shape: tuple[int, ...]) -> tuple[jax.Array, float]:
    """Boolean keep mask of ``shape`` and its exact keep probability.

    Each element gets ``w`` random bits, 32/w elements cut from each 32-bit draw: a
    threefry draw costs the same whatever its width (JAX's partitionable threefry makes
    one 32-bit word per element even for uint8), so 8-bit elements make the mask ~4x
    cheaper. That matters at the paper's scale, where dropout 0.4 on two [B, T, d]
    tensors per layer is drawn again under rematerialisation. An element is dropped
    when its bits are below round(rate * 2^w), so the rate is rounded to a multiple of
    2^-w: ``w`` is the smallest of 8, 16, 32 that keeps both the drop and the keep
    probability within 2% of the asked ones (0.4 -> 0.3984 with 8 bits; 0.01 and 0.999
    take 16). The returned keep probability is the exact one, so
    scaling by it keeps the layer unbiased.
    """
    def drop_count(w: int) -> int:
        return min(2**w - 1, max(1, round(rate * 2**w)))

    def close_enough(w: int) -> bool:  # both the drop and the keep probability within 2%
        p = drop_count(w) / 2**w
        return abs(p - rate) <= 0.02 * rate and abs((1 - p) - (1 - rate)) <= 0.02 * (1 - rate)

    width = next(w for w in (8, 16, 32) if w == 32 or close_enough(w))
    drop = drop_count(width)
    n, per_word = math.prod(shape), 32 // width
    words = jax.random.bits(key, (-(-n // per_word),), jnp.uint32)
    if width < 32:  # uint32[m] -> uint{w}[m, 32/w]: a bitcast, no arithmetic
        words = jax.lax.bitcast_convert_type(words, jnp.dtype(f"uint{width}"))
    bits = words.reshape(-1)[:n].reshape(shape)
    return bits >= drop, 1.0 - drop / 2**width


def to_stream(x: jax.Array, dtype: Any) -> jax.Array:
    """x rounded to the residual stream's dtype, and stored that way.

    XLA skips a rounding to a narrower type when every consumer widens the value again
    (its default ``--xla_allow_excess_precision``), and here every consumer does (the
    LayerNorms and sums work in float32): a bfloat16 stream would then stay float32 in
    memory and save no bytes. The optimization barrier makes XLA store the rounded
    value, and in the backward pass the rounded cotangent.
    """
    y = x.astype(dtype)
    return jax.lax.optimization_barrier(y) if jnp.dtype(dtype).itemsize < 4 else y


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; ``key`` None means deterministic (evaluation, decoding)."""
    if key is None or rate == 0.0:
        return x
    keep, p_keep = dropout_keep_mask(key, rate, x.shape)
    return jnp.where(keep, x / p_keep, 0.0).astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head projections around the sparse attention call.

    Query and key heads have ``head_dim * qk_ratio`` features and value heads
    ``head_dim`` (the paper's half-size query/key option). Projections are stored
    per head ([embed, heads, head_dim]) so tensor parallelism can split heads.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        qk_dim: int,
        v_dim: int,
        out_std_scale: float,
        *,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        fan_in = nnx.initializers.normal(d_model**-0.5)
        self.query = _param(rngs, fan_in, (d_model, num_heads, qk_dim), ("embed", "heads", "head_dim"), param_dtype)
        self.key = _param(rngs, fan_in, (d_model, num_heads, qk_dim), ("embed", "heads", "head_dim"), param_dtype)
        self.value = _param(rngs, fan_in, (d_model, num_heads, v_dim), ("embed", "heads", "head_dim"), param_dtype)
        # A residual output projection: its init is scaled by 1/sqrt(2N) so the
        # residual stream's variance does not grow with depth (paper, section 5.3).
        out_init = nnx.initializers.normal((num_heads * v_dim) ** -0.5 * out_std_scale)
        self.out = _param(rngs, out_init, (num_heads, v_dim, d_model), ("heads", "head_dim", "embed"), param_dtype)
        self.out_bias = _param(rngs, nnx.initializers.zeros, (d_model,), ("embed",), param_dtype)
        self.dtype = dtype

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [..., d_model] (compute dtype) -> q, k, v [..., H, D]."""
        def proj(w: nnx.Param) -> jax.Array:
            return jnp.einsum("...d,dhk->...hk", x, w[...].astype(self.dtype))

        return proj(self.query), proj(self.key), proj(self.value)

    def output(self, o: jax.Array) -> jax.Array:
        """Attention output o [..., H, Dv] -> [..., d_model]."""
        y = jnp.einsum("...hk,hkd->...d", o.astype(self.dtype), self.out[...].astype(self.dtype))
        return y + self.out_bias[...].astype(self.dtype)


class FeedForward(nnx.Module):
    """Two-layer GELU MLP; the second layer is a residual output projection."""

    def __init__(
        self, d_model: int, d_ff: int, out_std_scale: float, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs
    ):
        self.w_in = _param(rngs, nnx.initializers.normal(d_model**-0.5), (d_model, d_ff), ("embed", "mlp"), param_dtype)
        self.b_in = _param(rngs, nnx.initializers.zeros, (d_ff,), ("mlp",), param_dtype)
        out_init = nnx.initializers.normal(d_ff**-0.5 * out_std_scale)
        self.w_out = _param(rngs, out_init, (d_ff, d_model), ("mlp", "embed"), param_dtype)
        self.b_out = _param(rngs, nnx.initializers.zeros, (d_model,), ("embed",), param_dtype)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x @ self.w_in[...].astype(self.dtype) + self.b_in[...].astype(self.dtype)
        h = jax.nn.gelu(h)
        return h @ self.w_out[...].astype(self.dtype) + self.b_out[...].astype(self.dtype)


class Block(nnx.Module):
    """Pre-activation residual block: H + a + b with a = attn(norm(H)), b = ff(norm(H + a))."""

    def __init__(
        self,
        pattern: LayerPattern,
        *,
        d_model: int,
        num_heads: int,
        qk_dim: int,
        v_dim: int,
        d_ff: int,
        num_layers: int,
        dropout: float,
        impl: str,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
        kernel_options: tuple[tuple[str, Any], ...] = (),
        residual_dtype: Any = jnp.float32,
        layer_norm_impl: str = "auto",
    ):
        scale = 1.0 / math.sqrt(2 * num_layers)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm_attn = LayerNorm(d_model, impl=layer_norm_impl, **kw)
        self.attn = Attention(d_model, num_heads, qk_dim, v_dim, scale, **kw)
        self.norm_ff = LayerNorm(d_model, impl=layer_norm_impl, **kw)
        self.ff = FeedForward(d_model, d_ff, scale, **kw)
        # Static Python data (tuples of frozen dataclasses): part of the graph
        # definition, so each layer's pattern is fixed at trace time.
        self.pattern = pattern
        self.dropout = dropout
        self.impl = impl
        self.kernel_options = kernel_options  # for pallas_gpu only (gpu_kernel_options)
        self.residual_dtype = residual_dtype

    def qkv(self, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys and values [..., H, D] of the residual stream h."""
        return self.attn.project(self.norm_attn(h))

    def qkv_and_stream(self, h: jax.Array) -> tuple[tuple[jax.Array, jax.Array, jax.Array], jax.Array]:
        """``qkv(h)``, and h handed through the first norm (``LayerNorm.with_residual``):
        give that h to ``finish``, so that its gradient joins the norm's backward."""
        y, h = self.norm_attn.with_residual(h)
        return self.attn.project(y), h

    def finish(self, h: jax.Array, o: jax.Array, key: jax.Array | None) -> jax.Array:
        """H + a + b given the attention heads' output o [..., H, Dv].

        Each residual sum is taken in float32 and rounded to the stream's dtype
        (``model.residual_dtype``); in float32 that is the exact float32 sum.
        """
        k_attn, k_ff = (None, None) if key is None else tuple(jax.random.split(key))
        a = _dropout(self.attn.output(o), self.dropout, k_attn).astype(jnp.float32)
        h_a = to_stream(h.astype(jnp.float32) + a, self.residual_dtype)
        y, h_a = self.norm_ff.with_residual(h_a)
        b = _dropout(self.ff(y), self.dropout, k_ff).astype(jnp.float32)
        return to_stream(h_a.astype(jnp.float32) + b, self.residual_dtype)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """The layer's (sparse) attention: heads' output [..., H, Dv]."""
        return attention(q, k, v, self.pattern, impl=self.impl, gpu_kernel_options=self.kernel_options)

    def forward(self, h: jax.Array, key: jax.Array | None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """h: residual stream [B, T, d_model] -> (next stream, (keys, values))."""
        (q, k, v), h = self.qkv_and_stream(h)
        return self.finish(h, self.attend(q, k, v), key), (k, v)

    def __call__(self, h: jax.Array, key: jax.Array | None) -> jax.Array:
        return self.forward(h, key)[0]


class BlockGroup(nnx.Module):
    """``period`` consecutive blocks: one step of the layer scan.

    Every group holds the same sequence of (static) patterns, so one traced group
    serves all of them; only the stacked parameters differ from step to step.
    """

    def __init__(self, patterns: Sequence[LayerPattern], *, rngs: nnx.Rngs, **block_kw: Any):
        self.blocks = nnx.List([Block(p, rngs=rngs, **block_kw) for p in patterns])


def pattern_period(patterns: Sequence[LayerPattern]) -> int:
    """The smallest period (1 or 2) with which the layers' patterns repeat."""
    for period in (1, 2):
        if all(p == patterns[i % period] for i, p in enumerate(patterns)):
            return period
    # PatternSpec.layer_pattern depends on the layer only through layer % 2.
    raise ConfigError("the attention patterns of the layers do not repeat every 1 or 2 layers.")


def stack_layer_params(params: dict, num_layers: int, period: int) -> dict:
    """Unrolled-layout parameters (a pure dict, as ``nnx.to_pure_dict`` gives) -> the
    scanned layout of the same model: layer g * period + j becomes entry g of the stack
    of the group's block j. Converts checkpoints and lets tests compare the layouts."""
    if num_layers % period:
        raise ConfigError(f"num_layers={num_layers} is not a multiple of the pattern period {period}.")
    out = {k: v for k, v in params.items() if k != "blocks"}
    blocks = params["blocks"]
    out["layer_groups"] = {
        "blocks": {
            j: jax.tree.map(
                lambda *xs: jnp.stack(xs), *[blocks[i] for i in range(j, num_layers, period)]
            )
            for j in range(period)
        }
    }
    return out


def _get(cfg: Any, name: str, default: Any) -> Any:
    return cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)


def gpu_kernel_options(attn_cfg: Any) -> tuple[tuple[str, Any], ...]:
    """The (name, value) pairs of ``attn_cfg`` that go to the pallas_gpu kernel."""
    removed = [n for n in REMOVED_FIELDS["attention"] if _get(attn_cfg, n, None) is not None]
    if removed:
        raise removed_field_error("attention", removed)
    flags = [(n, bool(v)) for n in GPU_KERNEL_FLAGS if (v := _get(attn_cfg, n, None)) is not None]
    if dict(flags).get("mosaic_forward_persistent") and not dict(flags).get("mosaic_forward"):
        raise ConfigError("attention.mosaic_forward_persistent=True is a launch form of the Mosaic "
                          "forward: set attention.mosaic_forward=True too, or leave it off.")
    tuning = []
    for n in GPU_KERNEL_TUNING:
        v = _get(attn_cfg, n, 0) or 0
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"attention.{n}={v!r} must be a whole number >= 0 (0: the kernel's default).")
        if v:
            tuning.append((n, v))
    return tuple(flags + tuning)


def _dtype(name: Any, field: str) -> Any:
    try:
        return jnp.dtype(name)
    except TypeError as e:
        raise ConfigError(f"model.{field}={name!r} is not a dtype; use e.g. 'bfloat16' or 'float32'.") from e


class Transformer(nnx.Module):
    """The Sparse Transformer. Call with int32 tokens [B, T]; returns float32 logits [B, T, V]."""

    def __init__(self, model_cfg: Any, attn_cfg: Any, *, seq_len: int | None = None, rngs: nnx.Rngs):
        self.vocab_size = int(_get(model_cfg, "vocab_size", 256))
        self.num_layers = int(model_cfg.num_layers)
        self.d_model = int(model_cfg.d_model)
        self.num_heads = int(model_cfg.num_heads)
        self.pos_shape = tuple(int(s) for s in model_cfg.pos_shape)
        self.seq_len = int(np.prod(self.pos_shape)) if seq_len is None else int(seq_len)
        self.dropout = float(_get(model_cfg, "dropout", 0.0))
        self.dtype = _dtype(_get(model_cfg, "dtype", "bfloat16"), "dtype")
        # The residual stream between blocks. float32 by default; bfloat16 halves the
        # bytes of every LayerNorm, residual sum and their backward passes (the
        # element-wise work that dominates a step outside matmuls and attention).
        self.residual_dtype = _dtype(_get(model_cfg, "residual_dtype", "float32"), "residual_dtype")
        # LayerNorm's backward: XLA's fusions, or one Pallas kernel (sparse_lm.layer_norm);
        # "auto" takes the kernel on GPU.
        self.layer_norm_impl = str(_get(model_cfg, "layer_norm_impl", "auto"))
        param_dtype = _dtype(_get(model_cfg, "param_dtype", "float32"), "param_dtype")
        self.remat = str(_get(model_cfg, "remat", "none"))
        self.scan_layers = bool(_get(model_cfg, "scan_layers", False))
        ff_ratio = float(_get(model_cfg, "ff_ratio", 4.0))
        qk_ratio = float(_get(model_cfg, "qk_ratio", 1.0))
        self.spec = PatternSpec.from_config(attn_cfg)
        impl = str(_get(attn_cfg, "impl", "auto"))
        kernel_options = gpu_kernel_options(attn_cfg)
        self._validate(ff_ratio, qk_ratio)
        load_attention_impl(impl)  # before any trace: see sparse_lm.attention._load

        self.head_dim = self.d_model // self.num_heads
        self.qk_dim = int(round(self.head_dim * qk_ratio))
        d, kw = self.d_model, dict(dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
        embed_init = nnx.initializers.normal(d**-0.5)
        self.token_embed = _param(rngs, embed_init, (self.vocab_size, d), ("vocab", "embed"), param_dtype)
        self.start = _param(rngs, embed_init, (d,), ("embed",), param_dtype)
        self.pos_embed = nnx.List(
            [_param(rngs, embed_init, (n, d), ("pos", "embed"), param_dtype) for n in self.pos_shape]
        )
        patterns = [self.spec.layer_pattern(i, self.num_heads) for i in range(self.num_layers)]
        block_kw = dict(
            d_model=d,
            num_heads=self.num_heads,
            qk_dim=self.qk_dim,
            v_dim=self.head_dim,
            d_ff=int(round(d * ff_ratio)),
            num_layers=self.num_layers,
            dropout=self.dropout,
            impl=impl,
            dtype=self.dtype,
            param_dtype=param_dtype,
            kernel_options=kernel_options,
            residual_dtype=self.residual_dtype,
            layer_norm_impl=self.layer_norm_impl,
        )
        if self.scan_layers:
            self.period = pattern_period(patterns)
            if self.num_layers % self.period:
                raise ConfigError(
                    f"model.scan_layers=True scans over groups of {self.period} layers (the "
                    f"'{self.spec.combine}' patterns alternate between layers), but "
                    f"model.num_layers={self.num_layers} is not a multiple of {self.period}; "
                    "use an even number of layers or set model.scan_layers=False."
                )
            group_patterns = patterns[: self.period]

            # One group per scan step, created under vmap so that every parameter gets
            # a leading 'layers' axis (its logical name, for sharding rules) and its own
            # random init. Eager sharding is off inside: it would place the unstacked
            # per-group arrays; the trainer shards the stacked ones from their names.
            def make_group(group_rngs: nnx.Rngs) -> BlockGroup:
                with nnx.use_eager_sharding(False):
                    return BlockGroup(group_patterns, rngs=group_rngs, **block_kw)

            self.layer_groups = nnx.vmap(
                make_group, in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"}
            )(rngs.split(self.num_layers // self.period))
        else:
            self.period = 1
            self.blocks = nnx.List([Block(p, rngs=rngs, **block_kw) for p in patterns])
        self.final_norm = LayerNorm(d, impl=self.layer_norm_impl, **kw)
        self.head = _param(rngs, nnx.initializers.normal(d**-0.5), (d, self.vocab_size), ("embed", "vocab"), param_dtype)
        self.head_bias = _param(rngs, nnx.initializers.zeros, (self.vocab_size,), ("vocab",), param_dtype)

    def _validate(self, ff_ratio: float, qk_ratio: float) -> None:
        if int(np.prod(self.pos_shape)) != self.seq_len:
            raise ConfigError(
                f"model.pos_shape={self.pos_shape} has {int(np.prod(self.pos_shape))} positions but "
                f"data.seq_len={self.seq_len}; the factorized position table must cover the "
                f"context exactly (text/audio: (seq_len // stride, stride))."
            )
        if self.d_model % self.num_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}."
            )
        head_dim = self.d_model // self.num_heads
        if head_dim * qk_ratio < 1 or abs(head_dim * qk_ratio - round(head_dim * qk_ratio)) > 1e-9:
            raise ConfigError(
                f"model.qk_ratio={qk_ratio} times the head size {head_dim} must be a positive integer."
            )
        if self.d_model * ff_ratio < 1 or abs(self.d_model * ff_ratio - round(self.d_model * ff_ratio)) > 1e-9:
            raise ConfigError(f"model.ff_ratio={ff_ratio} times d_model={self.d_model} must be a positive integer.")
        if self.remat not in REMAT_MODES:
            raise ConfigError(f"model.remat={self.remat!r}; choose one of {', '.join(map(repr, REMAT_MODES))}.")
        if self.residual_dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise ConfigError(
                f"model.residual_dtype={self.residual_dtype.name!r}; the residual stream is "
                "'float32' (the default) or 'bfloat16'."
            )
        if self.layer_norm_impl not in LAYER_NORM_IMPLS:
            raise ConfigError(
                f"model.layer_norm_impl={self.layer_norm_impl!r}; choose one of "
                f"{', '.join(map(repr, LAYER_NORM_IMPLS))}."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1).")
        self.spec.validate(self.seq_len, self.num_heads)

    # -- pieces shared with incremental decoding -------------------------------------

    def position_embedding(self, positions: jax.Array) -> jax.Array:
        """Sum of one row per axis of pos_shape for raster positions [...] -> [..., d] float32."""
        out = 0.0
        inner = int(np.prod(self.pos_shape))
        for size, table in zip(self.pos_shape, self.pos_embed):
            inner //= size
            out = out + table[...].astype(jnp.float32)[(positions // inner) % size]
        return out

    def embed_inputs(self, prev_tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """Residual stream input at ``positions`` whose previous bytes are ``prev_tokens``.

        Where the position is 0 there is no previous byte and the learned start vector
        is used instead (``prev_tokens`` is ignored there). Returns the residual
        stream's dtype (``model.residual_dtype``), summed in float32.
        """
        tok = self.token_embed[...].astype(jnp.float32)[prev_tokens]
        start = self.start[...].astype(jnp.float32)
        x = jnp.where((positions == 0)[..., None], start, tok)
        return to_stream(x + self.position_embedding(positions), self.residual_dtype)

    def logits(self, h: jax.Array) -> jax.Array:
        """Final norm and output projection of the residual stream -> float32 logits."""
        y = self.final_norm(h)
        out = jnp.einsum("...d,dv->...v", y, self.head[...].astype(self.dtype), preferred_element_type=jnp.float32)
        return out + self.head_bias[...].astype(jnp.float32)

    # -- the parallel forward pass -----------------------------------------------------

    def __call__(
        self, tokens: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """tokens int32 [B, T] (T <= seq_len) -> float32 logits [B, T, vocab_size].

        ``deterministic=False`` enables dropout, drawing from ``rngs.dropout``.
        """
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
        T = tokens.shape[1]
        if T > self.seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds the model's context of {self.seq_len}")
        keys: jax.Array | None = None
        if not deterministic and self.dropout > 0.0:
            if rngs is None:
                raise ValueError("deterministic=False needs rngs with a 'dropout' stream for dropout masks.")
            # One key per layer, layer i taking keys[i] in both layouts, so a scanned and
            # an unrolled model with the same parameters draw the same masks.
            keys = jax.random.split(rngs.dropout(), self.num_layers)
        h = self._embed_sequence(tokens)
        if not self.scan_layers:
            for i, block in enumerate(self.blocks):
                h = self._run_block(block, h, None if keys is None else keys[i])
            return self.logits(h)

        def group_step(group: BlockGroup, h: jax.Array, group_keys: jax.Array | None) -> tuple[jax.Array, None]:
            for j, block in enumerate(group.blocks):
                h = self._run_block(block, h, None if group_keys is None else group_keys[j])
            return h, None

        h, _ = self._scan_groups(group_step, h, keys)
        return self.logits(h)

    def forward_with_kv(self, tokens: jax.Array) -> tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
        """Deterministic forward pass that also returns each layer's keys and values.

        This is how decoding fills its cache from a prompt: the same parallel pass, and
        the same attention entry point, as ``__call__``.
        """
        if tokens.ndim != 2 or tokens.shape[1] > self.seq_len:
            raise ValueError(f"tokens must be [batch, time <= {self.seq_len}], got {tokens.shape}")
        h = self._embed_sequence(tokens)
        if not self.scan_layers:
            kvs = []
            for block in self.blocks:
                h, kv = block.forward(h, None)
                kvs.append(kv)
            return self.logits(h), kvs

        def group_step(group: BlockGroup, h: jax.Array, _: None) -> tuple[jax.Array, list]:
            kvs = []
            for block in group.blocks:
                h, kv = block.forward(h, None)
                kvs.append(kv)
            return h, kvs

        h, stacked = self._scan_groups(group_step, h, None)
        # stacked[j] holds block j of every group, [groups, ...]; layer i = g * period + j.
        kvs = [
            jax.tree.map(lambda x: x[i // self.period], stacked[i % self.period])
            for i in range(self.num_layers)
        ]
        return self.logits(h), kvs

    def layer_blocks(self) -> Iterator[Block]:
        """Each layer's Block in order, in either layout: with ``scan_layers`` a Block
        whose parameters are that layer's slice of the stack (for code that works one
        layer at a time, like the decoding step)."""
        if not self.scan_layers:
            yield from self.blocks
            return
        graphdef, state = nnx.split(self.layer_groups)
        for g in range(self.num_layers // self.period):
            group = nnx.merge(graphdef, jax.tree.map(lambda x: x[g], state))
            yield from group.blocks

    def _scan_groups(
        self,
        group_step: Callable[[BlockGroup, jax.Array, Any], tuple[jax.Array, Any]],
        h: jax.Array,
        keys: jax.Array | None,
    ) -> tuple[jax.Array, Any]:
        """Runs ``group_step(group, h, group_keys)`` over the stacked groups with a scan,
        carrying the residual stream and stacking what each step returns."""
        graphdef, state = nnx.split(self.layer_groups)
        if keys is not None:
            keys = keys.reshape(self.num_layers // self.period, self.period)

        def body(h: jax.Array, xs: tuple[Any, jax.Array | None]) -> tuple[jax.Array, Any]:
            group_state, group_keys = xs
            # The group rebuilt from one step's slice of the stacked parameters.
            return group_step(nnx.merge(graphdef, group_state), h, group_keys)

        return jax.lax.scan(body, h, (state, keys))

    def _embed_sequence(self, tokens: jax.Array) -> jax.Array:
        # Shift right: position t sees byte t-1 (the start vector at t=0).
        prev = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)))
        return self.embed_inputs(prev, jnp.arange(tokens.shape[1])[None, :])

    def _run_block(self, block: Block, h: jax.Array, key: jax.Array | None) -> jax.Array:
        if self.remat == "none":
            return block(h, key)
        if self.remat in ("save_attention", "save_attention_dots"):
            # Recompute the norms, projections and feed-forward, but not the attention
            # kernel: it stays outside the rematerialised parts, so the residuals of its
            # own backward (q, k, v, output, log-sum-exp) are kept. A policy cannot get
            # this: jax.checkpoint reruns a custom_vjp's forward to rebuild its
            # residuals, whatever names they carry (tests/test_model.py checks the
            # kernel count). Costs q, k, v, o per layer in memory. "save_attention_dots"
            # also keeps the matmul outputs (the output projection and both feed-forward
            # layers, 6 * d_model bf16 values per token and layer), so the backward pass
            # reruns no matmul, only element-wise work.
            policy = REMAT_POLICIES["dots"] if self.remat == "save_attention_dots" else None
            (q, k, v), h = nnx.remat(lambda b, x: b.qkv_and_stream(x), policy=policy)(block, h)
            o = block.attend(q, k, v)
            return nnx.remat(lambda b, x, o_, k_: b.finish(x, o_, k_), policy=policy)(block, h, o, key)
        # Rematerialize each block: the backward pass recomputes what the policy does
        # not save, trading compute for activation memory at long context.
        return nnx.remat(lambda b, x, k: b(x, k), policy=REMAT_POLICIES[self.remat])(block, h, key)


def build_model(config: Any, rngs: nnx.Rngs) -> Transformer:
    """Transformer from a full config (``config.model``, ``config.attention``, ``config.data.seq_len``)."""
    return Transformer(config.model, config.attention, seq_len=int(config.data.seq_len), rngs=rngs)


def count_params(model: nnx.Module) -> int:
    """Number of parameters (scalars) in ``model``."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
