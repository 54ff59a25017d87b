"""Incremental decoding with the sparse cache, sampling, the output writers and the benchmark."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import soundfile
from flax import nnx
from PIL import Image

from sparse_lm import decode, outputs
from sparse_lm.attention import PatternSpec, allowed_keys
from sparse_lm.model import build_model

SEQ_LEN = 32
ROOT = Path(__file__).resolve().parents[1]


def tiny_config(pattern: str = "strided", combine: str = "merged", distinct: bool = False) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.model = dict(
        vocab_size=256, num_layers=2, d_model=32, num_heads=4, ff_ratio=2.0, qk_ratio=0.5, dropout=0.1,
        pos_shape=(SEQ_LEN // 8, 8), dtype="float32", param_dtype="float32", remat="none",
    )
    cfg.attention = dict(
        pattern=pattern, stride=8, summary=2, combine=combine, distinct_summaries=distinct, impl="reference"
    )
    cfg.data = dict(seq_len=SEQ_LEN)
    return cfg


def tiny_model(*args, seed: int = 0) -> nnx.Module:
    return build_model(tiny_config(*args), nnx.Rngs(seed))


def random_tokens(batch: int = 2, length: int = SEQ_LEN, seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, 256, dtype=jnp.int32)


# Every pattern and combine mode (fixed also with distinct summary sub-blocks per head).
ALL_PATTERNS = [
    ("dense", "merged", False),
    ("local", "merged", False),
    ("strided", "merged", False),
    ("strided", "interleaved", False),
    ("strided", "multihead", False),
    ("fixed", "merged", False),
    ("fixed", "interleaved", False),
    ("fixed", "multihead", False),
    ("fixed", "merged", True),
    ("fixed", "multihead", True),
]


@pytest.mark.parametrize("pattern,combine,distinct", ALL_PATTERNS)
def test_cached_steps_give_the_logits_of_one_full_forward_pass(pattern, combine, distinct):
    model = tiny_model(pattern, combine, distinct)
    tokens = random_tokens()
    full = model(tokens)
    # 13 prompt positions through the parallel pass, the other 19 one step at a time.
    stepped = decode.teacher_forced_logits(model, tokens, prompt_len=13, cache_dtype=jnp.float32)
    np.testing.assert_allclose(stepped, full, atol=2e-5, rtol=0)


@pytest.mark.parametrize("pattern,combine,distinct", [ALL_PATTERNS[3], ALL_PATTERNS[8]])
def test_steps_from_position_zero_and_the_dense_cache_decoder_also_match(pattern, combine, distinct):
    model = tiny_model(pattern, combine, distinct)
    tokens = random_tokens(seed=1)
    full = model(tokens)
    np.testing.assert_allclose(decode.teacher_forced_logits(model, tokens), full, atol=2e-5, rtol=0)
    dense = decode.teacher_forced_logits(model, tokens, prompt_len=5, mode="dense")
    np.testing.assert_allclose(dense, full, atol=2e-5, rtol=0)


def test_a_bfloat16_residual_stream_decodes_like_its_full_forward_pass():
    cfg = tiny_config("fixed", "merged")
    cfg.model.residual_dtype = "bfloat16"
    model = build_model(cfg, nnx.Rngs(0))
    tokens = random_tokens(seed=2)
    full = model(tokens)
    stepped = decode.teacher_forced_logits(model, tokens, prompt_len=13, cache_dtype=jnp.float32)
    # The same roundings in the same places; what differs is float32 summation order,
    # which can flip a bfloat16 rounding now and then (measured: max 9e-4, mean 4e-6;
    # a float32 stream differs from this model's by max 2e-2, mean 3e-3).
    np.testing.assert_allclose(stepped, full, atol=5e-3, rtol=0)
    assert float(jnp.abs(stepped - full).mean()) < 1e-4


def test_bfloat16_cache_stays_close_to_the_full_pass():
    model = tiny_model("fixed", "merged")
    tokens = random_tokens()
    stepped = decode.teacher_forced_logits(model, tokens, prompt_len=4, cache_dtype=jnp.bfloat16)
    np.testing.assert_allclose(stepped, model(tokens), atol=0.05, rtol=0)


@pytest.mark.parametrize(
    "spec",
    [
        PatternSpec("dense"),
        PatternSpec("local", stride=5),
        PatternSpec("strided", stride=8, combine="merged"),
        PatternSpec("strided", stride=8, combine="multihead"),
        PatternSpec("fixed", stride=8, summary=3, combine="merged"),
        PatternSpec("fixed", stride=8, summary=2, combine="interleaved", distinct_summaries=True),
    ],
)
def test_a_step_reads_exactly_the_allowed_positions_each_once(spec):
    cache_len = 64
    for layer in (0, 1):
        pattern = spec.layer_pattern(layer, 4)
        for t in (0, 1, 7, 8, 9, 30, 63):
            idx, valid = decode.gather_indices(pattern, jnp.int32(t), cache_len)
            for h, head in enumerate(pattern):
                read = np.asarray(idx[h])[np.asarray(valid[h])]
                assert len(read) == len(set(read.tolist())), "a key read twice"
                np.testing.assert_array_equal(np.sort(read), allowed_keys(head, t))


def test_sparse_steps_read_order_l_plus_t_over_l_positions():
    # strided, l = 16, cache 1024: window l + 1 plus one column entry per row of l.
    strided = PatternSpec("strided", stride=16, combine="merged").layer_pattern(0, 2)
    assert decode.gather_size(strided, 1024) == 17 + 1024 // 16
    fixed = PatternSpec("fixed", stride=16, summary=2, combine="merged").layer_pattern(0, 2)
    assert decode.gather_size(fixed, 1024) == 16 + 2 * 1024 // 16
    assert decode.gather_size(PatternSpec("dense").layer_pattern(0, 2), 1024) == 1024


def test_greedy_is_deterministic_and_follows_the_models_argmax():
    model = tiny_model("fixed", "merged")
    kw = dict(batch_size=2, length=SEQ_LEN, temperature=0.0, cache_dtype=jnp.float32)
    a = decode.generate(model, seed=0, **kw)
    b = decode.generate(model, seed=0, chunk_size=7, **kw)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int32 and a.shape == (2, SEQ_LEN)
    # Each greedy byte is the argmax of the full forward pass over the output.
    np.testing.assert_array_equal(a, np.asarray(jnp.argmax(model(jnp.asarray(a)), -1)))


def test_sampling_is_reproducible_by_seed_and_independent_of_chunking():
    model = tiny_model("strided", "interleaved")
    progress = []
    kw = dict(batch_size=3, length=SEQ_LEN, temperature=1.0, top_k=50, top_p=0.95)
    a = decode.generate(model, seed=1, chunk_size=10, on_chunk=lambda d, n: progress.append((d, n)), **kw)
    b = decode.generate(model, seed=1, chunk_size=SEQ_LEN, **kw)
    c = decode.generate(model, seed=2, **kw)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert len({tuple(r) for r in a.tolist()}) == 3, "rows of a batch should differ"
    assert progress == [(0, SEQ_LEN), (10, SEQ_LEN), (20, SEQ_LEN), (30, SEQ_LEN), (32, SEQ_LEN)]


def test_a_prompt_is_reproduced_verbatim_at_the_start():
    model = tiny_model("fixed", "interleaved")
    prompt = np.array([list(b"Hello, wor"), list(b"Sparse Tra")], dtype=np.int32)
    out = decode.generate(
        model, batch_size=2, length=24, prompt=prompt, temperature=0.0, cache_dtype=jnp.float32, chunk_size=5
    )
    assert out.shape == (2, 24)
    np.testing.assert_array_equal(out[:, :10], prompt)
    # The continuation is conditioned on the prompt: each byte is the full pass's argmax.
    np.testing.assert_array_equal(out[:, 10:], np.asarray(jnp.argmax(model(jnp.asarray(out)), -1))[:, 10:])


def test_requests_that_cannot_be_served_fail_clearly():
    model = tiny_model()
    with pytest.raises(ValueError, match="exceeds the model's context of 32"):
        decode.generate(model, batch_size=1, length=SEQ_LEN + 1)
    with pytest.raises(ValueError, match="longer than the requested length"):
        decode.generate(model, batch_size=1, length=8, prompt=np.zeros((1, 9), np.int32))
    with pytest.raises(ValueError, match="batch_size"):
        decode.generate(model, batch_size=2, length=8, prompt=np.zeros((1, 4), np.int32))
    with pytest.raises(ValueError, match="top_p"):
        decode.generate(model, batch_size=1, length=8, top_p=0.0)


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]]))
    finite = lambda s: np.isfinite(np.asarray(decode.filter_logits(logits, s)))[0].tolist()  # noqa: E731
    assert finite(decode.Sampling(1.0, top_k=2)) == [True, True, False, False]
    # Nucleus: the smallest set whose mass reaches p (0.4 + 0.3 >= 0.5).
    assert finite(decode.Sampling(1.0, top_p=0.5)) == [True, True, False, False]
    assert finite(decode.Sampling(1.0, top_p=0.75)) == [True, True, True, False]
    assert finite(decode.Sampling(1.0, top_p=0.1)) == [True, False, False, False]
    assert finite(decode.Sampling(1.0)) == [True] * 4
    draws = decode.sample_logits(
        jax.random.key(0), jnp.tile(logits, (2000, 1)), decode.Sampling(1.0, top_k=2)
    )
    counts = np.bincount(np.asarray(draws), minlength=4)
    assert counts[2:].sum() == 0 and abs(counts[0] / 2000 - 0.4 / 0.7) < 0.05


def test_write_text_keeps_the_raw_bytes(tmp_path):
    data = np.array([list(b"<page>caf\xc3\xa9</page>"), list(b"\xff\x00abc" + b" " * 13)])
    paths = outputs.write_text(data, tmp_path)
    assert [p.suffix for p in paths] == [".txt", ".txt"]
    assert paths[0].read_bytes() == b"<page>caf\xc3\xa9</page>"
    assert paths[1].read_bytes()[:2] == b"\xff\x00"


def test_png_grid_is_a_valid_image_of_the_right_size(tmp_path):
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (5, 3072))
    path = outputs.write_png_grid(samples, tmp_path / "grid.png")
    img = np.asarray(Image.open(path))
    assert img.shape == (2 * 34 + 2, 3 * 34 + 2, 3)  # 3 columns x 2 rows, 2-pixel gaps
    np.testing.assert_array_equal(img[2:34, 2:34], samples[0].reshape(32, 32, 3))


def test_png_grid_with_a_prompt_shows_the_prompt_then_its_completions(tmp_path):
    rng = np.random.default_rng(1)
    prompts = rng.integers(0, 256, (2, 16 * 96))
    completions = rng.integers(0, 256, (6, 16 * 96))
    samples = np.concatenate([np.repeat(prompts, 3, axis=0), completions], axis=1)  # 3 per prompt
    path = outputs.write_png_grid(samples, tmp_path / "cond.png", prompt_rows=16, scale=2)
    img = np.asarray(Image.open(path))
    assert img.shape == (2 * (2 * 34 + 2), 2 * (4 * 34 + 2), 3)  # 2 prompts x (prompt + 3 samples)
    img = img[::2, ::2]
    first = prompts[0].reshape(16, 32, 3)
    np.testing.assert_array_equal(img[2:18, 2:34], first)  # the prompt alone ...
    assert (img[18:34, 2:34] == 128).all()  # ... over a grey lower half
    np.testing.assert_array_equal(img[2:34, 36:68], samples[0].reshape(32, 32, 3))
    np.testing.assert_array_equal(img[36:52, 2:34], prompts[1].reshape(16, 32, 3))


def test_wav_decodes_mu_law_at_the_sample_rate(tmp_path):
    rate = 12000
    t = np.arange(rate // 10) / rate
    wave = 0.5 * np.sin(2 * np.pi * 440 * t)
    mu = 255
    codes = np.round((np.sign(wave) * np.log1p(mu * np.abs(wave)) / np.log1p(mu) + 1) / 2 * mu).astype(np.int64)
    paths = outputs.write_wav(np.stack([codes, codes[::-1]]), tmp_path, sample_rate=rate)
    assert len(paths) == 2 and paths[0].suffix == ".wav"
    audio, sr = soundfile.read(paths[0])
    info = soundfile.info(paths[0])
    assert sr == rate and info.subtype == "PCM_16" and info.channels == 1 and len(audio) == len(codes)
    assert np.abs(audio - wave).max() < 0.02  # mu-law quantisation error at |x| <= 0.5


def test_bench_sample_smoke_runs_and_writes_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_sample", ROOT / "scripts" / "bench_sample.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--smoke", "--out", str(out), "--lengths", "64", "128", "--chunk", "48"])
    result = json.loads(out.read_text())
    rows = {(r["mode"], r["length"]) for r in result["results"]}
    assert rows == {("sparse", 64), ("dense", 64), ("sparse", 128), ("dense", 128)}
    assert all(r["tokens_per_s"] > 0 and r["steps_timed"] == r["length"] for r in result["results"])
    sparse = next(r for r in result["results"] if r["mode"] == "sparse" and r["length"] == 128)
    assert sparse["keys_read_per_head"] == 17 + 128 // 16
    assert set(result["speedup_tokens_per_s"]) == {"64", "128"}
    assert "sparse / dense tokens/s at 128" in capsys.readouterr().out.strip().splitlines()[-1]


def test_prompts_are_padded_to_lengths_a_block_sparse_kernel_takes():
    cfg = tiny_config("strided")
    cfg.model.update(num_layers=1, pos_shape=(8, 96))
    cfg.data.seq_len = 768
    cfg.attention.stride = 96
    model = build_model(cfg, nnx.Rngs(0))
    # Multiples of lcm(128, l = 96) = 384, never past the context.
    assert [decode.prefill_length(model, p) for p in (1, 10, 384, 385, 700)] == [384, 384, 384, 768, 768]


def test_a_short_prompt_prefills_through_the_tpu_kernel():
    """The TPU kernel takes lengths that are multiples of 128 (its lanes): a 10-byte
    prompt with l = 16 is padded to 128, not 64, and decoding matches the full pass."""
    cfg = tiny_config("strided")
    cfg.model.update(num_layers=1, pos_shape=(16, 16))
    cfg.data.seq_len = 256
    cfg.attention.update(stride=16, impl="pallas_tpu")
    model = build_model(cfg, nnx.Rngs(0))
    assert decode.prefill_length(model, 10) == 128
    tokens = random_tokens(length=256)[:, :140]
    stepped = decode.teacher_forced_logits(model, tokens, prompt_len=10, cache_dtype=jnp.float32)
    full = model(random_tokens(length=256))[:, :140]
    np.testing.assert_allclose(stepped, full, atol=2e-5, rtol=0)


@pytest.mark.parametrize("pattern,combine,distinct", [ALL_PATTERNS[3], ALL_PATTERNS[8]])
def test_a_scanned_layers_model_decodes_like_its_full_forward_pass(pattern, combine, distinct):
    cfg = tiny_config(pattern, combine, distinct)
    cfg.model.update(num_layers=4, scan_layers=True)
    model = build_model(cfg, nnx.Rngs(3))
    assert not hasattr(model, "blocks")  # the decoder must read the stacked parameters
    tokens = random_tokens(seed=2)
    full = model(tokens)
    for prompt_len in (0, 13):  # all steps, and a prefill through the scanned parallel pass
        stepped = decode.teacher_forced_logits(model, tokens, prompt_len=prompt_len, cache_dtype=jnp.float32)
        np.testing.assert_allclose(stepped, full, atol=2e-5, rtol=0)
    # Sampling goes through the same step: greedy bytes are the full pass's argmax.
    out = decode.generate(model, batch_size=2, length=SEQ_LEN, prompt=tokens[:, :5], temperature=0.0,
                          cache_dtype=jnp.float32)
    np.testing.assert_array_equal(out[:, :5], tokens[:, :5])
    np.testing.assert_array_equal(out[:, 5:], np.asarray(jnp.argmax(model(jnp.asarray(out)), -1))[:, 5:])
