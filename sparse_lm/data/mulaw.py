"""8-bit mu-law companding (ITU-T G.711 style curve, mu = 255) between floats and bytes.

Encoding compresses amplitude logarithmically before uniform 8-bit quantisation, so
quiet passages keep resolution; byte 128 is silence-ish (just above zero), 0 is -1.0,
255 is +1.0. Sampling writes WAVs through ``mulaw_decode``.
"""

from __future__ import annotations

import numpy as np

MU = 255


def mulaw_compress(x: np.ndarray, mu: int = MU) -> np.ndarray:
    """The continuous companding curve, [-1, 1] -> [-1, 1]."""
    x = np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0)
    return np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)


def mulaw_expand(y: np.ndarray, mu: int = MU) -> np.ndarray:
    """Inverse of ``mulaw_compress``."""
    y = np.clip(np.asarray(y, dtype=np.float64), -1.0, 1.0)
    return np.sign(y) * np.expm1(np.abs(y) * np.log1p(mu)) / mu


def mulaw_encode(x: np.ndarray, mu: int = MU) -> np.ndarray:
    """Floats in [-1, 1] (clipped) -> ``uint8`` codes 0..mu."""
    y = mulaw_compress(x, mu)
    # Round to the nearest of mu + 1 evenly spaced levels of the companded signal.
    return np.floor((y + 1.0) * (mu / 2.0) + 0.5).astype(np.uint8)


def mulaw_decode(q: np.ndarray, mu: int = MU) -> np.ndarray:
    """``uint8`` codes -> ``float32`` samples in [-1, 1]."""
    y = np.asarray(q, dtype=np.float64) * (2.0 / mu) - 1.0
    return mulaw_expand(y, mu).astype(np.float32)
