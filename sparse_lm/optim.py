"""AdamW with linear warmup, cosine decay, gradient clipping and weight decay."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    o = config.optim
    decay_steps = o.decay_steps or config.train.num_steps
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=o.learning_rate,
        warmup_steps=o.warmup_steps,
        decay_steps=max(decay_steps, o.warmup_steps + 1),
        end_value=o.learning_rate * o.min_lr_ratio,
    )


def _decay_mask(params):
    """True for the parameters weight decay applies to: matrices and embedding tables;
    biases and norm scales (rank < 2) are left alone, as is usual for transformers.
    Scanned layers (model.scan_layers) stack each layer's parameters under
    ``layer_groups`` on a leading layer axis, which does not count: a stack of biases
    is still biases."""

    def decays(path, p) -> bool:
        stacked = any(getattr(k, "key", None) == "layer_groups" for k in path)
        return jnp.ndim(p) - (1 if stacked else 0) >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    o = config.optim
    parts = []
    if o.clip_norm:
        parts.append(optax.clip_by_global_norm(o.clip_norm))
    parts.append(
        optax.adamw(
            learning_rate=learning_rate_schedule(config),
            b1=o.b1,
            b2=o.b2,
            eps=o.eps,
            weight_decay=o.weight_decay,
            mask=_decay_mask,
        )
    )
    return optax.chain(*parts)
