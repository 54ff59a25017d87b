"""The block layout: exact decomposition of every head's allowed set, and few blocks."""

from __future__ import annotations

import numpy as np
import pytest

from sparse_lm.attention import PatternError, PatternSpec, layer_masks
from sparse_lm.attention.layout import (
    PAD_POSITION,
    MaskRule,
    build_layout,
    dense_mask,
    strided_order,
    summary_positions,
)
from sparse_lm.attention.patterns import Component
from tests.helpers import attention_spec_cases

# (spec, layer): every pattern and combine mode; interleaved layers 0 and 1 differ.
SPECS, IDS = attention_spec_cases()
# (T, block_q, block_k): blocks smaller than, equal to and larger than l = 16.
SIZES = [(64, 16, 16), (128, 32, 16), (256, 16, 64)]


def visited(table: np.ndarray, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode a block table into (visit, full) boolean matrices."""
    vis = np.zeros((table.shape[0], n_cols), bool)
    full = np.zeros_like(vis)
    for r, row in enumerate(table):
        n_full, n_part = row[0], row[1]
        ids = row[2 : 2 + n_full + n_part]
        assert len(set(ids.tolist())) == len(ids), "a block is listed twice"
        vis[r, ids] = True
        full[r, ids[:n_full]] = True
    return vis, full


@pytest.mark.parametrize("size", SIZES, ids=[f"T{t}-q{q}-k{k}" for t, q, k in SIZES])
@pytest.mark.parametrize("spec,layer", SPECS, ids=IDS)
def test_parts_are_disjoint_and_cover_each_heads_allowed_set(spec, layer, size):
    t, bq, bk = size
    pattern = spec.layer_pattern(layer, 4)
    layout = build_layout(pattern, t, bq, bk)
    want = layer_masks(pattern, t)
    assert sorted(h for g in layout.groups for h in g.heads) == list(range(4))
    for group in layout.groups:
        for row, head in enumerate(group.heads):
            count = np.zeros((t, t), int)
            for part in group.parts:
                mask = dense_mask(part, row)  # rows/cols in the part's own order
                kpos = part.k_pos[min(row, part.k_pos.shape[0] - 1)]
                real = kpos < PAD_POSITION
                assert not mask[:, ~real].any(), "a padding key is allowed"
                qi, kj = np.nonzero(mask[:, real])
                np.add.at(count, (part.q_pos[qi], kpos[real][kj]), 1)
            assert count.max() <= 1, f"head {head}: a key is counted by two parts"
            np.testing.assert_array_equal(count == 1, want[head], err_msg=f"head {head}")


@pytest.mark.parametrize("size", SIZES, ids=[f"T{t}-q{q}-k{k}" for t, q, k in SIZES])
@pytest.mark.parametrize("spec,layer", SPECS, ids=IDS)
def test_block_tables_visit_every_allowed_block_and_full_means_full(spec, layer, size):
    t, bq, bk = size
    layout = build_layout(spec.layer_pattern(layer, 4), t, bq, bk)
    for group in layout.groups:
        for part in group.parts:
            nq, nk = t // bq, part.kv_len // bk
            vis, full = visited(part.fwd, nk)
            vis_t, full_t = visited(part.bwd, nq)
            np.testing.assert_array_equal(vis, vis_t.T, "backward table is not the transpose")
            np.testing.assert_array_equal(full, full_t.T)
            for row in range(len(group.heads)):
                blocks = dense_mask(part, row).reshape(nq, bq, nk, bk)
                assert not (blocks.any((1, 3)) & ~vis).any(), "an allowed block is skipped"
                assert not (full & ~blocks.all((1, 3))).any(), "a masked pair in a full block"


def test_strided_order_is_reshape_and_transpose():
    order = strided_order(12, 4)
    np.testing.assert_array_equal(order, [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11])


def test_summary_positions_are_the_last_c_columns_shifted_by_offset():
    np.testing.assert_array_equal(summary_positions(16, 8, 2, 0), [6, 7, 14, 15])
    np.testing.assert_array_equal(summary_positions(16, 8, 2, 2), [4, 5, 12, 13])


@pytest.mark.parametrize(
    "rule,i,j,want",
    [
        (MaskRule(0, 4), [5, 5, 5], [5, 1, 0], [True, True, False]),
        (MaskRule(5, None, "same_col", 4), [12, 12, 12, 12], [4, 8, 0, 1], [True, False, True, False]),
        (MaskRule(0, None, "same_block", 8), [9, 9, 9], [7, 8, 10], [False, True, False]),
        (MaskRule(0, None, "earlier_block", 8), [9, 9], [7, 8], [True, False]),
    ],
)
def test_mask_rule_definitions(rule, i, j, want):
    np.testing.assert_array_equal(rule.allowed(np.array(i), np.array(j)), want)


def fraction_computed(spec: PatternSpec, t: int, block: int) -> tuple[float, float]:
    """(pairs the kernel computes, pairs allowed), both over dense causal's pairs."""
    layout = build_layout(spec.layer_pattern(0, 1), t, block, block)
    full, partial = layout.visited_blocks()
    dense = t * (t + 1) / 2
    allowed = layer_masks(spec.layer_pattern(0, 1), t).sum() if t <= 2048 else None
    return (full + partial) * block * block / dense, (allowed / dense if allowed else None)


@pytest.mark.parametrize(
    "spec,t,max_fraction",
    [
        # The stride component, local in the strided order, costs ~one block per row.
        (PatternSpec("strided", 128), 16384, 0.04),
        (PatternSpec("strided", 256), 65536, 0.016),
        (PatternSpec("fixed", 128, 32), 16384, 0.27),
        (PatternSpec("local", 128), 16384, 0.025),
    ],
)
def test_layouts_visit_few_blocks_at_the_benchmark_sizes(spec, t, max_fraction):
    computed, _ = fraction_computed(spec, t, 64)
    assert computed < max_fraction


@pytest.mark.parametrize("spec", [PatternSpec("strided", 32), PatternSpec("fixed", 32, 8)])
def test_computed_pairs_stay_within_twice_the_allowed_pairs(spec):
    computed, allowed = fraction_computed(spec, 2048, 32)
    assert computed < 2 * allowed


@pytest.mark.parametrize(
    "t,bq,bk,match",
    [
        (100, 16, 16, "multiple of block_q=16"),
        (128, 24, 16, "block_q=24 must be a power of two"),
        (128, 16, 8, "block_k=8 must be a power of two >= 16"),
    ],
)
def test_bad_block_sizes_name_the_constraint(t, bq, bk, match):
    with pytest.raises(PatternError, match=match):
        build_layout(PatternSpec("dense").layer_pattern(0, 1), t, bq, bk)


def test_length_not_multiple_of_stride_names_the_constraint():
    with pytest.raises(PatternError, match="not a multiple of the stride l=48"):
        build_layout(PatternSpec("strided", 48).layer_pattern(0, 1), 128, 16, 16)
    with pytest.raises(PatternError, match="not a multiple of the block length l=48"):
        build_layout(PatternSpec("fixed", 48, 8).layer_pattern(0, 1), 128, 16, 16)


def test_unsupported_component_set_is_rejected():
    head = (Component("causal"), Component("summary", 16, 4))
    with pytest.raises(PatternError, match="no layout for the component set"):
        build_layout((head,), 64, 16, 16)


@pytest.mark.parametrize("t,l,bq,bk", [(256, 16, 16, 16), (512, 16, 32, 16), (16384, 128, 64, 64)])
def test_strided_blocks_stay_in_their_column_when_blocks_divide_it(t, l, bq, bk):  # noqa: E741
    """What the fused (v2) kernel path relies on: with block_q and block_k dividing T/l,
    a strided query block lists only key blocks of its own column and vice versa, so
    the kernel can take the column of the [B, T/l, l, H, D] view as its key sequence."""
    from sparse_lm.attention.pallas_gpu import _Rows

    for spec in (PatternSpec("strided", l, combine="merged"),
                 PatternSpec("strided", l, combine="interleaved")):
        for layer in (0, 1):
            layout = build_layout(spec.layer_pattern(layer, 2), t, bq, bk)
            for part in (p for g in layout.groups for p in g.parts):
                if part.spec.order != "strided":
                    continue
                rows = _Rows(part, t)
                assert _Rows.fits(part, t)
                n = t // l
                fwd = rows.rebase(part.fwd, bq, bk)  # raises if a block leaves the column
                bwd = rows.rebase(part.bwd, bk, bq)
                for tab, per in ((fwd, n // bk), (bwd, n // bq)):
                    for row in tab:
                        ids = row[2 : 2 + row[0] + row[1]]
                        assert ((ids >= 0) & (ids < per)).all()


@pytest.mark.parametrize("spec", [PatternSpec("fixed", 16, 4, combine="merged"),
                                  PatternSpec("fixed", 16, 4, combine="merged", distinct_summaries=True)],
                         ids=["shared-summaries", "per-head-summaries"])
def test_adding_gathered_key_grads_in_place_equals_the_float32_scatter(spec):
    """add_at_keys touches only the gathered rows of a bf16 dk, yet rounds the same float32
    sum once, as converting dk to float32, scattering and converting back does; padding
    rows (here 40 summary rows padded to 48) change nothing. part_keys reads those rows."""
    import jax
    import jax.numpy as jnp

    from sparse_lm.attention.part_order import add_at_keys, part_keys, scatter_keys, summary_slice

    pattern = tuple(tuple(head) for head in spec.layer_pattern(0, 2))
    parts = [p for g in build_layout(pattern, 160, 16, 16).groups for p in g.parts if p.k_index is not None]
    assert parts and any((p.k_pos == PAD_POSITION).any() for p in parts)
    # Shared summaries take the reshape-and-slice path, per-head ones the scatter.
    assert [summary_slice(p) for p in parts] == ([(16, 12, 4)] if not spec.distinct_summaries else [None])
    for part in parts:
        heads = part.k_index.shape[0]
        k1, k2 = jax.random.split(jax.random.PRNGKey(len(parts)))
        dx = jax.random.normal(k1, (2, 160, heads, 8), jnp.float32).astype(jnp.bfloat16)
        dxg = jax.random.normal(k2, (2, part.kv_len, heads, 8), jnp.float32)
        dxg = jnp.where(jnp.asarray(part.k_pos.T == PAD_POSITION)[None, :, :, None], 0.0, dxg)
        want = scatter_keys(dx.astype(jnp.float32), dxg, part).astype(jnp.bfloat16)
        got = add_at_keys(dx, dxg, part)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
        assert not np.array_equal(np.asarray(got, np.float32), np.asarray(dx, np.float32))
        # The gathered keys: the rows of their positions, then padding (zeros or row 0).
        keys, real = np.asarray(part_keys(dx, part), np.float32), part.k_pos != PAD_POSITION
        for h in range(heads):
            np.testing.assert_array_equal(keys[:, real[h], h], np.asarray(dx, np.float32)[:, part.k_index[h][real[h]], h])


def test_head_ranges_slice_consecutive_head_groups_and_refuse_others():
    from sparse_lm.attention.layout import GroupLayout, head_ranges

    def groups(*heads):
        return [GroupLayout(heads=h, parts=()) for h in heads]

    # multihead: local heads first, summary heads after; any group order is kept
    assert head_ranges(groups((0, 1), (2, 3)), 4) == [slice(0, 2), slice(2, 4)]
    assert head_ranges(groups((2, 3), (0, 1)), 4) == [slice(2, 4), slice(0, 2)]
    assert head_ranges(groups((0, 2), (1, 3)), 4) is None  # interleaved heads: gather
    assert head_ranges(groups((0, 1)), 4) is None  # heads 2, 3 in no group
    layout = build_layout(tuple(tuple(h) for h in PatternSpec("fixed", 16, 4, combine="multihead")
                                .layer_pattern(0, 8)), 64, 16, 16)
    assert head_ranges(layout.groups, 8) == [slice(0, 4), slice(4, 8)]
