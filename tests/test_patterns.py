"""Attention patterns and the reference attention, specified against Child et al. (2019).

Every expected mask in this file is written out by hand, one row per query position
(row i, column j: 1 where query i may attend to key j), so that a mistake in the
formulas of ``sparse_lm.attention.patterns`` cannot also hide in the expectation.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `configs` is a top-level folder, not a package on the path.
    sys.path.insert(0, str(REPO_ROOT))

from configs.quickstart import get_config  # noqa: E402
from sparse_lm import config as config_lib  # noqa: E402
from sparse_lm.attention import (  # noqa: E402
    COMBINES,
    PATTERNS,
    Component,
    PatternError,
    PatternSpec,
    allowed_keys,
    allowed_pairs,
    attention,
    auto_impl_for,
    head_mask,
    is_dense,
    layer_masks,
    masked_attention,
    reference_attention,
    resolve_impl,
)


def literal(*rows: str) -> np.ndarray:
    """A boolean matrix from rows written as strings of 0/1 (spaces ignored)."""
    return np.array([[ch == "1" for ch in row.replace(" ", "")] for row in rows], dtype=bool)


def assert_mask_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == bool
    assert actual.shape == expected.shape
    if not np.array_equal(actual, expected):
        diff = "\n".join(
            f"  row {i}: got {''.join('1' if x else '0' for x in a)}, "
            f"want {''.join('1' if x else '0' for x in e)}"
            for i, (a, e) in enumerate(zip(actual, expected))
            if not np.array_equal(a, e)
        )
        pytest.fail("masks differ:\n" + diff)


# --------------------------------------------------------------------------------------
# Hand-worked masks.
# --------------------------------------------------------------------------------------

CAUSAL_T4 = literal(
    "1000",
    "1100",
    "1110",
    "1111",
)

# Strided, T=8, l=3. A1(i) = {max(0, i-3) .. i}: a window of the last l+1 positions.
STRIDED_A1 = literal(
    "10000000",
    "11000000",
    "11100000",
    "11110000",
    "01111000",
    "00111100",
    "00011110",
    "00001111",
)
# A2(i) = {j <= i : (i - j) mod 3 == 0}: every third position back from i.
STRIDED_A2 = literal(
    "10000000",
    "01000000",
    "00100000",
    "10010000",
    "01001000",
    "00100100",
    "10010010",
    "01001001",
)
# Merged: A1 U A2.
STRIDED_MERGED = literal(
    "10000000",
    "11000000",
    "11100000",
    "11110000",
    "01111000",
    "00111100",
    "10011110",
    "01001111",
)

# Fixed, T=8, l=4. A1(i) = {j <= i : floor(j/4) == floor(i/4)}: causal within the block.
FIXED_A1 = literal(
    "10000000",
    "11000000",
    "11100000",
    "11110000",
    "00001000",
    "00001100",
    "00001110",
    "00001111",
)
# c=1: A2(i) = {j <= i : j mod 4 == 3}: the last position of every block so far.
FIXED_A2_C1 = literal(
    "00000000",
    "00000000",
    "00000000",
    "00010000",
    "00010000",
    "00010000",
    "00010000",
    "00010001",
)
# c=2: A2(i) = {j <= i : j mod 4 in {2, 3}}.
FIXED_A2_C2 = literal(
    "00000000",
    "00000000",
    "00100000",
    "00110000",
    "00110000",
    "00110000",
    "00110010",
    "00110011",
)
# Merged, c=1: A1 U A2.
FIXED_MERGED_C1 = literal(
    "10000000",
    "11000000",
    "11100000",
    "11110000",
    "00011000",
    "00011100",
    "00011110",
    "00011111",
)

# Fixed with distinct summaries, 4 heads, l=8, c=2, T=16: l // c = 4 sub-blocks; head h reads
# sub-block h counted from the end of each block. Head 0: j mod 8 in {6,7}; head 1: {4,5};
# head 2: {2,3}; head 3: {0,1}.
DISTINCT_A2 = [
    literal(  # head 0: columns 6, 7, 14, 15
        "0000000000000000",
        "0000000000000000",
        "0000000000000000",
        "0000000000000000",
        "0000000000000000",
        "0000000000000000",
        "0000001000000000",
        "0000001100000000",
        "0000001100000000",
        "0000001100000000",
        "0000001100000000",
        "0000001100000000",
        "0000001100000000",
        "0000001100000000",
        "0000001100000010",
        "0000001100000011",
    ),
    literal(  # head 1: columns 4, 5, 12, 13
        "0000000000000000",
        "0000000000000000",
        "0000000000000000",
        "0000000000000000",
        "0000100000000000",
        "0000110000000000",
        "0000110000000000",
        "0000110000000000",
        "0000110000000000",
        "0000110000000000",
        "0000110000000000",
        "0000110000000000",
        "0000110000001000",
        "0000110000001100",
        "0000110000001100",
        "0000110000001100",
    ),
    literal(  # head 2: columns 2, 3, 10, 11
        "0000000000000000",
        "0000000000000000",
        "0010000000000000",
        "0011000000000000",
        "0011000000000000",
        "0011000000000000",
        "0011000000000000",
        "0011000000000000",
        "0011000000000000",
        "0011000000000000",
        "0011000000100000",
        "0011000000110000",
        "0011000000110000",
        "0011000000110000",
        "0011000000110000",
        "0011000000110000",
    ),
    literal(  # head 3: columns 0, 1, 8, 9
        "1000000000000000",
        "1100000000000000",
        "1100000000000000",
        "1100000000000000",
        "1100000000000000",
        "1100000000000000",
        "1100000000000000",
        "1100000000000000",
        "1100000010000000",
        "1100000011000000",
        "1100000011000000",
        "1100000011000000",
        "1100000011000000",
        "1100000011000000",
        "1100000011000000",
        "1100000011000000",
    ),
]


def test_dense_is_the_causal_lower_triangle():
    assert_mask_equal(head_mask((Component("causal"),), 4), CAUSAL_T4)
    (head,) = PatternSpec("dense").layer_pattern(0, 1)
    assert_mask_equal(head_mask(head, 4), CAUSAL_T4)


def test_strided_a1_is_a_window_of_the_previous_l_positions_and_itself():
    assert_mask_equal(head_mask((Component("local", 3),), 8), STRIDED_A1)
    a1, _ = PatternSpec("strided", stride=3).components()
    assert_mask_equal(head_mask(a1, 8), STRIDED_A1)


def test_strided_a2_is_every_lth_position_back():
    assert_mask_equal(head_mask((Component("stride", 3),), 8), STRIDED_A2)
    _, a2 = PatternSpec("strided", stride=3).components()
    assert_mask_equal(head_mask(a2, 8), STRIDED_A2)


def test_local_pattern_is_strided_a1():
    (head,) = PatternSpec("local", stride=3).layer_pattern(0, 1)
    assert_mask_equal(head_mask(head, 8), STRIDED_A1)


def test_fixed_a1_is_causal_within_each_block():
    assert_mask_equal(head_mask((Component("block", 4),), 8), FIXED_A1)
    for c in (1, 2):
        a1, _ = PatternSpec("fixed", stride=4, summary=c).components()
        assert_mask_equal(head_mask(a1, 8), FIXED_A1)


@pytest.mark.parametrize("c, expected", [(1, FIXED_A2_C1), (2, FIXED_A2_C2)])
def test_fixed_a2_is_the_last_c_positions_of_every_block_so_far(c, expected):
    assert_mask_equal(head_mask((Component("summary", 4, c),), 8), expected)
    _, a2 = PatternSpec("fixed", stride=4, summary=c).components()
    assert_mask_equal(head_mask(a2, 8), expected)


def test_fixed_summary_equal_to_block_length_reads_every_earlier_position():
    # c = l is allowed: A2 is then the whole causal past.
    _, a2 = PatternSpec("fixed", stride=4, summary=4).components()
    assert_mask_equal(head_mask(a2, 8), np.tril(np.ones((8, 8), dtype=bool)))


def test_without_distinct_summaries_every_head_reads_the_last_c_positions():
    spec = PatternSpec("fixed", stride=8, summary=2, combine="interleaved")
    masks = layer_masks(spec.layer_pattern(1, 4), 16)
    for h in range(4):
        assert_mask_equal(masks[h], DISTINCT_A2[0])


def test_distinct_summaries_give_each_head_its_own_sub_block():
    spec = PatternSpec("fixed", stride=8, summary=2, combine="interleaved", distinct_summaries=True)
    masks = layer_masks(spec.layer_pattern(1, 4), 16)
    for h in range(4):
        assert_mask_equal(masks[h], DISTINCT_A2[h])
    # A1 (the block) does not depend on the head.
    a1_masks = layer_masks(spec.layer_pattern(0, 4), 16)
    for h in range(4):
        assert_mask_equal(a1_masks[h], a1_masks[0])


def test_distinct_summaries_wrap_around_when_heads_outnumber_sub_blocks():
    spec = PatternSpec("fixed", stride=8, summary=2, combine="interleaved", distinct_summaries=True)
    masks = layer_masks(spec.layer_pattern(1, 8), 16)
    for h in range(8):
        assert_mask_equal(masks[h], DISTINCT_A2[h % 4])


# --------------------------------------------------------------------------------------
# Combining A1 and A2.
# --------------------------------------------------------------------------------------


def test_interleaved_alternates_a1_and_a2_by_layer_on_every_head():
    spec = PatternSpec("strided", stride=3, combine="interleaved")
    for layer, expected in enumerate([STRIDED_A1, STRIDED_A2, STRIDED_A1, STRIDED_A2, STRIDED_A1]):
        masks = layer_masks(spec.layer_pattern(layer, 2), 8)
        assert masks.shape == (2, 8, 8)
        for h in range(2):
            assert_mask_equal(masks[h], expected)


def test_interleaved_fixed_alternates_block_and_summary():
    spec = PatternSpec("fixed", stride=4, summary=1, combine="interleaved")
    assert_mask_equal(layer_masks(spec.layer_pattern(0, 1), 8)[0], FIXED_A1)
    assert_mask_equal(layer_masks(spec.layer_pattern(1, 1), 8)[0], FIXED_A2_C1)


@pytest.mark.parametrize(
    "name, summary, expected",
    [("strided", 1, STRIDED_MERGED), ("fixed", 1, FIXED_MERGED_C1)],
)
def test_merged_gives_every_head_the_union_in_every_layer(name, summary, expected):
    stride = 3 if name == "strided" else 4
    spec = PatternSpec(name, stride=stride, summary=summary, combine="merged")
    for layer in range(3):
        masks = layer_masks(spec.layer_pattern(layer, 3), 8)
        for h in range(3):
            assert_mask_equal(masks[h], expected)


@pytest.mark.parametrize("num_heads", [2, 4, 8])
def test_multihead_gives_the_first_half_of_heads_a1_and_the_second_half_a2(num_heads):
    spec = PatternSpec("strided", stride=3, combine="multihead")
    for layer in range(2):  # the same in every layer
        masks = layer_masks(spec.layer_pattern(layer, num_heads), 8)
        for h in range(num_heads):
            assert_mask_equal(masks[h], STRIDED_A1 if h < num_heads // 2 else STRIDED_A2)


def test_multihead_fixed_with_distinct_summaries_numbers_the_summary_heads_from_the_last_c():
    """The summary heads (the second half) take the sub-blocks from the end of the block:
    the first reads the last c positions, as without distinct summaries."""
    spec = PatternSpec("fixed", stride=8, summary=2, combine="multihead", distinct_summaries=True)
    masks = layer_masks(spec.layer_pattern(0, 4), 16)
    block = literal(*[("1" * (i % 8 + 1)).rjust(i + 1, "0").ljust(16, "0") for i in range(16)])
    assert_mask_equal(masks[0], block)
    assert_mask_equal(masks[1], block)
    assert_mask_equal(masks[2], DISTINCT_A2[0])
    assert_mask_equal(masks[3], DISTINCT_A2[1])
    # One summary head: distinct summaries change nothing.
    same = PatternSpec("fixed", stride=8, summary=2, combine="multihead")
    one = layer_masks(spec.layer_pattern(0, 2), 16)
    assert_mask_equal(one[1], layer_masks(same.layer_pattern(0, 2), 16)[1])


@pytest.mark.parametrize("name, expected", [("dense", np.tril(np.ones((8, 8), bool))), ("local", STRIDED_A1)])
def test_dense_and_local_ignore_combine(name, expected):
    patterns = set()
    for combine in COMBINES:
        spec = PatternSpec(name, stride=3, combine=combine)
        spec.validate(seq_len=8, num_heads=2)
        for layer in range(2):
            pattern = spec.layer_pattern(layer, 2)
            patterns.add(pattern)
            for m in layer_masks(pattern, 8):
                assert_mask_equal(m, expected)
    assert len(patterns) == 1


def test_layer_pattern_has_one_entry_per_head():
    for name in PATTERNS:
        for combine in COMBINES:
            pattern = PatternSpec(name, stride=4, summary=2, combine=combine).layer_pattern(0, 6)
            assert len(pattern) == 6
            assert all(len(head) >= 1 for head in pattern)


# --------------------------------------------------------------------------------------
# allowed_keys and allowed_pairs agree with the materialised masks.
# --------------------------------------------------------------------------------------

SPECS = [
    PatternSpec("dense"),
    PatternSpec("local", stride=5),
    PatternSpec("local", stride=1),
    PatternSpec("strided", stride=8, combine="interleaved"),
    PatternSpec("strided", stride=8, combine="merged"),
    PatternSpec("strided", stride=8, combine="multihead"),
    PatternSpec("strided", stride=7, combine="merged"),
    PatternSpec("fixed", stride=8, summary=2, combine="interleaved"),
    PatternSpec("fixed", stride=8, summary=2, combine="merged"),
    PatternSpec("fixed", stride=8, summary=2, combine="multihead"),
    PatternSpec("fixed", stride=8, summary=3, combine="merged"),
    PatternSpec("fixed", stride=8, summary=8, combine="interleaved"),
    PatternSpec("fixed", stride=8, summary=2, combine="interleaved", distinct_summaries=True),
    PatternSpec("fixed", stride=8, summary=2, combine="merged", distinct_summaries=True),
    PatternSpec("fixed", stride=16, summary=4, combine="multihead", distinct_summaries=True),
]


def _spec_id(spec: PatternSpec) -> str:
    return (
        f"{spec.name}-l{spec.stride}-c{spec.summary}-{spec.combine}"
        + ("-distinct" if spec.distinct_summaries else "")
    )


@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
@pytest.mark.parametrize("seq_len", [1, 13, 200])
def test_allowed_keys_are_the_nonzero_columns_of_each_mask_row(spec, seq_len):
    for layer in (0, 1):
        for head in spec.layer_pattern(layer, 4):
            mask = head_mask(head, seq_len)
            for i in range(seq_len):
                keys = allowed_keys(head, i)
                np.testing.assert_array_equal(
                    keys, np.flatnonzero(mask[i]), err_msg=f"{head} query {i}"
                )
                assert keys.dtype == np.int64


@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
def test_allowed_pairs_counts_the_true_entries_of_the_layer_masks(spec):
    for layer in (0, 1):
        pattern = spec.layer_pattern(layer, 4)
        for seq_len in (1, 13, 200):
            expected = int(layer_masks(pattern, seq_len).sum())
            assert allowed_pairs(pattern, seq_len) == expected
            # The chunked count must not depend on the chunk size, even one that does not
            # divide the length.
            assert allowed_pairs(pattern, seq_len, chunk=7) == expected
            assert allowed_pairs(pattern, seq_len, chunk=1) == expected


def test_allowed_pairs_on_hand_counted_cases():
    assert allowed_pairs(PatternSpec("dense").layer_pattern(0, 2), 8) == 2 * 36
    # Strided merged, T=8, l=3: row counts of STRIDED_MERGED are 1,2,3,4,4,4,5,5.
    assert allowed_pairs(PatternSpec("strided", stride=3).layer_pattern(0, 1), 8) == 28
    # Fixed A2 with c=1, T=8, l=4: rows 3..6 read 1 key, row 7 reads 2.
    spec = PatternSpec("fixed", stride=4, summary=1, combine="interleaved")
    assert allowed_pairs(spec.layer_pattern(1, 1), 8) == 6


# --------------------------------------------------------------------------------------
# Reference attention against a float64 NumPy softmax.
# --------------------------------------------------------------------------------------


def numpy_attention(q, k, v, mask):
    """Float64 attention, one query row at a time; a row with no allowed key gives zeros."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    b_size, t_size, h_size, d = q.shape
    out = np.zeros((b_size, t_size, h_size, v.shape[-1]), dtype=np.float64)
    for b in range(b_size):
        for h in range(h_size):
            for t in range(t_size):
                keys = np.flatnonzero(mask[h, t])
                if keys.size == 0:
                    continue
                scores = k[b, keys, h, :] @ q[b, t, h, :] / np.sqrt(d)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                out[b, t, h, :] = p @ v[b, keys, h, :]
    return out


