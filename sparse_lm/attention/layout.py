"""Host-side block layouts for the block-sparse attention kernels.

A head's allowed set is a union of components (see ``patterns.py``). The kernel only
does work on (query block, key block) pairs that hold at least one allowed pair, so
the layout's job is to arrange the sequence so that few blocks are visited:

* Every head's union is split into *parts* whose allowed sets are disjoint, so that a
  softmax over the union is the log-sum-exp merge of per-part softmaxes (no key counted
  twice, none missed). Merged strided = local(l) + {stride(l), i - j > l}; merged
  fixed = block(l) + {summary columns of earlier blocks}.
* A part may reorder the sequence. The stride component is computed in the *strided*
  order, the sequence reshaped to [T/l, l] and transposed, so that positions
  ``i = r*l + c`` sharing a column ``c`` are contiguous and the stride component
  becomes a causal band inside each column. The summary component reads a *gathered*
  key sequence holding only the summary columns (c per block of l), so its key blocks
  are compact.
* For each part and query block the layout lists the key blocks to visit, split into
  *full* blocks (every pair allowed: no mask in the kernel) and *partial* ones (mask
  computed in the kernel from the pairs' original positions). Empty blocks are absent.
  The transposed lists (for each key block, the query blocks) drive the dK/dV kernel.

Masks are always evaluated on *original* positions, whatever the order, through a
``MaskRule``: ``min_diff <= i - j <= max_diff`` and a group condition. The block
classification uses per-block aggregates (min/max position, block id, column): "full"
is only claimed when it is certain, "visit" errs on the side of visiting, so the
layout can cost time but never correctness.

Layouts depend only on (pattern, T, block sizes) and are cached.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import numpy as np

from sparse_lm.attention.patterns import HeadPattern, LayerPattern, PatternError

# Original position given to padding keys of a gathered sequence: later than every
# query, so every causal rule (min_diff >= 0) masks it out.
PAD_POSITION = 2**30

Group = Literal["none", "same_block", "same_col", "earlier_block"]
Order = Literal["natural", "strided"]


@dataclasses.dataclass(frozen=True)
class MaskRule:
    """allowed(i, j) = min_diff <= i - j [<= max_diff] and the group condition.

    Groups (with ``g`` the pattern's l): ``same_block``: i // g == j // g;
    ``same_col``: i % g == j % g; ``earlier_block``: j // g < i // g.
    """

    min_diff: int = 0
    max_diff: int | None = None
    group: Group = "none"
    g: int = 1

    def allowed(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Numpy version of the in-kernel mask (used by tests and the layout checks)."""
        d = i - j
        ok = d >= self.min_diff
        if self.max_diff is not None:
            ok &= d <= self.max_diff
        if self.group == "same_block":
            ok &= (i // self.g) == (j // self.g)
        elif self.group == "same_col":
            ok &= (i % self.g) == (j % self.g)
        elif self.group == "earlier_block":
            ok &= (j // self.g) < (i // self.g)
        return ok

    def in_kernel(self, i, j):
        """The same rule on int32 positions inside a kernel (any Pallas backend)."""
        from jax import lax

        d = i - j
        ok = d >= self.min_diff
        if self.max_diff is not None:
            ok = ok & (d <= self.max_diff)
        # Positions are non-negative, so truncating division and remainder are floor ones.
        if self.group == "same_block":
            ok = ok & (lax.div(i, self.g) == lax.div(j, self.g))
        elif self.group == "same_col":
            ok = ok & (lax.rem(i, self.g) == lax.rem(j, self.g))
        elif self.group == "earlier_block":
            ok = ok & (lax.div(j, self.g) < lax.div(i, self.g))
        return ok


@dataclasses.dataclass(frozen=True)
class PartSpec:
    """One disjoint piece of a head's allowed set, and the order it is computed in.

    order: ``natural`` or ``strided`` (queries and keys permuted by column of l).
    summary: (l, c) when keys are the gathered summary columns, else None. The
      summary offset is per head and lives in the layout, not here, so that heads
      that differ only by offset share one kernel launch.
    """

    order: Order
    rule: MaskRule
    l: int = 0  # noqa: E741 - the paper's name; stride of the ``strided`` order.
    summary: tuple[int, int] | None = None


def head_parts(head: HeadPattern) -> tuple[tuple[PartSpec, ...], tuple[int, ...]]:
    """Disjoint parts of one head's allowed set, and the head's summary offset per part.

    Raises PatternError for a component set that the kernel has no decomposition for.
    """
    kinds = tuple(sorted(c.kind for c in head))
    by_kind = {c.kind: c for c in head}
    if len(by_kind) != len(head):
        raise PatternError(f"head pattern {head} repeats a component kind; the kernel "
                           "needs each kind at most once per head.")

    def natural(rule: MaskRule) -> PartSpec:
        return PartSpec("natural", rule)

    if kinds == ("causal",):
        return (natural(MaskRule()),), (0,)
    if kinds == ("local",):
        return (natural(MaskRule(0, by_kind["local"].l)),), (0,)
    if kinds == ("stride",):
        l = by_kind["stride"].l  # noqa: E741
        return (PartSpec("strided", MaskRule(0, None, "same_col", l), l),), (0,)
    if kinds == ("local", "stride"):
        ll, ls = by_kind["local"].l, by_kind["stride"].l
        if ll != ls:
            raise PatternError(f"merged strided heads need equal local window and stride, "
                               f"got local l={ll} and stride l={ls}.")
        # The local window already holds i - j in {0, l}: the stride part starts at 2l.
        return (
            natural(MaskRule(0, ll)),
            PartSpec("strided", MaskRule(ll + 1, None, "same_col", ls), ls),
        ), (0, 0)
    if kinds == ("block",):
        l = by_kind["block"].l  # noqa: E741
        return (natural(MaskRule(0, None, "same_block", l)),), (0,)
    if kinds == ("summary",):
        s = by_kind["summary"]
        return (PartSpec("natural", MaskRule(), summary=(s.l, s.c)),), (s.offset,)
    if kinds == ("block", "summary"):
        b, s = by_kind["block"], by_kind["summary"]
        if b.l != s.l:
            raise PatternError(f"merged fixed heads need equal block and summary l, got "
                               f"block l={b.l} and summary l={s.l}.")
        # Summary columns of the query's own block are already in the block part.
        return (
            natural(MaskRule(0, None, "same_block", b.l)),
            PartSpec("natural", MaskRule(0, None, "earlier_block", s.l), summary=(s.l, s.c)),
        ), (0, s.offset)
    raise PatternError(f"the block-sparse kernel has no layout for the component set "
                       f"{kinds}; supported: causal, local, stride, local+stride, block, "
                       "summary, block+summary.")


@dataclasses.dataclass(frozen=True, eq=False)
class PartLayout:
    """Everything a kernel launch needs for one part of one head group.

    Arrays (numpy, int32):
      q_order: [T] original position of each row in the part's query order; None for
        the natural order (identity).
      k_index: [Hg, Tk] original position gathered into each key row (padding rows read
        position 0 and are masked by ``k_pos``); None when keys use the query order.
      q_pos: [T] original positions of the query rows (== q_order or arange).
      k_pos: [Hg, Tk] original positions of the key rows (PAD_POSITION for padding).
      fwd: [nq, W] per query block: n_full, n_partial, then the key block ids (full
        ones first); W is a power of two.
      bwd: [nk, W'] per key block: n_full, n_partial, then the query block ids.
    """

    spec: PartSpec
    seq_len: int
    kv_len: int
    block_q: int
    block_k: int
    q_order: np.ndarray | None
    k_index: np.ndarray | None
    q_pos: np.ndarray
    k_pos: np.ndarray
    fwd: np.ndarray
    bwd: np.ndarray
    full_pairs: int  # number of visited full (query block, key block) pairs
    partial_pairs: int  # number of visited partial pairs


@dataclasses.dataclass(frozen=True, eq=False)
class GroupLayout:
    """Heads that share one part structure (one kernel launch per part).

    ``dkv_parts``: the same parts laid out with other query tiles for a dK/dV kernel
    that prefers them (``pallas_gpu``'s ``summary_dkv_block_q``), or None.
    ``fwd_parts``: likewise for a forward kernel (``pallas_gpu``'s ``mosaic_forward``).
    """

    heads: tuple[int, ...]
    parts: tuple[PartLayout, ...]
    dkv_parts: tuple[PartLayout, ...] | None = None
    fwd_parts: tuple[PartLayout, ...] | None = None


def head_ranges(groups: tuple[GroupLayout, ...] | list, num_heads: int) -> list[slice] | None:
    """Each group's heads as a slice, in the groups' order, where the groups sorted by
    first head are consecutive runs covering 0..num_heads-1 in order (multihead: the
    local heads, then the summary heads); else None. Kernels then slice q, k, v per
    group and concatenate the outputs: a gather per group and a scatter back (and their
    transposes in the backward pass) cost 2.9 ms of a 4.7 ms fixed-multihead f+b at
    (8, 12288, 8, 64) on an H200 (BENCHMARKS.md, session 7)."""
    ordered = sorted(groups, key=lambda g: g.heads[0])
    if sum((tuple(g.heads) for g in ordered), ()) != tuple(range(num_heads)):
        return None
    return [slice(g.heads[0], g.heads[-1] + 1) for g in groups]


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    seq_len: int
    block_q: int
    block_k: int
    groups: tuple[GroupLayout, ...]

    def visited_blocks(self) -> tuple[int, int]:
        """(full, partial) (query block, key block) pairs summed over parts and heads."""
        full = sum(p.full_pairs * len(g.heads) for g in self.groups for p in g.parts)
        part = sum(p.partial_pairs * len(g.heads) for g in self.groups for p in g.parts)
        return full, part


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def check_block(name: str, block: int, length: int) -> None:
    """Raises PatternError unless ``block`` is a power of two >= 16 dividing ``length``."""
    if block < 16 or block & (block - 1):
        raise PatternError(f"{name}={block} must be a power of two >= 16 (the GPU kernel's "
                           "tiles are powers of two of at least 16 rows).")
    if length % block:
        raise PatternError(f"sequence length {length} is not a multiple of {name}={block}; "
                           f"pad the sequence to a multiple of {block} or pick a smaller "
                           f"{name} that divides {length}.")


def _block_stats(pos: np.ndarray, block: int, g: int) -> dict[str, np.ndarray]:
    """Aggregates of original positions per block (pos: [H, L]); padding excluded."""
    h, n = pos.shape
    p = pos.reshape(h, n // block, block)
    valid = p < PAD_POSITION
    big = np.iinfo(np.int64).max
    pv = p.astype(np.int64)
    lo = np.where(valid, pv, big).min(-1)
    hi = np.where(valid, pv, -1).max(-1)
    blk = pv // g
    col = pv % g
    any_valid = valid.any(-1)
    all_valid = valid.all(-1)
    return {
        "lo": lo,
        "hi": hi,
        "blo": np.where(valid, blk, big).min(-1),
        "bhi": np.where(valid, blk, -1).max(-1),
        "col": col[..., 0],
        "one_col": ((col == col[..., :1]) | ~valid).all(-1),
        "any": any_valid,
        "all": all_valid,
    }


def classify_blocks(
    rule: MaskRule, q_pos: np.ndarray, k_pos: np.ndarray, block_q: int, block_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(visit, full): [nq, nk] booleans, the union over heads of k_pos's rows.

    ``visit`` is a superset of the blocks holding an allowed pair; ``full`` a subset of
    the blocks whose pairs are all allowed (for every head).
    """
    g = rule.g
    qs = _block_stats(q_pos[None], block_q, g)
    ks = _block_stats(k_pos, block_k, g)
    # Shapes: queries [1, nq, 1], keys [H, 1, nk].
    q = {k: v[:, :, None] for k, v in qs.items()}
    k = {k: v[:, None, :] for k, v in ks.items()}
    # i - j over the pair ranges between lo_d and hi_d (exact when positions are
    # contiguous; an enclosing interval otherwise, which is the safe direction).
    hi_d = q["hi"] - k["lo"]
    lo_d = q["lo"] - k["hi"]
    visit = k["any"] & (hi_d >= rule.min_diff)
    full = k["all"] & (lo_d >= rule.min_diff)
    if rule.max_diff is not None:
        visit &= lo_d <= rule.max_diff
        full &= hi_d <= rule.max_diff
    if rule.group == "same_block":
        visit &= (q["blo"] <= k["bhi"]) & (k["blo"] <= q["bhi"])
        full &= (q["blo"] == q["bhi"]) & (k["blo"] == k["bhi"]) & (q["blo"] == k["blo"])
    elif rule.group == "same_col":
        certain_q, certain_k = q["one_col"], k["one_col"]
        visit &= ~(certain_q & certain_k) | (q["col"] == k["col"])
        full &= certain_q & certain_k & (q["col"] == k["col"])
    elif rule.group == "earlier_block":
        visit &= k["blo"] < q["bhi"]
        full &= k["bhi"] < q["blo"]
    # Stride parts with min_diff > 0 etc.: nothing more. Union over heads.
    return visit.any(0), full.all(0) & visit.any(0)


def _tables(visit: np.ndarray, full: np.ndarray) -> np.ndarray:
    """[n, W] rows: n_full, n_partial, full block ids, partial block ids (W power of 2)."""
    n = visit.shape[0]
    counts = visit.sum(1)
    width = _next_pow2(2 + int(counts.max(initial=0)))
    tab = np.zeros((n, width), dtype=np.int32)
    for r in range(n):
        f = np.flatnonzero(full[r])
        p = np.flatnonzero(visit[r] & ~full[r])
        tab[r, 0], tab[r, 1] = len(f), len(p)
        tab[r, 2 : 2 + len(f)] = f
        tab[r, 2 + len(f) : 2 + len(f) + len(p)] = p
    return tab


def strided_order(seq_len: int, l: int) -> np.ndarray:  # noqa: E741
    """Original position of each row after reshaping to [T/l, l] and transposing."""
    if seq_len % l:
        raise PatternError(f"sequence length {seq_len} is not a multiple of the stride "
                           f"l={l}; the strided layout reshapes the sequence to [T/l, l].")
    return np.arange(seq_len).reshape(seq_len // l, l).T.reshape(-1)


def summary_positions(seq_len: int, l: int, c: int, offset: int) -> np.ndarray:  # noqa: E741
    """Sorted positions of the summary columns: l-c-offset <= j % l < l-offset."""
    if seq_len % l:
        raise PatternError(f"sequence length {seq_len} is not a multiple of the block "
                           f"length l={l}; the fixed layout gathers c columns per block.")
    lo = l - c - offset
    if lo < 0:
        raise PatternError(f"summary columns [{lo}, {l - offset}) fall outside the block "
                           f"of length l={l}: need c + offset <= l.")
    starts = np.arange(0, seq_len, l)[:, None]
    return (starts + np.arange(lo, l - offset)[None, :]).reshape(-1)


def _part_layout(
    spec: PartSpec, offsets: tuple[int, ...], seq_len: int, block_q: int, block_k: int
) -> PartLayout:
    if spec.order == "strided":
        q_order = strided_order(seq_len, spec.l)
        q_pos = q_order
    else:
        q_order = None
        q_pos = np.arange(seq_len)
    if spec.summary is not None:
        l, c = spec.summary  # noqa: E741
        rows = np.stack([summary_positions(seq_len, l, c, o) for o in offsets])
        kv_len = -(-rows.shape[1] // block_k) * block_k
        pad = kv_len - rows.shape[1]
        k_index = np.pad(rows, ((0, 0), (0, pad)))
        k_pos = np.pad(rows, ((0, 0), (0, pad)), constant_values=PAD_POSITION)
    else:
        kv_len = seq_len
        k_index = None
        k_pos = q_pos[None]
    visit, full = classify_blocks(spec.rule, q_pos, k_pos, block_q, block_k)
    return PartLayout(
        spec=spec,
        seq_len=seq_len,
        kv_len=kv_len,
        block_q=block_q,
        block_k=block_k,
        q_order=None if q_order is None else q_order.astype(np.int32),
        k_index=None if k_index is None else k_index.astype(np.int32),
        q_pos=q_pos.astype(np.int32),
        k_pos=k_pos.astype(np.int32),
        fwd=_tables(visit, full),
        bwd=_tables(visit.T, full.T),
        full_pairs=int(full.sum()),
        partial_pairs=int((visit & ~full).sum()),
    )


@functools.lru_cache(maxsize=256)
def build_layout(pattern: LayerPattern, seq_len: int, block_q: int, block_k: int) -> Layout:
    """The cached block layout of a layer pattern at length ``seq_len``.

    Heads whose parts match (up to the summary offset) share a group, so merged and
    interleaved layers are one group and multihead layers two.
    """
    check_block("block_q", block_q, seq_len)
    check_block("block_k", block_k, seq_len)
    keyed: dict[tuple[PartSpec, ...], list[tuple[int, tuple[int, ...]]]] = {}
    for h, head in enumerate(pattern):
        parts, offsets = head_parts(tuple(head))
        keyed.setdefault(parts, []).append((h, offsets))
    groups = []
    for parts, members in keyed.items():
        heads = tuple(h for h, _ in members)
        layouts = []
        for p, spec in enumerate(parts):
            offs = tuple(o[p] for _, o in members)
            if spec.summary is None or len(set(offs)) == 1:
                # One shared key order: the kernel then reads one row of positions.
                offs = offs[:1]
            layouts.append(_part_layout(spec, offs, seq_len, block_q, block_k))
        groups.append(GroupLayout(heads=heads, parts=tuple(layouts)))
    return Layout(seq_len=seq_len, block_q=block_q, block_k=block_k, groups=tuple(groups))


def dense_mask(part: PartLayout, head: int = 0) -> np.ndarray:
    """[T, Tk] mask of one part in its own row order (small T only; for tests)."""
    kp = part.k_pos[min(head, part.k_pos.shape[0] - 1)]
    return part.spec.rule.allowed(part.q_pos[:, None].astype(np.int64),
                                  kp[None, :].astype(np.int64))

