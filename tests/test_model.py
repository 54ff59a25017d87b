"""The Sparse Transformer model, specified by what it must do (tiny sizes, CPU)."""

from __future__ import annotations

import functools
import re

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from sparse_lm import sharding
from sparse_lm.attention import PatternError
from sparse_lm.model import AXIS_NAMES, ConfigError, Transformer, build_model, stack_layer_params
from tests.helpers import run_python

SEQ_LEN = 32


def tiny_config(pattern: str = "dense", combine: str = "merged", **model) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.model = dict(
        vocab_size=256, num_layers=2, d_model=32, num_heads=4, ff_ratio=4.0, qk_ratio=1.0,
        dropout=0.0, pos_shape=(SEQ_LEN // 8, 8), dtype="float32", param_dtype="float32", remat="none",
    )
    cfg.model.update(model)
    cfg.attention = dict(
        pattern=pattern, stride=8, summary=2, combine=combine, distinct_summaries=False, impl="reference"
    )
    cfg.data = dict(seq_len=SEQ_LEN)
    return cfg


def random_tokens(batch: int = 2, length: int = SEQ_LEN, seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, 256, dtype=jnp.int32)


PATTERNS = [
    ("dense", "merged"),
    ("local", "merged"),
    ("strided", "merged"),
    ("strided", "interleaved"),
    ("strided", "multihead"),
    ("fixed", "merged"),
    ("fixed", "interleaved"),
    ("fixed", "multihead"),
]


def test_logits_are_float32_with_one_row_per_input_byte():
    model = build_model(tiny_config(dtype="bfloat16"), nnx.Rngs(0))
    logits = model(random_tokens())
    assert logits.shape == (2, SEQ_LEN, 256)
    assert logits.dtype == jnp.float32
    assert bool(jnp.isfinite(logits).all())


def test_shorter_inputs_than_the_context_are_accepted_and_longer_rejected():
    model = build_model(tiny_config(), nnx.Rngs(0))
    tokens = random_tokens()
    # A prefix's logits are the full sequence's logits on that prefix (causal, absolute positions).
    np.testing.assert_allclose(model(tokens[:, :11]), model(tokens)[:, :11], atol=1e-5)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model(random_tokens(length=SEQ_LEN + 8))


@pytest.mark.parametrize("pattern,combine", PATTERNS)
def test_changing_byte_t_changes_no_logit_up_to_t(pattern, combine):
    model = build_model(tiny_config(pattern, combine, distinct_summaries=False), nnx.Rngs(1))
    tokens = random_tokens()
    base = np.asarray(model(tokens))
    for t in (0, 5, 17, SEQ_LEN - 2):
        changed = tokens.at[:, t].set((tokens[:, t] + 1) % 256)
        out = np.asarray(model(changed))
        # logits[:, t] predicts byte t, so it must not see byte t either.
        np.testing.assert_array_equal(out[:, : t + 1], base[:, : t + 1])
        assert np.abs(out[:, t + 1] - base[:, t + 1]).max() > 1e-4, "byte t must reach position t + 1"


@pytest.mark.parametrize("pattern,combine", [p for p in PATTERNS if p[0] != "local"])
def test_two_factorized_layers_connect_the_first_byte_to_the_last_position(pattern, combine):
    model = build_model(tiny_config(pattern, combine), nnx.Rngs(2))
    tokens = random_tokens()
    changed = tokens.at[:, 0].set((tokens[:, 0] + 1) % 256)
    assert np.abs(np.asarray(model(changed)[:, -1] - model(tokens)[:, -1])).max() > 1e-6


def test_residual_output_projections_init_std_is_scaled_by_one_over_sqrt_2n():
    def stds(num_layers: int) -> dict[str, float]:
        m = build_model(tiny_config(num_layers=num_layers, d_model=64, num_heads=2), nnx.Rngs(3))
        b = m.blocks[0]
        return {
            "attn_out": float(np.std(b.attn.out[...])),
            "ff_out": float(np.std(b.ff.w_out[...])),
            "ff_in": float(np.std(b.ff.w_in[...])),
        }

    for n in (2, 8):
        s = stds(n)
        # Fan-in init (1/sqrt(fan_in)) times 1/sqrt(2N) on the residual outputs only.
        np.testing.assert_allclose(s["attn_out"], 64**-0.5 / np.sqrt(2 * n), rtol=0.05)
        np.testing.assert_allclose(s["ff_out"], 256**-0.5 / np.sqrt(2 * n), rtol=0.05)
        np.testing.assert_allclose(s["ff_in"], 64**-0.5, rtol=0.05)


def test_half_size_feed_forward_and_query_key_change_parameter_shapes():
    full = build_model(tiny_config(d_model=64, num_heads=4), nnx.Rngs(0)).blocks[0]
    half = build_model(tiny_config(d_model=64, num_heads=4, ff_ratio=2.0, qk_ratio=0.5), nnx.Rngs(0)).blocks[0]
    assert full.ff.w_in.shape == (64, 256) and half.ff.w_in.shape == (64, 128)
    assert half.ff.w_out.shape == (128, 64)
    assert full.attn.query.shape == (64, 4, 16) and half.attn.query.shape == (64, 4, 8)
    assert half.attn.key.shape == (64, 4, 8)
    # Values keep the full head size, so the output projection is unchanged.
    assert half.attn.value.shape == (64, 4, 16) and half.attn.out.shape == (4, 16, 64)
    tokens = random_tokens()
    assert build_model(tiny_config(ff_ratio=2.0, qk_ratio=0.5), nnx.Rngs(0))(tokens).shape == (2, SEQ_LEN, 256)


def test_dropout_is_active_only_when_not_deterministic():
    model = build_model(tiny_config(dropout=0.3), nnx.Rngs(0))
    tokens = random_tokens()
    det = model(tokens)
    np.testing.assert_array_equal(det, model(tokens, deterministic=True, rngs=nnx.Rngs(dropout=1)))
    a = model(tokens, deterministic=False, rngs=nnx.Rngs(dropout=1))
    b = model(tokens, deterministic=False, rngs=nnx.Rngs(dropout=1))
    c = model(tokens, deterministic=False, rngs=nnx.Rngs(dropout=2))
    np.testing.assert_array_equal(a, b)  # same key, same masks
    assert np.abs(np.asarray(a - det)).max() > 1e-3
    assert np.abs(np.asarray(a - c)).max() > 1e-3
    with pytest.raises(ValueError, match="rngs"):
        model(tokens, deterministic=False)
    # dropout=0 is a no-op even in training mode.
    plain = build_model(tiny_config(dropout=0.0), nnx.Rngs(0))
    np.testing.assert_array_equal(plain(tokens), plain(tokens, deterministic=False, rngs=nnx.Rngs(dropout=1)))


@functools.cache
def _loss_and_grads(remat: str):
    model = build_model(tiny_config("strided", "interleaved", remat=remat, dropout=0.2), nnx.Rngs(4))
    tokens = random_tokens()

    def loss_fn(m):
        logits = m(tokens, deterministic=False, rngs=nnx.Rngs(dropout=7))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    return loss, grads


@pytest.mark.parametrize("remat", ["full", "save_attention", "save_attention_dots", "dots", "dots_no_batch"])
def test_remat_gives_the_same_loss_and_grads_as_no_remat(remat):
    loss0, grads0 = _loss_and_grads("none")
    loss1, grads1 = _loss_and_grads(remat)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads1, grads0)
    assert jax.tree.structure(grads1) == jax.tree.structure(grads0)


