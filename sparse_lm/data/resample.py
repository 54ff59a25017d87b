"""Rational-ratio resampling with a Kaiser-windowed sinc filter, in NumPy.

Output sample ``n`` sits at input time ``t = n * down / up`` and is the sum of nearby
input samples weighted by a low-pass sinc centred on ``t``. The sinc's cut-off is the
lower of the two Nyquist frequencies (slightly below, to leave a transition band), so
downsampling removes the frequencies the new rate cannot hold instead of aliasing them.
``t``'s fractional part takes only ``up`` values, so the filter is tabulated once per
phase (polyphase) and each phase is one strided matrix-vector product.
"""

from __future__ import annotations

import math

import numpy as np

_ZERO_CROSSINGS = 16  # sinc lobes kept each side: longer = sharper cut-off, slower
_KAISER_BETA = 8.6  # ~ -80 dB stop band
_ROLLOFF = 0.94  # cut-off as a fraction of the target Nyquist: room for the transition band


def _phase_filters(up: int, down: int) -> tuple[np.ndarray, int]:
    """Taps ``[up, 2 * half]``: row ``r`` serves outputs ``n = r (mod up)``, weighting inputs
    ``floor(t) - half + 1 .. floor(t) + half``."""
    cutoff = min(1.0, up / down) * _ROLLOFF  # in units of the input Nyquist
    half = int(math.ceil(_ZERO_CROSSINGS / cutoff))
    frac = (np.arange(up) * down % up) / up  # fractional input position of each phase
    k = np.arange(-half + 1, half + 1)  # input offsets from floor(t)
    tau = frac[:, None] - k[None, :]  # distance from t to each input sample
    window = np.i0(_KAISER_BETA * np.sqrt(np.clip(1.0 - (tau / half) ** 2, 0.0, None))) / np.i0(_KAISER_BETA)
    taps = cutoff * np.sinc(cutoff * tau) * window
    # Exact unity gain at DC for every phase, so a constant stays constant.
    taps /= taps.sum(axis=1, keepdims=True)
    return taps.astype(np.float32), half


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Resamples the 1-D signal ``x`` from ``rate_in`` to ``rate_out`` Hz (``float32``)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"resample expects a 1-D (mono) signal, got shape {x.shape}")
    rate_in, rate_out = int(rate_in), int(rate_out)
    if rate_in <= 0 or rate_out <= 0:
        raise ValueError(f"sample rates must be positive, got {rate_in} -> {rate_out}")
    if rate_in == rate_out or x.size == 0:
        return x.copy()
    g = math.gcd(rate_in, rate_out)
    up, down = rate_out // g, rate_in // g
    n_out = -(-x.size * up // down)  # ceil: the output covers the whole input duration
    taps, half = _phase_filters(up, down)
    width = 2 * half
    # Zero padding stands for silence before and after the signal.
    pad_left = half - 1
    n_per_phase = -(-n_out // up)
    # Enough zeros that the last frame of every phase stays inside the buffer.
    pad_right = max(0, n_per_phase * down + width - pad_left - x.size) + 1
    xp = np.concatenate([np.zeros(pad_left, np.float32), x, np.zeros(pad_right, np.float32)])
    out = np.empty(n_per_phase * up, dtype=np.float32)
    step = xp.strides[0]
    for r in range(up):
        # Outputs n = r, r + up, r + 2 up, ... share a phase; their base input index
        # floor(n * down / up) advances by exactly `down` each time.
        base = r * down // up
        frames = np.lib.stride_tricks.as_strided(
            xp[base:], shape=(n_per_phase, width), strides=(down * step, step), writeable=False
        )
        out[r::up] = frames @ taps[r]
    return out[:n_out]
