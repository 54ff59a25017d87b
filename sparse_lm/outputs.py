"""Writing samples to files people can look at and listen to: text, PNG grids, WAV."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile
from PIL import Image

from sparse_lm.data import IMAGE_SHAPE, mulaw_decode



def _as_bytes(samples: np.ndarray | Sequence[Sequence[int]], ndim: int = 2) -> np.ndarray:
    arr = np.asarray(samples)
    if arr.ndim != ndim:
        raise ValueError(f"samples must have {ndim} dimensions [num_samples, length], got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError("samples must be bytes (values 0..255)")
    return arr.astype(np.uint8)


def write_text(samples: np.ndarray, out_dir: str | Path, prefix: str = "sample") -> list[Path]:
    """One ``.txt`` file per sample holding its raw bytes (enwik8 is mostly UTF-8 XML)."""
    data = _as_bytes(samples)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, row in enumerate(data):
        path = out / f"{prefix}_{i:03d}.txt"
        path.write_bytes(row.tobytes())
        paths.append(path)
    return paths


def write_png_grid(
    samples: np.ndarray,
    path: str | Path,
    prompt_rows: int | None = None,
    columns: int | None = None,
    scale: int = 1,
) -> Path:
    """A PNG grid of 32x32 RGB samples, each [3072] bytes in raster order.

    Without ``prompt_rows``: a plain grid, ``columns`` wide (default about square).
    With ``prompt_rows`` (image rows given as the prompt): as in the paper's
    figures, one grid row per distinct prompt, starting with the prompt alone (the
    rest of that image grey) followed by every completion of that prompt.
    """
    data = _as_bytes(samples)
    if data.shape[1] != int(np.prod(IMAGE_SHAPE)):
        raise ValueError(f"image samples must be [N, 3072] bytes, got shape {data.shape}")
    images = data.reshape(-1, *IMAGE_SHAPE)
    if prompt_rows is None:
        cols = columns or int(np.ceil(np.sqrt(len(images))))
        rows = [list(images[i : i + cols]) for i in range(0, len(images), cols)]
    else:
        if not 0 < prompt_rows <= IMAGE_SHAPE[0]:
            raise ValueError(f"prompt_rows={prompt_rows} must be in 1..{IMAGE_SHAPE[0]}")
        rows = _rows_by_prompt(images, prompt_rows)
    grid = _tile(rows, pad=2)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def _rows_by_prompt(images: np.ndarray, prompt_rows: int) -> list[list[np.ndarray]]:
    groups: dict[bytes, list[np.ndarray]] = {}  # insertion-ordered: prompts in sample order
    for img in images:
        groups.setdefault(img[:prompt_rows].tobytes(), []).append(img)
    rows = []
    for completions in groups.values():
        prompt = np.full_like(completions[0], 128)
        prompt[:prompt_rows] = completions[0][:prompt_rows]
        rows.append([prompt, *completions])
    return rows


def _tile(rows: list[list[np.ndarray]], pad: int) -> np.ndarray:
    h, w, c = IMAGE_SHAPE
    ncols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for r, row in enumerate(rows):
        for col, img in enumerate(row):
            y, x = pad + r * (h + pad), pad + col * (w + pad)
            grid[y : y + h, x : x + w] = img
    return grid


def write_wav(
    samples: np.ndarray, out_dir: str | Path, sample_rate: int, prefix: str = "sample"
) -> list[Path]:
    """One 16-bit PCM mono ``.wav`` per sample of mu-law bytes, at ``sample_rate`` Hz."""
    data = _as_bytes(samples)
    if sample_rate <= 0:
        raise ValueError(f"sample_rate={sample_rate} must be positive")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, row in enumerate(data):
        path = out / f"{prefix}_{i:03d}.wav"
        soundfile.write(path, mulaw_decode(row), int(sample_rate), subtype="PCM_16")
        paths.append(path)
    return paths
