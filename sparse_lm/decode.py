"""Incremental decoding with a sparse key/value cache, and sampling.

Each layer keeps a preallocated cache of keys and values, [B, S, H, D] for S = the
requested length. A step at position t writes its own key and value, then each head
gathers only the positions its pattern allows: index arrays of static size
O(l + S/l) computed from t (the union of the head's components, no key twice, with a
validity mask), so a step never reads the rest of the cache. ``mode="dense"`` is the
comparison: every step reads the whole cache under the pattern's mask, O(S).

A prompt is run through the model's parallel forward pass once (the normal attention
entry point) to fill the cache; then a jitted ``lax`` loop runs the steps in chunks,
returning to Python between chunks so callers can show progress.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_lm.attention import Component, HeadPattern, LayerPattern
from sparse_lm.model import Transformer

MODES = ("sparse", "dense")
Cache = list[tuple[jax.Array, jax.Array]]  # per layer: keys [B, S, H, Dqk], values [B, S, H, Dv]


# -- which cache positions a step reads ----------------------------------------------


def _component_candidates(comp: Component, t: jax.Array, cache_len: int) -> jax.Array:
    """Positions ``comp`` may allow for query t: a static-size superset, O(l + S/l).

    Entries outside [0, t] or not allowed are filtered by the caller's mask.
    """
    if comp.kind == "causal":
        return jnp.arange(cache_len)
    if comp.kind == "local":
        return t - comp.l + jnp.arange(comp.l + 1)
    if comp.kind == "stride":
        return t % comp.l + comp.l * jnp.arange(math.ceil(cache_len / comp.l))
    if comp.kind == "block":
        return (t // comp.l) * comp.l + jnp.arange(comp.l)
    if comp.kind == "summary":
        blocks = comp.l * jnp.arange(math.ceil(cache_len / comp.l))
        first = comp.l - comp.c - comp.offset
        return (blocks[:, None] + first + jnp.arange(comp.c)[None, :]).reshape(-1)
    raise ValueError(f"unknown component kind {comp.kind!r}")


def head_gather_indices(head: HeadPattern, t: jax.Array, cache_len: int) -> tuple[jax.Array, jax.Array]:
    """(indices, valid) for one head at query position t (a traced scalar).

    Indices are clipped into the cache so that every gather is in bounds; ``valid``
    marks the positions the head reads. A position allowed by several components is
    valid only in the first one that allows it, so the softmax counts it once.
    """
    idx_parts, valid_parts = [], []
    for n, comp in enumerate(head):
        j = _component_candidates(comp, t, cache_len)
        valid = (j >= 0) & (j <= t) & (j < cache_len) & comp.allowed(t, j)
        for earlier in head[:n]:
            valid = valid & ~earlier.allowed(t, j)
        idx_parts.append(jnp.clip(j, 0, cache_len - 1))
        valid_parts.append(valid)
    return jnp.concatenate(idx_parts), jnp.concatenate(valid_parts)


def gather_indices(pattern: LayerPattern, t: jax.Array, cache_len: int) -> tuple[jax.Array, jax.Array]:
    """(indices [H, K], valid [H, K]) for a layer; heads are padded to the largest K."""
    per_head = [head_gather_indices(h, t, cache_len) for h in pattern]
    size = max(i.shape[0] for i, _ in per_head)
    idx = jnp.stack([jnp.pad(i, (0, size - i.shape[0])) for i, _ in per_head])
    valid = jnp.stack([jnp.pad(v, (0, size - v.shape[0])) for _, v in per_head])
    return idx, valid


def gather_size(pattern: LayerPattern, cache_len: int) -> int:
    """How many cache positions per head a sparse step of this layer reads."""
    return int(gather_indices(pattern, jnp.int32(0), cache_len)[0].shape[1])


def dense_mask(pattern: LayerPattern, t: jax.Array, cache_len: int) -> jax.Array:
    """[H, S] row t of each head's mask: the dense decoder reads everything, masked."""
    j = jnp.arange(cache_len)
    rows = []
    for head in pattern:
        row = jnp.zeros((cache_len,), bool)
        for comp in head:
            row = row | comp.allowed(t, j)
        rows.append(row & (j <= t))
    return jnp.stack(rows)