def test_float32_params_with_bfloat16_compute():
    model = build_model(tiny_config(dtype="bfloat16", param_dtype="float32"), nnx.Rngs(0))
    for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
        assert leaf.dtype == jnp.float32
    tokens = random_tokens()
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert dots, "expected matmuls in the forward pass"
    for eqn in dots:  # every matmul, attention included, reads bf16 operands
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16, jnp.bfloat16], eqn
    assert jaxpr.out_avals[0].dtype == jnp.float32
    # And it is a real change of precision, not a no-op: float32 compute differs slightly.
    f32 = build_model(tiny_config(dtype="float32"), nnx.Rngs(0))(tokens)
    diff = float(jnp.abs(model(tokens) - f32).max())
    assert 1e-4 < diff < 0.5


def _eqns(jaxpr):
    """Every equation of a jaxpr, inside nested jaxprs too."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _eqns(sub)


def test_a_bfloat16_residual_stream_is_stored_in_bfloat16_and_stays_close_to_float32():
    tokens = random_tokens()
    m32 = build_model(tiny_config(dtype="bfloat16"), nnx.Rngs(0))
    m16 = build_model(tiny_config(dtype="bfloat16", residual_dtype="bfloat16"), nnx.Rngs(0))
    h = m16._embed_sequence(tokens)
    assert h.dtype == jnp.bfloat16 and m16.blocks[0](h, None).dtype == jnp.bfloat16
    assert m32._embed_sequence(tokens).dtype == jnp.float32

    # The roundings are pinned by optimization barriers (one after the embedding, two
    # per block), or XLA would fold them away and keep the stream in float32.
    def barriers(model):
        graphdef, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens).jaxpr
        return [e for e in _eqns(jaxpr) if e.primitive.name == "optimization_barrier"]

    found = barriers(m16)
    assert len(found) == 1 + 2 * 2
    assert all(v.aval.dtype == jnp.bfloat16 and v.aval.shape == (2, SEQ_LEN, 32) for e in found for v in e.outvars)
    assert barriers(m32) == []

    l32, l16 = m32(tokens), m16(tokens)
    diff = float(jnp.abs(l16 - l32).max()) / float(jnp.abs(l32).max())
    assert 0.0 < diff < 2e-2  # a real change of precision, and a small one

    def loss_grads(model):
        graphdef, state = nnx.split(model)
        return jax.grad(lambda s: nnx.merge(graphdef, s)(tokens).mean())(state)

    g32, g16 = loss_grads(m32), loss_grads(m16)
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
        assert a.dtype == b.dtype == jnp.float32 and bool(jnp.isfinite(a).all())
    num = sum(float(jnp.sum(jnp.square(a - b))) for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)))
    den = sum(float(jnp.sum(jnp.square(b))) for b in jax.tree.leaves(g32))
    assert (num / den) ** 0.5 < 5e-2


@pytest.mark.parametrize("residual_dtype, remat", [("float32", "none"), ("bfloat16", "save_attention")])
def test_the_pallas_layer_norm_backward_gives_the_models_gradients(residual_dtype, remat, monkeypatch):
    from sparse_lm import layer_norm as ln

    calls = []  # per kernel launch: does the stream's other use come in through it?
    real = ln._pallas_backward
    monkeypatch.setattr(ln, "_pallas_backward", lambda *a: calls.append(a[5] is not None) or real(*a))
    tokens = random_tokens(batch=8)  # 256 rows: the kernel's 128-row programs apply
    grads = {}
    for impl in ("xla", "pallas_gpu"):
        cfg = tiny_config(layer_norm_impl=impl, residual_dtype=residual_dtype, remat=remat)
        graphdef, state = nnx.split(build_model(cfg, nnx.Rngs(0)))
        loss = lambda s: nnx.merge(graphdef, s)(tokens).mean()  # noqa: E731
        grads[impl] = jax.grad(loss)(state)
    # Both norms of each of the 2 blocks take the residual sum's gradient in the kernel;
    # the final norm has no other use.
    assert sorted(calls) == [False] + [True] * 4
    tol = 1e-5 if residual_dtype == "float32" else 2e-2
    for a, b in zip(jax.tree.leaves(grads["pallas_gpu"]), jax.tree.leaves(grads["xla"])):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * float(jnp.abs(b).max()))


def test_parameters_carry_logical_axis_names():
    model = build_model(tiny_config("fixed", "merged", num_layers=1), nnx.Rngs(0))
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    shapes = nnx.state(model, nnx.Param)
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    flat_shapes = jax.tree.leaves(shapes)
    assert len(flat_specs) == len(flat_shapes)
    for spec, leaf in zip(flat_specs, flat_shapes):
        assert isinstance(spec, jax.sharding.PartitionSpec)
        assert len(spec) == leaf.ndim
        assert all(name is None or name in AXIS_NAMES for name in spec)
    assert specs["token_embed"] == jax.sharding.PartitionSpec("vocab", "embed")
    assert specs["pos_embed"][0] == jax.sharding.PartitionSpec("pos", "embed")
    assert specs["blocks"][0]["attn"]["query"] == jax.sharding.PartitionSpec("embed", "heads", "head_dim")
    assert specs["blocks"][0]["attn"]["out"] == jax.sharding.PartitionSpec("heads", "head_dim", "embed")
    assert specs["blocks"][0]["ff"]["w_in"] == jax.sharding.PartitionSpec("embed", "mlp")
    assert specs["head"] == jax.sharding.PartitionSpec("embed", "vocab")


def test_image_positions_factorize_into_row_column_and_channel_tables():
    cfg = tiny_config(pos_shape=(2, 4, 3), num_layers=1)
    cfg.data.seq_len = 24
    cfg.attention.stride = 12
    model = build_model(cfg, nnx.Rngs(0))
    assert [t.shape for t in model.pos_embed] == [(2, 32), (4, 32), (3, 32)]
    pos = model.position_embedding(jnp.arange(24))
    rows, cols, chans = (np.asarray(t[...]) for t in model.pos_embed)
    # position 17 = row 1, column 1, channel 2 in raster (row, column, channel) order.
    np.testing.assert_allclose(pos[17], rows[1] + cols[1] + chans[2], rtol=1e-6)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(model=dict(pos_shape=(4, 4))), ConfigError, "pos_shape"),
        (dict(model=dict(d_model=30)), ConfigError, "divisible"),
        (dict(model=dict(qk_ratio=0.3)), ConfigError, "qk_ratio"),
        (dict(model=dict(remat="some")), ConfigError, "remat"),
        (dict(model=dict(residual_dtype="float16")), ConfigError, "residual_dtype='float16'.*'bfloat16'"),
        (dict(model=dict(residual_dtype="bf17")), ConfigError, "residual_dtype='bf17' is not a dtype"),
        (dict(model=dict(layer_norm_impl="triton")), ConfigError, "layer_norm_impl='triton'.*'pallas_gpu'"),
        (dict(attention=dict(pattern="strided", stride=12)), PatternError, "multiple"),
        (dict(attention=dict(pattern="fixed", summary=16)), PatternError, "c <= l"),
        (dict(attention=dict(pattern="diagonal")), PatternError, "unknown attention pattern"),
        (dict(model=dict(num_heads=1, d_model=32), attention=dict(pattern="strided", combine="multihead")),
         PatternError, "at least 2 heads"),
        # Interleaved patterns alternate, so a scan step covers 2 layers.
        (dict(model=dict(scan_layers=True, num_layers=3), attention=dict(pattern="strided", combine="interleaved")),
         ConfigError, "num_layers=3 is not a multiple of 2"),
    ],
)
def test_bad_configs_fail_at_build_time_with_a_clear_error(change, error, match):
    cfg = tiny_config()
    for section, fields in change.items():
        cfg[section].update(fields)
    with pytest.raises(error, match=match):
        build_model(cfg, nnx.Rngs(0))


def test_transformer_can_be_built_from_its_two_config_sections():
    cfg = tiny_config()
    model = Transformer(cfg.model, cfg.attention, rngs=nnx.Rngs(0))
    assert model.seq_len == SEQ_LEN


# -- scanned layers (model.scan_layers) ------------------------------------------------


def scanned_copy(unrolled: Transformer, cfg: ml_collections.ConfigDict) -> Transformer:
    """A scan_layers model holding ``unrolled``'s parameters, stacked per layer."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.model.scan_layers = True
    scanned = build_model(cfg, nnx.Rngs(99))  # its own init is overwritten below
    params = nnx.state(scanned, nnx.Param)
    unrolled_params = nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))
    nnx.replace_by_pure_dict(params, stack_layer_params(unrolled_params, unrolled.num_layers, scanned.period))
    nnx.update(scanned, params)
    return scanned