def random_qkv(batch=2, seq_len=32, heads=4, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((batch, seq_len, heads, dim)).astype(np.float32) for _ in range(3))


ATTENTION_SPECS = [
    PatternSpec("dense"),
    PatternSpec("local", stride=5),
    PatternSpec("strided", stride=8, combine="interleaved"),
    PatternSpec("strided", stride=8, combine="merged"),
    PatternSpec("strided", stride=8, combine="multihead"),
    PatternSpec("fixed", stride=8, summary=2, combine="interleaved"),
    PatternSpec("fixed", stride=8, summary=2, combine="merged"),
    PatternSpec("fixed", stride=8, summary=2, combine="multihead"),
    PatternSpec("fixed", stride=8, summary=2, combine="interleaved", distinct_summaries=True),
    PatternSpec("fixed", stride=8, summary=2, combine="merged", distinct_summaries=True),
]


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("spec", ATTENTION_SPECS, ids=_spec_id)
def test_reference_attention_equals_a_float64_numpy_softmax(spec, layer):
    seq_len, heads = 32, 4
    spec.validate(seq_len=seq_len, num_heads=heads)
    q, k, v = random_qkv(seq_len=seq_len, heads=heads, seed=layer)
    pattern = spec.layer_pattern(layer, heads)
    expected = numpy_attention(q, k, v, layer_masks(pattern, seq_len))
    out = reference_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), pattern)
    assert out.shape == q.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)
    # The public entry point with the reference impl is the same function.
    out2 = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), pattern, impl="reference")
    np.testing.assert_array_equal(np.asarray(out2), np.asarray(out))


