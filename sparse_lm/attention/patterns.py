"""The Sparse Transformer's factorized attention patterns, as data.

Notation follows Child et al. (2019), section 4. Position ``i`` (a query) may attend
to position ``j`` (a key) only if ``j`` is in the allowed set of ``i``; every set here
is causal (``j <= i``).

* ``causal``               dense:   {j <= i}
* ``local(l)``             window:  {max(0, i - l) .. i}                     (strided A1)
* ``stride(l)``            column:  {j <= i : (i - j) mod l == 0}            (strided A2)
* ``block(l)``             block:   {j <= i : floor(j / l) == floor(i / l)}  (fixed A1)
* ``summary(l, c, o)``     summary: {j <= i : l - c - o <= j mod l < l - o}  (fixed A2)

``summary`` with offset ``o = 0`` is the paper's A2 for the fixed pattern; a non-zero
offset moves the summary sub-block so that different heads attend to distinct
sub-blocks (the paper found that preferable with several heads).

A *layer pattern* is a tuple with one entry per head; each entry is the tuple of
components whose union that head attends to. The three ways of combining the two
components of a factorized pattern (section 4.3) only differ in how they build it:

* ``interleaved``: every head of a layer uses one component; layers alternate A1, A2.
* ``merged``:      every head attends to A1 U A2.
* ``multihead``:   the first half of the heads use A1, the second half A2.

A query whose allowed set is empty (fixed A2 alone, before the first summary column)
gets a zero output: the residual stream passes through unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

PATTERNS = ("dense", "local", "strided", "fixed")
COMBINES = ("interleaved", "merged", "multihead")
ComponentKind = Literal["causal", "local", "stride", "block", "summary"]


class PatternError(ValueError):
    """An attention pattern's parameters cannot work; the message says which and why."""