def _dropout_loss(model: Transformer, tokens: jax.Array) -> jax.Array:
    logits = model(tokens, deterministic=False, rngs=nnx.Rngs(dropout=7))
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))


@pytest.mark.parametrize("combine", ["merged", "interleaved"])
@pytest.mark.parametrize("remat", ["none", "full", "save_attention"])
def test_scanned_layers_give_the_logits_and_grads_of_unrolled_layers(combine, remat):
    cfg = tiny_config("strided", combine, num_layers=4, dropout=0.2, remat=remat)
    unrolled = build_model(cfg, nnx.Rngs(5))
    scanned = scanned_copy(unrolled, cfg)
    assert scanned.period == (2 if combine == "interleaved" else 1)
    assert not hasattr(scanned, "blocks")  # no unstacked copy of the parameters
    tokens = random_tokens()
    np.testing.assert_allclose(scanned(tokens), unrolled(tokens), rtol=1e-5, atol=1e-5)

    # Training mode: the same per-layer dropout keys, so the same masks and gradients.
    loss_u, grads_u = nnx.value_and_grad(_dropout_loss)(unrolled, tokens)
    loss_s, grads_s = nnx.value_and_grad(_dropout_loss)(scanned, tokens)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
    want = stack_layer_params(nnx.to_pure_dict(grads_u), 4, scanned.period)
    got = nnx.to_pure_dict(grads_s)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)
    # Dropout is live (a different key changes the loss), so the match above is not vacuous.
    other = scanned(tokens, deterministic=False, rngs=nnx.Rngs(dropout=8))
    assert np.abs(np.asarray(other - scanned(tokens, deterministic=False, rngs=nnx.Rngs(dropout=7)))).max() > 1e-3