def test_masked_attention_accepts_a_per_batch_mask():
    q, k, v = random_qkv(batch=2, seq_len=8, heads=2, dim=4, seed=3)
    rng = np.random.default_rng(4)
    mask = rng.random((2, 2, 8, 8)) < 0.5
    out = masked_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask)
    for b in range(2):
        expected = numpy_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], mask[b])
        np.testing.assert_allclose(np.asarray(out[b : b + 1]), expected, rtol=1e-5, atol=1e-6)


def test_reference_attention_rejects_a_pattern_with_the_wrong_number_of_heads():
    q, k, v = random_qkv(seq_len=8, heads=4)
    with pytest.raises(ValueError, match="3 heads"):
        reference_attention(q, k, v, PatternSpec("dense").layer_pattern(0, 3))


def _empty_row_case():
    # Fixed, interleaved, odd layer: A2 alone; with l=8, c=2 queries 0..5 precede the first
    # summary column (6) and have no key at all.
    spec = PatternSpec("fixed", stride=8, summary=2, combine="interleaved")
    pattern = spec.layer_pattern(1, 4)
    q, k, v = random_qkv(seq_len=32, heads=4, seed=7)
    return pattern, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def test_a_query_with_no_allowed_key_gets_zero_output_and_no_nan():
    pattern, q, k, v = _empty_row_case()
    mask = layer_masks(pattern, 32)
    assert not mask[:, :6].any() and mask[:, 6:].any(axis=-1).all()
    out = np.asarray(reference_attention(q, k, v, pattern))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[:, :6], 0.0)
    assert (np.abs(out[:, 6:]).sum(axis=-1) > 0).all()
    np.testing.assert_allclose(out, numpy_attention(q, k, v, mask), rtol=1e-5, atol=1e-6)
    # The same under jit.
    jitted = jax.jit(lambda q, k, v: reference_attention(q, k, v, pattern))(q, k, v)
    np.testing.assert_allclose(np.asarray(jitted), out, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("spec", ATTENTION_SPECS, ids=_spec_id)
def test_reference_attention_gradients_are_finite(spec):
    q, k, v = (jnp.asarray(x) for x in random_qkv(seq_len=16, heads=4, seed=11))
    cot = jnp.asarray(np.random.default_rng(12).standard_normal(q.shape).astype(np.float32))
    for layer in (0, 1):
        pattern = spec.layer_pattern(layer, 4)
        grads = jax.grad(
            lambda q, k, v: jnp.sum(reference_attention(q, k, v, pattern) * cot), argnums=(0, 1, 2)
        )(q, k, v)
        for g in grads:
            assert bool(jnp.isfinite(g).all())
        assert any(bool(jnp.any(g != 0)) for g in grads)


def test_gradients_through_queries_with_no_allowed_key_are_zero_and_finite():
    pattern, q, k, v = _empty_row_case()
    cot = jnp.ones_like(q)
    dq, dk, dv = jax.jit(
        jax.grad(lambda q, k, v: jnp.sum(reference_attention(q, k, v, pattern) * cot), argnums=(0, 1, 2))
    )(q, k, v)
    for g in (dq, dk, dv):
        assert bool(jnp.isfinite(g).all())
    np.testing.assert_array_equal(np.asarray(dq[:, :6]), 0.0)
    assert bool(jnp.any(dq[:, 6:] != 0))
    # Keys 0..5 are never summary columns (j mod 8 < 6 within each block): nothing reads them.
    never_read = [j for j in range(32) if j % 8 < 6]
    np.testing.assert_array_equal(np.asarray(dk[:, never_read]), 0.0)
    np.testing.assert_array_equal(np.asarray(dv[:, never_read]), 0.0)


# --------------------------------------------------------------------------------------
# Bad parameters fail at config time, naming the field and the constraint.
# --------------------------------------------------------------------------------------

BAD_SPECS = [
    # (spec, seq_len, num_heads, regex the message must contain)
    (
        PatternSpec("strided", stride=24),
        256,
        4,
        r"sequence length 256 is not a multiple of the attention stride l=24",
    ),
    (
        PatternSpec("fixed", stride=24, summary=4),
        256,
        4,
        r"sequence length 256 is not a multiple of the attention stride l=24",
    ),
    (PatternSpec("fixed", stride=16, summary=32), 256, 4, r"1 <= c <= l.*c=32, l=16"),
    (PatternSpec("fixed", stride=16, summary=0), 256, 4, r"1 <= c <= l.*c=0, l=16"),
    (PatternSpec("sparse"), 256, 4, r"unknown attention pattern 'sparse'.*dense, local, strided, fixed"),
    (
        PatternSpec("strided", stride=16, combine="mixed"),
        256,
        4,
        r"unknown combine mode 'mixed'.*interleaved, merged, multihead",
    ),
    (
        PatternSpec("fixed", stride=16, summary=4, combine="sum"),
        256,
        4,
        r"unknown combine mode 'sum'",
    ),
    (
        PatternSpec("fixed", stride=16, summary=3, distinct_summaries=True),
        256,
        4,
        r"distinct summary.*c to divide l.*c=3.*l=16",
    ),
    (
        PatternSpec("strided", stride=16, combine="multihead"),
        256,
        1,
        r"multihead.*at least 2 heads, got 1",
    ),
    (
        PatternSpec("fixed", stride=16, summary=4, combine="multihead"),
        256,
        1,
        r"multihead.*at least 2 heads, got 1",
    ),
    (PatternSpec("strided", stride=0), 256, 4, r"stride l=0 must be a positive integer"),
]


@pytest.mark.parametrize("spec, seq_len, num_heads, message", BAD_SPECS)
def test_pattern_spec_validate_rejects_bad_parameters_with_a_clear_message(
    spec, seq_len, num_heads, message
):
    with pytest.raises(PatternError, match=message):
        spec.validate(seq_len=seq_len, num_heads=num_heads)
    assert issubclass(PatternError, ValueError)


def test_pattern_spec_validate_accepts_good_parameters():
    PatternSpec("dense").validate(seq_len=255, num_heads=1)
    PatternSpec("local", stride=24).validate(seq_len=256, num_heads=1)  # a window need not divide
    PatternSpec("strided", stride=16, combine="multihead").validate(seq_len=256, num_heads=2)
    PatternSpec("fixed", stride=16, summary=16).validate(seq_len=256, num_heads=4)  # c == l
    PatternSpec("fixed", stride=16, summary=3).validate(seq_len=256, num_heads=4)  # c need not divide l
    PatternSpec("fixed", stride=16, summary=4, distinct_summaries=True).validate(seq_len=256, num_heads=8)


def test_the_quickstart_config_is_valid():
    config_lib.validate(get_config())


def _set(config, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"attention.stride": 24}, r"config\.attention: sequence length 256 is not a multiple of the attention stride l=24"),
        (
            {"attention.pattern": "fixed", "attention.stride": 16, "attention.summary": 32},
            r"config\.attention: fixed pattern needs 1 <= c <= l, got c=32, l=16.*attention\.summary",
        ),
        ({"attention.pattern": "sparse"}, r"config\.attention: unknown attention pattern 'sparse'"),
        ({"attention.combine": "mixed"}, r"config\.attention: unknown combine mode 'mixed'"),
        (
            {
                "attention.pattern": "fixed",
                "attention.stride": 16,
                "attention.summary": 3,
                "attention.distinct_summaries": True,
            },
            r"config\.attention: distinct summary sub-blocks need c to divide l \(c=3, l=16\)",
        ),
        (
            {"attention.combine": "multihead", "model.num_heads": 1},
            r"config\.attention: combine='multihead'.*at least 2 heads, got 1",
        ),
    ],
)
def test_config_validate_rejects_bad_attention_fields(overrides, message):
    config = get_config()
    for key, value in overrides.items():
        _set(config, key, value)
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config)