@dataclasses.dataclass(frozen=True, order=True)
class Component:
    """One causal allowed-set rule (see the module docstring for the definitions)."""

    kind: ComponentKind
    l: int = 0  # noqa: E741 - the paper's name for the stride / block length.
    c: int = 0
    offset: int = 0

    def allowed(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Boolean array: may query position ``i`` attend to key position ``j``."""
        causal = j <= i
        if self.kind == "causal":
            return causal
        if self.kind == "local":
            return causal & (i - j <= self.l)
        if self.kind == "stride":
            return causal & ((i - j) % self.l == 0)
        if self.kind == "block":
            return causal & (j // self.l == i // self.l)
        if self.kind == "summary":
            r = j % self.l
            return causal & (r >= self.l - self.c - self.offset) & (r < self.l - self.offset)
        raise PatternError(f"unknown component kind {self.kind!r}")


HeadPattern = tuple[Component, ...]
LayerPattern = tuple[HeadPattern, ...]


@dataclasses.dataclass(frozen=True)
class PatternSpec:
    """What a config chooses: the pattern, its parameters and how to combine A1 and A2.

    Attributes:
      name: one of ``PATTERNS``.
      stride: the paper's ``l``: stride for ``strided``, window for ``local``, block
        length for ``fixed``. Ignored for ``dense``.
      summary: the paper's ``c`` for ``fixed``: how many trailing positions of each
        block every later position can read.
      combine: one of ``COMBINES``; ignored for ``dense`` and ``local``.
      distinct_summaries: ``fixed`` only: head ``h`` reads summary sub-block
        ``h mod (l // c)`` counted from the end of each block, instead of all heads
        reading the last ``c`` positions.
    """

    name: str = "dense"
    stride: int = 128
    summary: int = 32
    combine: str = "merged"
    distinct_summaries: bool = False

    @classmethod
    def from_config(cls, attn_cfg: Any) -> "PatternSpec":
        """The spec that a ``config.attention`` section (ConfigDict, dict or object) describes."""
        get = attn_cfg.get if hasattr(attn_cfg, "get") else lambda k, d: getattr(attn_cfg, k, d)
        return cls(
            name=str(get("pattern", "dense")),
            stride=int(get("stride", 128)),
            summary=int(get("summary", 32)),
            combine=str(get("combine", "merged")),
            distinct_summaries=bool(get("distinct_summaries", False)),
        )

    def validate(self, seq_len: int | None = None, num_heads: int | None = None) -> None:
        """Raises PatternError naming the problem and the fix."""
        if self.name not in PATTERNS:
            raise PatternError(
                f"unknown attention pattern {self.name!r}; choose one of {', '.join(PATTERNS)}."
            )
        # Checked for every pattern, so a typo is caught even where combine is unused.
        if self.combine not in COMBINES:
            raise PatternError(
                f"unknown combine mode {self.combine!r}; choose one of {', '.join(COMBINES)}."
            )
        if self.name == "dense":
            return
        if self.stride < 1:
            raise PatternError(f"attention stride l={self.stride} must be a positive integer.")
        if self.name == "fixed":
            if not 1 <= self.summary <= self.stride:
                raise PatternError(
                    f"fixed pattern needs 1 <= c <= l, got c={self.summary}, l={self.stride}; "
                    "lower attention.summary or raise attention.stride."
                )
            if self.distinct_summaries and self.stride % self.summary:
                raise PatternError(
                    f"distinct summary sub-blocks need c to divide l (c={self.summary}, "
                    f"l={self.stride}); pick c among the divisors of l."
                )
        if seq_len is not None and self.name in ("strided", "fixed") and seq_len % self.stride:
            raise PatternError(
                f"sequence length {seq_len} is not a multiple of the attention stride "
                f"l={self.stride}; choose a length that l divides (e.g. "
                f"{(seq_len // self.stride + 1) * self.stride}) or a stride that divides {seq_len}."
            )
        if (
            num_heads is not None
            and self.name in ("strided", "fixed")
            and self.combine == "multihead"
            and num_heads < 2
        ):
            raise PatternError(
                "combine='multihead' splits heads between the two components and needs at "
                f"least 2 heads, got {num_heads}; use 'merged' or more heads."
            )

    def components(self, head: int = 0) -> tuple[HeadPattern, HeadPattern]:
        """The pattern's two components (A1, A2) as seen by ``head``."""
        l = self.stride  # noqa: E741
        if self.name == "dense":
            return (Component("causal"),), (Component("causal"),)
        if self.name == "local":
            return (Component("local", l),), (Component("local", l),)
        if self.name == "strided":
            return (Component("local", l),), (Component("stride", l),)
        offset = 0
        if self.distinct_summaries:
            offset = (head % (l // self.summary)) * self.summary
        return (Component("block", l),), (Component("summary", l, self.summary, offset),)

    def layer_pattern(self, layer: int, num_heads: int) -> LayerPattern:
        """Each head's allowed-set components for layer ``layer`` (0-based)."""
        self.validate(num_heads=num_heads)
        heads = []
        for h in range(num_heads):
            # Multihead: the A2 heads are the second half; their distinct summary
            # sub-blocks are numbered from the first A2 head, so that the first one reads
            # the block's last c positions (those that have seen the whole block), as
            # without distinct summaries, and the sub-blocks are used from the end.
            a1, a2 = self.components(h)
            if self.combine == "multihead" and h >= num_heads // 2:
                a2 = self.components(h - num_heads // 2)[1]
            if self.name in ("dense", "local"):
                heads.append(a1)
            elif self.combine == "merged":
                heads.append(a1 + a2)
            elif self.combine == "interleaved":
                heads.append(a1 if layer % 2 == 0 else a2)
            else:  # multihead
                heads.append(a1 if h < num_heads // 2 else a2)
        return tuple(heads)


def head_mask(head: HeadPattern, seq_len: int) -> np.ndarray:
    """[T, T] boolean mask of one head: union of its components."""
    i = np.arange(seq_len)[:, None]
    j = np.arange(seq_len)[None, :]
    mask = np.zeros((seq_len, seq_len), dtype=bool)
    for comp in head:
        mask |= comp.allowed(i, j)
    return mask


def layer_masks(pattern: LayerPattern, seq_len: int) -> np.ndarray:
    """[H, T, T] boolean masks, one per head. O(H T^2): for tests and small T only."""
    return np.stack([head_mask(h, seq_len) for h in pattern])


def allowed_pairs(pattern: LayerPattern, seq_len: int, chunk: int = 256) -> int:
    """Number of (query, key) pairs summed over heads: the work a sparse kernel must do.

    Counted a chunk of query rows at a time, so it works at T = 65,536 without a T x T mask.
    """
    j = np.arange(seq_len)[None, :]
    total = 0
    for head in pattern:
        for start in range(0, seq_len, chunk):
            i = np.arange(start, min(start + chunk, seq_len))[:, None]
            rows = np.zeros((i.shape[0], seq_len), dtype=bool)
            for comp in head:
                rows |= comp.allowed(i, j)
            total += int(rows.sum())
    return total


def allowed_keys(head: HeadPattern, i: int) -> np.ndarray:
    """Sorted key positions that query ``i`` attends to under ``head``: O(|A(i)|) work.

    This is what incremental decoding gathers from its cache, and the per-row
    definition that ``head_mask`` materialises.
    """
    keys: set[int] = set()
    for comp in head:
        if comp.kind == "causal":
            keys.update(range(0, i + 1))
        elif comp.kind == "local":
            keys.update(range(max(0, i - comp.l), i + 1))
        elif comp.kind == "stride":
            keys.update(range(i % comp.l, i + 1, comp.l))
        elif comp.kind == "block":
            keys.update(range((i // comp.l) * comp.l, i + 1))
        elif comp.kind == "summary":
            lo = comp.l - comp.c - comp.offset
            hi = comp.l - comp.offset
            for start in range(0, i + 1, comp.l):
                keys.update(range(start + lo, min(start + hi, i + 1)))
        else:
            raise PatternError(f"unknown component kind {comp.kind!r}")
    return np.array(sorted(keys), dtype=np.int64)