def _train_jaxpr_size(num_layers: int, scan_layers: bool, combine: str) -> int:
    """Equations, nested ones included, of a dropout loss-and-gradient with remat."""
    cfg = tiny_config("strided", combine, num_layers=num_layers, dropout=0.1, remat="full", scan_layers=scan_layers)
    model = build_model(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    loss = lambda p, t: _dropout_loss(nnx.merge(graphdef, p), t)
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(params, random_tokens())

    def subjaxprs(params: dict) -> list[jax.extend.core.Jaxpr]:
        # Scan, remat, custom_jvp and cond keep their bodies in their params.
        found = []
        for v in params.values():
            for item in v if isinstance(v, (tuple, list)) else (v,):
                if isinstance(item, jax.extend.core.ClosedJaxpr):
                    found.append(item.jaxpr)
                elif isinstance(item, jax.extend.core.Jaxpr):
                    found.append(item)
        return found

    def count(j: jax.extend.core.Jaxpr) -> int:
        return sum(1 + sum(count(sub) for sub in subjaxprs(e.params)) for e in j.eqns)

    return count(jaxpr.jaxpr)


@pytest.mark.parametrize("combine", ["merged", "interleaved"])
def test_the_scanned_program_does_not_grow_with_depth(combine):
    # The whole traced program, backward pass and remat included, is the same size for
    # 2 and 8 layers: XLA compiles one scan body whatever the depth.
    assert _train_jaxpr_size(8, True, combine) == _train_jaxpr_size(2, True, combine)
    # Unrolled, it grows about linearly (the comparison the scan is for).
    assert _train_jaxpr_size(8, False, combine) > 3 * _train_jaxpr_size(2, False, combine)


def test_scanned_parameters_carry_a_leading_layers_axis_that_the_mesh_rules_map():
    cfg = tiny_config("fixed", "interleaved", num_layers=6, scan_layers=True)
    model = build_model(cfg, nnx.Rngs(0))
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    P = jax.sharding.PartitionSpec
    for j in (0, 1):  # the group's two blocks, each stacked over the 3 groups
        block = specs["layer_groups"]["blocks"][j]
        assert block["attn"]["query"] == P("layers", "embed", "heads", "head_dim")
        assert block["ff"]["w_out"] == P("layers", "mlp", "embed")
        assert block["norm_attn"]["scale"] == P("layers", "embed")
        assert model.layer_groups.blocks[j].attn.query.shape == (3, 32, 4, 8)
    assert specs["token_embed"] == P("vocab", "embed")  # outside the stack: unchanged
    for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)):
        assert all(name is None or name in AXIS_NAMES for name in spec)
    # The trainer's rules know the axis: the stack stays whole, inner axes shard as before.
    mesh = jax.make_mesh((1, 1, 1), sharding.MESH_AXES, devices=jax.devices()[:1])
    assert sharding.logical_to_mesh(P("layers", "embed", "mlp"), (3, 32, 128), mesh) == P(None, "fsdp", "tensor")
    # The per-layer view slices the stack in layer order, with each layer's own pattern.
    blocks = list(model.layer_blocks())
    assert [b.pattern for b in blocks] == [model.spec.layer_pattern(i, 4) for i in range(6)]
    for i, block in enumerate(blocks):  # layer i = group i // 2, block i % 2
        stack = model.layer_groups.blocks[i % 2].attn.query[...]
        np.testing.assert_array_equal(block.attn.query[...], stack[i // 2])


def test_layers_scan_over_any_depth_when_the_pattern_does_not_alternate():
    model = build_model(tiny_config("strided", "merged", num_layers=3, scan_layers=True), nnx.Rngs(0))
    assert model.period == 1
    assert model.layer_groups.blocks[0].ff.w_in.shape == (3, 32, 128)
    assert model(random_tokens()).shape == (2, SEQ_LEN, 256)


@pytest.mark.parametrize("rate,width", [(0.4, 8), (0.1, 8), (0.01, 16), (0.5, 8), (1e-6, 32)])
def test_dropout_mask_drops_the_rate_it_reports(rate, width):
    from sparse_lm.model import dropout_keep_mask

    shape = (8, 1024, 33)  # element count not a multiple of 4: the last word is cut
    keep, p_keep = dropout_keep_mask(jax.random.key(3), rate, shape)
    assert keep.shape == shape and keep.dtype == jnp.bool_
    # The reported keep probability is the asked rate rounded to a multiple of 2^-width.
    assert p_keep == 1 - max(1, round(rate * 2**width)) / 2**width
    assert abs((1 - p_keep) - rate) <= 0.02 * rate + 2**-32
    n = keep.size
    frac = float(keep.mean())
    # Within 5 standard deviations of a Bernoulli(p_keep) mean.
    assert abs(frac - p_keep) < 5 * (p_keep * (1 - p_keep) / n) ** 0.5 + 1e-9
    # Neighbouring elements (bytes of one 32-bit word) are not correlated.
    flat = np.asarray(keep).reshape(-1)[: n - n % 4].reshape(-1, 4).astype(np.float64)
    if rate > 1e-5:
        c = np.corrcoef(flat[:, 0], flat[:, 1])[0, 1]
        assert abs(c) < 0.02


def test_dropout_keeps_the_expected_value():
    from sparse_lm.model import _dropout

    x = jnp.ones((64, 4096), jnp.float32)
    y = _dropout(x, 0.4, jax.random.key(0))
    assert float(y.mean()) == pytest.approx(1.0, abs=0.01)
    kept = np.asarray(y)[np.asarray(y) != 0]
    np.testing.assert_allclose(kept, 1 / (1 - 102 / 256), rtol=1e-6)


def _kernel_launches(remat: str) -> dict[str, int]:
    """Pallas kernels in a train step's loss-and-gradient (dead code removed, nested
    bodies included): the fixed pattern through the GPU kernel in interpret mode."""
    import collections

    import jax.extend

    from jax._src.interpreters import partial_eval as pe

    cfg = tiny_config("fixed", "merged", num_layers=2, remat=remat, pos_shape=(4, 16), d_model=64)
    cfg.attention.update(stride=16, summary=4, impl="pallas_gpu")
    cfg.data.seq_len = 64
    model = build_model(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    loss = lambda p, t: _dropout_loss(nnx.merge(graphdef, p), t)  # noqa: E731
    closed = jax.make_jaxpr(jax.value_and_grad(loss))(params, random_tokens(length=64))
    counts: collections.Counter = collections.Counter()

    def walk(jaxpr):
        jaxpr, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                counts[eqn.params["name"]] += 1
                continue
            if eqn.primitive.name == "dot_general":
                counts["dot_general"] += 1
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(closed.jaxpr)
    return dict(counts)


def test_save_attention_runs_the_attention_forward_once():
    # Two layers, the fixed pattern's two parts co-launched: 2 forward launches, and 2
    # more when the backward recomputes the block under remat "full".
    full, saved = _kernel_launches("full"), _kernel_launches("save_attention")
    assert full["sparse_attn_fwd_v2"] == 4
    assert saved["sparse_attn_fwd_v2"] == 2
    assert saved["sparse_attn_bwd_dq_v2"] == full["sparse_attn_bwd_dq_v2"] == 2  # one per layer
    assert saved["sparse_attn_bwd_dkv_v2"] == full["sparse_attn_bwd_dkv_v2"] == 4  # one per part


def test_save_attention_dots_reruns_no_matmul():
    # Per layer the backward pass needs the outputs of two forward matmuls that are not
    # a remat region's outputs (the output projection's, for the second LayerNorm, and
    # the first feed-forward layer's, for GELU): save_attention reruns those two,
    # save_attention_dots keeps them. The attention kernel runs once in both.
    saved, dots, none = (_kernel_launches(m) for m in ("save_attention", "save_attention_dots", "none"))
    assert dots["dot_general"] == none["dot_general"]
    assert saved["dot_general"] == none["dot_general"] + 2 * 2
    assert dots["sparse_attn_fwd_v2"] == none["sparse_attn_fwd_v2"] == 2


def test_gpu_kernel_options_reach_the_kernel_and_change_no_result():
    import collections
    import re

    def loss_grads_and_kernels(**options):
        cfg = tiny_config("fixed", "merged", num_layers=2, pos_shape=(4, 16), d_model=64)
        cfg.attention.update(stride=16, summary=4, impl="pallas_gpu", **options)
        cfg.data.seq_len = 64
        model = build_model(cfg, nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        tokens = random_tokens(length=64)
        loss = lambda p: _dropout_loss(nnx.merge(graphdef, p), tokens)  # noqa: E731
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
        kernels = collections.Counter(re.findall(r"name=(sparse_attn\w*)", jaxpr))
        value, grads = jax.value_and_grad(loss)(params)
        return value, grads, kernels

    # False reaches the kernel although the default is True: the fixed pattern's two
    # parts then take one forward and one dQ launch each instead of sharing them.
    base, base_grads, base_kernels = loss_grads_and_kernels(colaunch=False, narrow_chain=False)
    opt, opt_grads, opt_kernels = loss_grads_and_kernels(colaunch=True)
    for name in ("sparse_attn_fwd_v2", "sparse_attn_bwd_dq_v2"):
        assert base_kernels[name] == 2 * opt_kernels[name] > 0, (name, base_kernels, opt_kernels)
    np.testing.assert_allclose(opt, base, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), opt_grads, base_grads)


def test_mosaic_summary_dq_left_unset_keeps_the_kernel_default():
    """Unset (the config's default) it is not passed, so the kernel decides (on for
    merged fixed heads where it applies); False is passed, for reproducible gradients."""
    from sparse_lm.config import base_config
    from sparse_lm.model import gpu_kernel_options

    cfg = base_config()
    assert cfg.attention.mosaic_summary_dq is None
    assert "mosaic_summary_dq" not in dict(gpu_kernel_options(cfg.attention))
    cfg.attention.mosaic_summary_dq = False
    assert dict(gpu_kernel_options(cfg.attention))["mosaic_summary_dq"] is False


def test_gpu_kernel_options_are_ignored_by_other_impls():
    cfg = tiny_config("fixed", "merged")
    cfg.attention.update(colaunch=False, diag_bwd=False)  # impl "reference"
    model = build_model(cfg, nnx.Rngs(0))
    plain = build_model(tiny_config("fixed", "merged"), nnx.Rngs(0))
    np.testing.assert_array_equal(model(random_tokens()), plain(random_tokens()))


def test_dropout_rates_near_one_keep_the_keep_probability_close():
    from sparse_lm.model import dropout_keep_mask

    _, p_keep = dropout_keep_mask(jax.random.key(0), 0.999, (4, 64))
    assert abs(p_keep - 0.001) <= 0.02 * 0.001


def _forward_jaxpr_text(**attention) -> str:
    cfg = tiny_config("fixed", "merged", num_layers=1, pos_shape=(4, 16), d_model=64)
    cfg.attention.update(stride=16, summary=4, impl="pallas_gpu", **attention)
    cfg.data.seq_len = 64
    model = build_model(cfg, nnx.Rngs(0))
    return str(jax.make_jaxpr(lambda t: model(t))(random_tokens(length=64)))


def test_config_kernel_flags_reach_the_kernel_also_when_false():
    # colaunch is on by default in the kernel: a config's False must still turn it off.
    assert _forward_jaxpr_text().count("name=sparse_attn_fwd_v2") == 1
    assert _forward_jaxpr_text(colaunch=False).count("name=sparse_attn_fwd_v2") == 2


def test_config_persistent_forward_reaches_the_kernel_and_needs_the_mosaic_forward():
    def forward_kernels(**attention) -> set[str]:
        # bf16 at head dim 64 and T = 128: where the Mosaic forward applies.
        cfg = tiny_config("fixed", "merged", num_layers=1, pos_shape=(8, 16), d_model=64,
                          num_heads=1, dtype="bfloat16")
        cfg.attention.update(stride=16, summary=4, impl="pallas_gpu", **attention)
        cfg.data.seq_len = 128
        model = build_model(cfg, nnx.Rngs(0))
        text = str(jax.make_jaxpr(lambda t: model(t))(random_tokens(length=128)))
        return set(re.findall(r"mgpu_attn_fwd_merged\w*", text))

    assert forward_kernels(mosaic_forward=True) == {"mgpu_attn_fwd_merged"}
    assert forward_kernels(mosaic_forward=True, mosaic_forward_persistent=True) == {
        "mgpu_attn_fwd_merged_persistent"}
    with pytest.raises(ConfigError, match="set attention.mosaic_forward=True too"):
        forward_kernels(mosaic_forward_persistent=True)


def test_config_launch_parameters_reach_the_kernel_and_zero_keeps_its_defaults(monkeypatch):
    import re

    # Launch parameters appear in the jaxpr only for the GPU (not the interpreter).
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    default = _forward_jaxpr_text(num_warps=0, block_q=0)
    assert set(re.findall(r"num_warps=\d+", default)) == {"num_warps=4"}
    assert set(re.findall(r"grid=\(\d+", default)) == {"grid=(1"}  # one 64-row query tile
    text = _forward_jaxpr_text(num_warps=8, num_stages=3, block_q=16, block_k=32)
    assert set(re.findall(r"num_warps=\d+", text)) == {"num_warps=8"}
    assert set(re.findall(r"num_stages=\d+", text)) == {"num_stages=3"}
    assert set(re.findall(r"grid=\(\d+", text)) == {"grid=(4"}  # four 16-row query tiles
    with pytest.raises(ConfigError, match=r"attention.num_warps=-4 must be a whole number"):
        _forward_jaxpr_text(num_warps=-4)


def test_a_model_with_a_pallas_kernel_compiles_its_jitted_step_once():
    # Lowering a Pallas call on the CPU imports a module that adds a JAX config option
    # to every jit's cache key; imported during the first trace, it made the second call
    # of the same jitted function trace and compile it again. Building the model loads
    # the kernel first (sparse_lm.attention.load). A fresh process: in this one another
    # test may have imported that module already.
    out = run_python("""
        import json
        import jax, jax.numpy as jnp
        from flax import nnx
        from configs import enwik8
        from sparse_lm.model import build_model
        c = enwik8.get_config("smoke")
        c.attention.impl = "pallas_gpu"  # interpret mode on the CPU
        c.model.num_layers, c.data.seq_len, c.model.pos_shape = 1, 128, (4, 32)
        model = build_model(c, nnx.Rngs(0))
        traces = []
        def loss(m, x):
            traces.append(1)
            return m(x).sum()
        f = nnx.jit(loss)
        x = jnp.zeros((1, 128), jnp.int32)
        a, b = float(f(model, x)), float(f(model, x))
        print(json.dumps({"traces": len(traces), "same": a == b}))
    """)
    assert out == {"traces": 1, "same": True}
