"""The optimizer: which parameters weight decay touches, and the learning-rate schedule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.enwik8 import get_config
from sparse_lm.model import build_model
from sparse_lm.optim import _decay_mask, learning_rate_schedule, make_optimizer


def _decayed_names(scan_layers: bool) -> dict[str, bool]:
    config = get_config("smoke")
    config.model.scan_layers = scan_layers
    params = nnx.state(build_model(config, nnx.Rngs(0)), nnx.Param)
    flat = jax.tree_util.tree_flatten_with_path(_decay_mask(params))[0]
    # The parameter's own name (its last dict key), whatever layer holds it.
    names = {}
    for path, decays in flat:
        name = [getattr(k, "key", None) for k in path if isinstance(getattr(k, "key", None), str)][-1]
        names.setdefault(name, set()).add(bool(decays))
    return names


def test_weight_decay_skips_biases_and_norms_also_in_scanned_layers():
    """Scanned layers stack each parameter on a leading layer axis: a stack of biases
    (rank 2) must not be decayed like a matrix."""
    unrolled, scanned = _decayed_names(False), _decayed_names(True)
    assert scanned == unrolled
    for name in ("bias", "scale", "b_in", "b_out"):
        assert unrolled[name] == {False}, name
    for name in ("w_in", "w_out", "token_embed"):
        assert unrolled[name] == {True}, name


def test_decay_leaves_a_scanned_norm_scale_alone_and_shrinks_matrices():
    config = get_config("smoke")
    config.model.scan_layers = True
    config.optim.update(weight_decay=0.1, learning_rate=1.0, warmup_steps=0, clip_norm=0.0)
    params = nnx.state(build_model(config, nnx.Rngs(0)), nnx.Param)
    tx = make_optimizer(config)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    after = jax.tree.map(lambda p, u: p + u, params, updates)
    block = after["layer_groups"]["blocks"][0]
    np.testing.assert_array_equal(block["norm_attn"]["scale"][...],
                                  params["layer_groups"]["blocks"][0]["norm_attn"]["scale"][...])
    w = params["layer_groups"]["blocks"][0]["ff"]["w_in"][...]
    np.testing.assert_allclose(block["ff"]["w_in"][...], w * (1 - 0.1), rtol=1e-6)


@pytest.mark.parametrize("warmup", [4, 0])
def test_schedule_warms_up_linearly_then_decays_to_the_floor(warmup):
    config = get_config("smoke")
    config.optim.update(learning_rate=1.0, warmup_steps=warmup, min_lr_ratio=0.1)
    config.train.num_steps = 20
    lr = learning_rate_schedule(config)
    if warmup:
        assert [float(lr(i)) for i in range(warmup + 1)] == pytest.approx([i / warmup for i in range(warmup + 1)])
    assert float(lr(20)) == pytest.approx(0.1)