# -- one decoding step -----------------------------------------------------------------


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, spec: str) -> jax.Array:
    """Softmax attention of single queries q [B, H, Dq] over gathered keys/values.

    Mirrors the reference attention's numerics (float32 scores and softmax, values
    in the compute dtype, zeros for an empty allowed set) so cached decoding matches
    the parallel pass. ``spec`` names the key axis layout: "bhkd" (gathered) or
    "bkhd" (the whole cache).
    """
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    scores = jnp.einsum(f"bhd,{spec}->bhk", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(valid, scores * q.shape[-1] ** -0.5, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(scores - row_max)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = (weights / jnp.where(denom > 0, denom, 1.0)).astype(v.dtype)
    out = jnp.einsum(f"bhk,{spec}->bhd", probs, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def decode_step(
    model: Transformer, cache: Cache, prev_tokens: jax.Array, t: jax.Array, mode: str = "sparse"
) -> tuple[jax.Array, Cache]:
    """Logits [B, V] at position t given the byte before it, and the updated cache.

    The cache must hold positions < t; position t's keys and values are written here.
    """
    cache_len = cache[0][0].shape[1]
    positions = jnp.broadcast_to(t, prev_tokens.shape)
    h = model.embed_inputs(prev_tokens, positions)
    heads = jnp.arange(model.num_heads)[:, None]
    reads: dict[LayerPattern, tuple[jax.Array, jax.Array]] = {}  # shared by equal layers
    new_cache = []
    # Layer by layer in either parameter layout: a scanned model yields each layer's
    # slice of its stacked parameters. The per-layer caches are updated in place this
    # way, where a scan over a stacked cache would carry (and risk copying) all of it.
    for block, (ck, cv) in zip(model.layer_blocks(), cache, strict=True):
        q, k, v = block.qkv(h)
        ck = jax.lax.dynamic_update_slice(ck, k[:, None].astype(ck.dtype), (0, t, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v[:, None].astype(cv.dtype), (0, t, 0, 0))
        new_cache.append((ck, cv))
        if mode == "sparse":
            if block.pattern not in reads:
                reads[block.pattern] = gather_indices(block.pattern, t, cache_len)
            idx, valid = reads[block.pattern]
            # Advanced indexing: head h reads rows idx[h] of its own column -> [B, H, K, D].
            o = _attend(q, ck[:, idx, heads], cv[:, idx, heads], valid, "bhkd")
        elif mode == "dense":
            if block.pattern not in reads:
                reads[block.pattern] = (None, dense_mask(block.pattern, t, cache_len))
            o = _attend(q, ck, cv, reads[block.pattern][1], "bkhd")
        else:
            raise ValueError(f"unknown decode mode {mode!r}; choose one of {MODES}")
        h = block.finish(h, o, None)
    return model.logits(h), new_cache


# A multiple of every kernel's tile rows: the GPU kernel's 64 (128 for its Mosaic
# forward) and the TPU kernel's 128 lanes; see prefill_length.
PREFILL_MULTIPLE = 128


def prefill_length(model: Transformer, prompt_len: int) -> int:
    """Length of the parallel pass that processes a prompt of ``prompt_len`` bytes.

    Block-sparse kernels take lengths that are multiples of their tiles and of the
    pattern's stride (the training length always is), so the prompt is padded up to
    such a length, capped at the context. Padding at the end cannot change the
    prompt's own keys and values: attention is causal.
    """
    multiple = PREFILL_MULTIPLE
    if model.spec.name != "dense":
        multiple = math.lcm(multiple, model.spec.stride)
    return min(-(-prompt_len // multiple) * multiple, model.seq_len)


def prefill(model: Transformer, cache: Cache, prompt: jax.Array) -> tuple[jax.Array, Cache]:
    """One parallel forward pass over prompt [B, P]: its logits [B, P, V], and the
    cache with positions [0, P) written (and nothing else)."""
    p = prompt.shape[1]
    padded = jnp.pad(prompt, ((0, 0), (0, prefill_length(model, p) - p)))
    logits, kvs = model.forward_with_kv(padded)
    new_cache = [
        (
            jax.lax.dynamic_update_slice(ck, k[:, :p].astype(ck.dtype), (0, 0, 0, 0)),
            jax.lax.dynamic_update_slice(cv, v[:, :p].astype(cv.dtype), (0, 0, 0, 0)),
        )
        for (ck, cv), (k, v) in zip(cache, kvs)
    ]
    return logits[:, :p], new_cache


def init_cache(model: Transformer, batch_size: int, cache_len: int, dtype: jnp.dtype = jnp.bfloat16) -> Cache:
    """Zeroed per-layer caches: keys [B, S, H, Dqk], values [B, S, H, Dv]."""
    H = model.num_heads
    return [
        (
            jnp.zeros((batch_size, cache_len, H, model.qk_dim), dtype),
            jnp.zeros((batch_size, cache_len, H, model.head_dim), dtype),
        )
        for _ in range(model.num_layers)
    ]


# -- sampling -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a step turns logits into a byte. temperature 0 means greedy (argmax)."""

    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter

    def validate(self, vocab_size: int) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 means greedy).")
        if not 0 <= self.top_k <= vocab_size:
            raise ValueError(f"top_k={self.top_k} must be in [0, {vocab_size}] (0 disables it).")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 disables it).")


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """Temperature, then top-k, then top-p: logits [B, V] with removed tokens at -inf."""
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token while the mass before it is below top_p: the smallest set
        # reaching top_p, never empty (the most likely token always stays).
        keep = (jnp.cumsum(probs, axis=-1) - probs) < sampling.top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample_logits(key: jax.Array, logits: jax.Array, sampling: Sampling) -> jax.Array:
    """int32 [B] bytes drawn from logits [B, V]."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)


# -- the jitted loop -------------------------------------------------------------------


class DecodeState(NamedTuple):
    """Everything a chunk of steps carries: bytes so far, the cache, the next position."""

    tokens: jax.Array  # int32 [B, S]; positions < t are final
    cache: Cache
    t: jax.Array  # int32 scalar


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "mode"), donate_argnames=("state",))
def _run_steps(graphdef, params, state: DecodeState, stop, key, *, sampling: Sampling, mode: str) -> DecodeState:
    model = nnx.merge(graphdef, params)

    def body(t, carry):
        tokens, cache = carry
        prev = tokens[:, jnp.maximum(t - 1, 0)]  # ignored at t = 0 (start vector)
        logits, cache = decode_step(model, cache, prev, t, mode)
        # The key depends on the position only, so results do not depend on chunking.
        new = sample_logits(jax.random.fold_in(key, t), logits, sampling)
        return tokens.at[:, t].set(new), cache

    tokens, cache = jax.lax.fori_loop(state.t, stop, body, (state.tokens, state.cache))
    return DecodeState(tokens, cache, jnp.maximum(state.t, stop).astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _prefill(graphdef, params, cache: Cache, prompt: jax.Array) -> Cache:
    return prefill(nnx.merge(graphdef, params), cache, prompt)[1]


class Decoder:
    """Incremental decoding of one model at one batch size and length.

    The compiled step loop is shared by every chunk, so a caller can time chunks
    (the benchmark) or show progress (``generate``).
    """

    def __init__(
        self,
        model: Transformer,
        *,
        batch_size: int,
        length: int,
        sampling: Sampling = Sampling(),
        cache_dtype: jnp.dtype = jnp.bfloat16,
        mode: str = "sparse",
        mesh: jax.sharding.Mesh | None = None,
    ):
        if mesh is not None:
            from sparse_lm.sharding import data_parallel_size

            if batch_size % data_parallel_size(mesh):
                raise ValueError(
                    f"batch_size={batch_size} must be a multiple of the mesh's "
                    f"{data_parallel_size(mesh)} data-parallel devices to decode sharded."
                )
        self.mesh = mesh
        if length > model.seq_len:
            raise ValueError(
                f"requested length {length} exceeds the model's context of {model.seq_len} "
                "positions; sample at most that many bytes (prompt included)."
            )
        if length < 1 or batch_size < 1:
            raise ValueError(f"length ({length}) and batch_size ({batch_size}) must be positive.")
        if mode not in MODES:
            raise ValueError(f"unknown decode mode {mode!r}; choose one of {MODES}")
        sampling.validate(model.vocab_size)
        self.model, self.batch_size, self.length = model, batch_size, length
        self.sampling, self.cache_dtype, self.mode = sampling, jnp.dtype(cache_dtype), mode
        self.graphdef, self.params = nnx.split(model)

    def init(self, prompt: np.ndarray | jax.Array | None = None) -> DecodeState:
        """A state with the prompt [B, P] in place and its keys/values in the cache."""
        tokens = jnp.zeros((self.batch_size, self.length), jnp.int32)
        cache = init_cache(self.model, self.batch_size, self.length, self.cache_dtype)
        if self.mesh is not None:
            # Samples are independent: split the batch (tokens, cache, prompt) over the
            # data-parallel axes like training batches; the jitted loop keeps that layout.
            from sparse_lm.sharding import batch_sharding

            rows = batch_sharding(self.mesh)
            tokens, cache = jax.device_put((tokens, cache), rows)
            if prompt is not None:
                prompt = jax.device_put(jnp.asarray(prompt, jnp.int32), rows)
        p = 0
        if prompt is not None:
            prompt = jnp.asarray(prompt, jnp.int32)
            if prompt.ndim != 2 or prompt.shape[0] != self.batch_size:
                raise ValueError(f"prompt must be int32 [batch_size={self.batch_size}, P], got {prompt.shape}")
            p = prompt.shape[1]
            if p > self.length:
                raise ValueError(f"prompt of {p} bytes is longer than the requested length {self.length}.")
            if p:
                tokens = tokens.at[:, :p].set(prompt)
                cache = _prefill(self.graphdef, self.params, cache, prompt)
        return DecodeState(tokens, cache, jnp.int32(p))

    def run(self, state: DecodeState, stop: int, seed: int = 0) -> DecodeState:
        """Decode positions [state.t, stop) in one jitted loop; ``state`` is consumed."""
        stop = min(int(stop), self.length)
        return _run_steps(
            self.graphdef, self.params, state, jnp.int32(stop), jax.random.key(seed),
            sampling=self.sampling, mode=self.mode,
        )


def generate(
    model: Transformer,
    *,
    batch_size: int,
    length: int,
    prompt: np.ndarray | jax.Array | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    chunk_size: int = 256,
    on_chunk: Callable[[int, int], None] | None = None,
    cache_dtype: jnp.dtype = jnp.bfloat16,
    mode: str = "sparse",
    mesh: jax.sharding.Mesh | None = None,
) -> np.ndarray:
    """Sample ``batch_size`` sequences of ``length`` bytes (prompt included) -> int32 [B, length].

    ``prompt`` (int32 [B, P]) is copied verbatim to the start of every output row and
    fills the cache in one parallel pass. ``on_chunk(done, length)`` is called after
    each chunk of ``chunk_size`` steps with the number of positions done so far.
    With ``mesh``, samples are split over its data-parallel axes.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be positive.")
    sampling = Sampling(float(temperature), int(top_k), float(top_p))
    decoder = Decoder(
        model, batch_size=batch_size, length=length, sampling=sampling, cache_dtype=cache_dtype,
        mode=mode, mesh=mesh,
    )
    state = decoder.init(prompt)
    done = int(state.t)
    if on_chunk is not None:
        on_chunk(done, length)
    while done < length:
        done = min(done + chunk_size, length)
        state = decoder.run(state, done, seed)
        state.tokens.block_until_ready()
        if on_chunk is not None:
            on_chunk(done, length)
    tokens = state.tokens
    if not tokens.is_fully_addressable:
        # Sharded over several hosts: every host gets all samples (rows are few and small).
        from jax.experimental import multihost_utils

        tokens = multihost_utils.process_allgather(tokens, tiled=True)
    return np.asarray(tokens, dtype=np.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len", "mode"))
def _teacher_forced(graphdef, params, cache: Cache, tokens: jax.Array, *, prompt_len: int, mode: str) -> jax.Array:
    model = nnx.merge(graphdef, params)
    B, S = tokens.shape
    logits = jnp.zeros((B, S, model.vocab_size), jnp.float32)
    if prompt_len:
        prompt_logits, cache = prefill(model, cache, tokens[:, :prompt_len])
        logits = logits.at[:, :prompt_len].set(prompt_logits)

    def body(t, carry):
        logits, cache = carry
        step_logits, cache = decode_step(model, cache, tokens[:, jnp.maximum(t - 1, 0)], t, mode)
        return logits.at[:, t].set(step_logits), cache

    return jax.lax.fori_loop(prompt_len, S, body, (logits, cache))[0]


def teacher_forced_logits(
    model: Transformer,
    tokens: np.ndarray | jax.Array,
    *,
    prompt_len: int = 0,
    cache_dtype: jnp.dtype = jnp.float32,
    mode: str = "sparse",
) -> jax.Array:
    """Logits [B, S, V] of ``tokens`` [B, S] computed as decoding does: a prefill of
    the first ``prompt_len`` bytes, then one cached step per position.

    Equals ``model(tokens)`` up to rounding; the tests hold decoding to that.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.shape[1] > model.seq_len:
        raise ValueError(f"{tokens.shape[1]} tokens exceed the model's context of {model.seq_len}.")
    graphdef, params = nnx.split(model)
    cache = init_cache(model, tokens.shape[0], tokens.shape[1], cache_dtype)
    return _teacher_forced(graphdef, params, cache, tokens, prompt_len=int(prompt_len), mode=mode)
