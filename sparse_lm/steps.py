"""The jitted functions of training and evaluation, and the state they carry.

Everything here is a pure function of arrays: the model's structure (an NNX
``GraphDef``) is static and its parameters travel as a plain nested dict, so the
state checkpoints as an ordinary pytree and resumes bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from sparse_lm.optim import learning_rate_schedule

LN2 = math.log(2.0)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: updates applied or skipped so far
    params: Any  # nested dict of float arrays (the model's nnx.Param values)
    opt_state: Any
    rng: jax.Array  # uint32 key data; dropout keys are fold_in(rng, step)
    skipped_in_a_row: jax.Array  # int32: consecutive non-finite steps whose update was dropped
    skipped_total: jax.Array  # int32
    halted_at: jax.Array  # int32: -1, or the step (as numbered in the metrics) whose non-finite update stopped training


@dataclasses.dataclass(frozen=True)
class ModelFns:
    """The model split into a static definition and the template of its parameters."""

    graphdef: Any
    params_template: Any  # nnx.State of Params (shapes, dtypes, logical axis metadata)
    rest: Any  # non-parameter state (empty for this model), merged back unchanged

    def bind(self, params: dict) -> nnx.Module:
        return nnx.merge(self.graphdef, params, self.rest)

    def logical_specs(self) -> dict:
        return nnx.to_pure_dict(nnx.get_partition_spec(self.params_template))


def split_model(model: nnx.Module) -> tuple[ModelFns, dict]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return ModelFns(graphdef, params, rest), nnx.to_pure_dict(params)


def abstract_model(config: ml_collections.ConfigDict) -> nnx.Module:
    """The model's structure and parameter shapes, without allocating anything."""
    from sparse_lm.model import build_model

    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: build_model(config, nnx.Rngs(config.seed)))


def token_nats(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Negative log-likelihood in nats of each token: [B, T]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens)


def init_state(params: dict, tx: optax.GradientTransformation, seed: int) -> TrainState:
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
        step=zero,
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        skipped_in_a_row=zero,
        skipped_total=zero,
        halted_at=jnp.full((), -1, jnp.int32),
    )


def make_train_step(
    fns: ModelFns, tx: optax.GradientTransformation, config: ml_collections.ConfigDict
) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict]]:
    """Returns train_step(state, batch) with batch int32 [accum, micro_batch, T]."""
    schedule_lr = learning_rate_schedule(config)
    stop_mode = config.train.nonfinite == "stop"
    max_skipped = int(config.train.max_skipped)
    # Test-only fault injection (config.train.debug_nan_steps): empty in real runs, and
    # then no extra operation is traced into the step at all.
    nan_steps = tuple(int(s) for s in config.train.get("debug_nan_steps", ()) or ())

    def loss_fn(params, tokens, key):
        model = fns.bind(params)
        logits = model(tokens, deterministic=False, rngs=nnx.Rngs(dropout=key))
        return jnp.mean(token_nats(logits, tokens))

    grad_fn = jax.value_and_grad(loss_fn)

    def train_step(state: TrainState, batch: jax.Array):
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        accum = batch.shape[0]

        def micro(carry, xs):
            loss_sum, grad_sum = carry
            i, tokens = xs
            loss, grads = grad_fn(state.params, tokens, jax.random.fold_in(step_key, i))
            grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
            return (loss_sum + loss, grad_sum), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        (loss_sum, grad_sum), _ = jax.lax.scan(
            micro, (jnp.zeros((), jnp.float32), zeros), (jnp.arange(accum), batch)
        )
        loss = loss_sum / accum
        grads = jax.tree.map(lambda g: g / accum, grad_sum)
        # Steps are numbered as in the metrics: the update computed from state.step is step + 1.
        step_number = state.step + 1
        if nan_steps:
            # Poisons the loss and every gradient, as a real overflow would, so the same
            # device-side checks below see it.
            poison = jnp.where(jnp.isin(step_number, jnp.asarray(nan_steps)), jnp.nan, 1.0)
            loss = loss * poison
            grads = jax.tree.map(lambda g: g * poison, grads)
        grad_norm = optax.tree.norm(grads)

        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)

        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A halted run (non-finite step in 'stop' mode) keeps its last good parameters
        # even if the host notices only a few steps later.
        apply = finite & (state.halted_at < 0)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)
        skipped_in_a_row = jnp.where(finite, 0, state.skipped_in_a_row + 1)
        # 'stop' halts at the first non-finite step; 'skip' once more than max_skipped
        # come in a row. Decided here, on the device, so that a burst of bad steps
        # between two host checks cannot go unnoticed.
        too_many = ~finite if stop_mode else skipped_in_a_row > max_skipped
        halted_at = jnp.where((state.halted_at < 0) & too_many, step_number, state.halted_at)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt, state.opt_state),
            skipped_in_a_row=skipped_in_a_row,
            skipped_total=state.skipped_total + (~finite).astype(jnp.int32),
            halted_at=halted_at,
        )
        metrics = {
            "loss": loss,
            "bits_per_byte": loss / LN2,
            "grad_norm": grad_norm,
            # Skipped updates do not advance the optimizer's schedule count.
            "learning_rate": schedule_lr(state.step - state.skipped_total),
            "skipped_total": new_state.skipped_total,
            "skipped_in_a_row": new_state.skipped_in_a_row,
            "halted_at": halted_at,
        }
        return new_state, metrics

    return train_step


def make_eval_step(fns: ModelFns) -> Callable[[dict, jax.Array, jax.Array], dict]:
    """eval_step(params, tokens [B, T], weights [B, T]) -> sums of nats and weights."""

    def eval_step(params, tokens, weights):
        logits = fns.bind(params)(tokens, deterministic=True)
        nats = token_nats(logits, tokens)
        return {"nats": jnp.sum(nats * weights), "bytes": jnp.sum(weights)}

    return eval_step