def test_config_validate_uses_the_data_length_for_the_stride_check():
    config = get_config()
    config.data.seq_len = 248  # 8 * 31: not a multiple of the quickstart's l=16
    config.model.pos_shape = (31, 8)
    with pytest.raises(config_lib.ConfigError, match=r"sequence length 248 .* l=16"):
        config_lib.validate(config)
    config.attention.stride = 8
    config_lib.validate(config)


# --------------------------------------------------------------------------------------
# Choosing the implementation.
# --------------------------------------------------------------------------------------


def test_auto_impl_resolves_to_the_reference_on_cpu():
    assert resolve_impl("auto", platform="cpu") == "reference"
    if jax.default_backend() == "cpu":
        assert resolve_impl("auto") == "reference"
    assert resolve_impl("reference") == "reference"


def test_auto_impl_gives_dense_half_precision_layers_to_cudnn_on_gpu():
    dense = PatternSpec("dense").layer_pattern(0, 4)
    strided = PatternSpec("strided", 16).layer_pattern(0, 4)
    assert is_dense(dense) and not is_dense(strided)
    assert not is_dense(PatternSpec("local", 16).layer_pattern(0, 4))
    assert auto_impl_for(dense, jnp.bfloat16, platform="gpu") == "cudnn_dense"
    assert auto_impl_for(dense, jnp.float16, platform="gpu") == "cudnn_dense"
    # cuDNN takes no float32; sparse layers go to the block-sparse kernel.
    assert auto_impl_for(dense, jnp.float32, platform="gpu") == "pallas_gpu"
    assert auto_impl_for(strided, jnp.bfloat16, platform="gpu") == "pallas_gpu"
    assert auto_impl_for(dense, jnp.bfloat16, platform="cpu") == "reference"
    assert auto_impl_for(dense, jnp.bfloat16, platform="tpu") == "pallas_tpu"


def test_auto_impl_on_cpu_gives_the_reference_result():
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU fallback")
    q, k, v = (jnp.asarray(x) for x in random_qkv(seq_len=16, heads=2, seed=5))
    pattern = PatternSpec("strided", stride=4).layer_pattern(0, 2)
    np.testing.assert_array_equal(
        np.asarray(attention(q, k, v, pattern)), np.asarray(reference_attention(q, k, v, pattern))
    )


def test_an_unknown_impl_raises_a_clear_error():
    q, k, v = (jnp.asarray(x) for x in random_qkv(seq_len=8, heads=2))
    pattern = PatternSpec("dense").layer_pattern(0, 2)
    with pytest.raises(PatternError, match=r"unknown attention impl 'flash'.*'reference'"):
        attention(q, k, v, pattern, impl="flash")
