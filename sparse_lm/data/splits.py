"""Dividing data into train/valid/test by fractions, the same way for every source."""

from __future__ import annotations

from collections.abc import Sequence

from sparse_lm.data.errors import DataError

SPLITS = ("train", "valid", "test")
DEFAULT_FRACTIONS = (0.9, 0.05, 0.05)


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    return split


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
        raise DataError(
            f"split_fractions must be three non-negative numbers (train, valid, test) that sum "
            f"to 1, got {tuple(fractions)}; set data.split_fractions, e.g. (0.9, 0.05, 0.05)."
        )
    return fr  # type: ignore[return-value]


def contiguous_bounds(n: int, fractions: Sequence[float], split: str) -> tuple[int, int]:
    """``(start, stop)`` of ``split`` in a corpus of ``n`` items cut in order.

    Rounding (not flooring) keeps the standard enwik8 split exact: 0.9 * 1e8 is not
    exactly representable, and flooring it could lose a byte. Test takes the remainder.
    """
    fr = check_fractions(fractions)
    n_train = int(round(fr[0] * n))
    n_valid = int(round(fr[1] * n))
    n_valid = min(n_valid, n - n_train)
    bounds = {
        "train": (0, n_train),
        "valid": (n_train, n_train + n_valid),
        "test": (n_train + n_valid, n),
    }
    return bounds[check_split(split)]
