"""Sampling from a training run's checkpoint: prompts, progress, and files in the data's format.

Text corpora give ``.txt`` files, CIFAR-10 a PNG grid (prompt half and completions,
as in the paper's figures), audio ``.wav`` files at the configured rate.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sparse_lm import data as data_lib
from sparse_lm import outputs
from sparse_lm.checkpoint import restore_for_inference
from sparse_lm.config import ConfigError
from sparse_lm.decode import Sampling, generate
from sparse_lm.sharding import data_parallel_size

TEXT_DATA = ("enwik8", "text", "pystdlib")


def prompts_from_split(
    config: ml_collections.ConfigDict, split: str, num_samples: int, length: int, seed: int
) -> np.ndarray:
    """[num_samples, length] prompts: the starts of randomly chosen examples of ``split``."""
    source = data_lib.load_split(config.data, split)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(source), size=num_samples, replace=len(source) < num_samples)
    return np.stack([source[int(i)][:length] for i in picks]).astype(np.int32)


def prompt_length(config: ml_collections.ConfigDict, length: int | None = None) -> int:
    """How much of each example to give as the prompt: ``sample.prompt_fraction`` of the
    sample's ``length`` (default: the context), in whole image rows for CIFAR-10."""
    n = int(config.sample.prompt_fraction * (length or config.data.seq_len))
    if config.data.name == "cifar10":
        row = int(np.prod(config.model.pos_shape[1:]))
        n = max(row, n // row * row)
    return n


class Progress:
    """A one-line progress bar with tokens per second, redrawn after each decoded chunk."""

    def __init__(self, batch_size: int, stream=sys.stderr):
        self.batch_size, self.stream = batch_size, stream
        self.start = None
        self.first = 0

    def __call__(self, done: int, total: int) -> None:
        now = time.time()
        if self.start is None:
            self.start, self.first = now, done
        rate = (done - self.first) * self.batch_size / max(now - self.start, 1e-9)
        shown = f"{rate:,.0f} tokens/s" if done > self.first else "prompt processed"
        width = 30
        filled = int(width * done / max(total, 1))
        bar = "#" * filled + "." * (width - filled)
        end = "\n" if done >= total else ""
        print(f"\r[{bar}] {done}/{total} positions  {shown}", end=end,
              file=self.stream, flush=True)


def sample_from_checkpoint(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    output: str | Path,
    *,
    num_samples: int,
    length: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    prompt_from_split: str | None = None,
    prompt_text: str | None = None,
    checkpoint_step: int | None = None,
    progress: bool = True,
) -> dict:
    """Samples from a checkpoint and writes files under ``output``. Returns a manifest."""
    seq_len = config.data.seq_len
    length = length or config.sample.length or seq_len
    # Every argument is checked before the (slow, for a large model) checkpoint restore.
    if num_samples < 1 or length < 1:
        raise ConfigError(f"--num_samples ({num_samples}) and --length ({length}) must be "
                          "positive (--length 0 means the whole context).")
    try:
        Sampling(temperature, top_k, top_p).validate(int(config.model.get("vocab_size", 256)))
    except ValueError as e:
        raise ConfigError(f"sampling: {e}") from None
    if length > seq_len:
        raise ConfigError(
            f"--length={length} is longer than the model's context of {seq_len} bytes; ask "
            f"for at most {seq_len} (prompt included)."
        )
    if config.data.name == "cifar10" and length != seq_len:
        raise ConfigError(
            f"CIFAR-10 samples must be whole images: leave --length at {seq_len} (or 0)."
        )
    if prompt_from_split and prompt_text:
        raise ConfigError("give either --prompt_from_split or --prompt, not both.")
    if prompt_text and config.data.name not in TEXT_DATA:
        raise ConfigError(
            f"--prompt is text, but this model is trained on {config.data.name}; use "
            "--prompt_from_split for images and audio."
        )
    prompt = None
    if prompt_from_split:
        prompt = prompts_from_split(
            config, prompt_from_split, num_samples, min(prompt_length(config, length), length - 1), seed
        )
    elif prompt_text:
        encoded = np.frombuffer(prompt_text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
        if encoded.size >= length:
            raise ConfigError(
                f"the prompt is {encoded.size} bytes but --length is {length}; ask for a longer "
                "sample or a shorter prompt."
            )
        prompt = np.tile(encoded[None], (num_samples, 1))

    fns, params, step, mesh = restore_for_inference(config, workdir, step=checkpoint_step)
    model = fns.bind(params)
    start = time.time()
    with jax.set_mesh(mesh):
        tokens = generate(
            model,
            batch_size=num_samples,
            length=length,
            prompt=prompt,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            on_chunk=Progress(num_samples) if progress else None,
            cache_dtype=jnp.float32 if config.model.dtype == "float32" else jnp.bfloat16,
            mesh=mesh if num_samples % data_parallel_size(mesh) == 0 else None,
        )
    seconds = time.time() - start

    files = _write_samples(config, tokens, prompt, Path(output), step) if jax.process_index() == 0 else []
    manifest = {
        "step": step,
        "num_samples": num_samples,
        "length": length,
        "prompt_length": 0 if prompt is None else int(prompt.shape[1]),
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "seed": seed,
        "seconds": seconds,
        "files": [str(f) for f in files],
    }
    if jax.process_index() == 0:  # every host holds all samples; one writes them
        (Path(output) / f"samples_step{step}.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _write_samples(
    config: ml_collections.ConfigDict, tokens: np.ndarray, prompt: np.ndarray | None, out: Path, step: int
) -> list[Path]:
    """The samples as files people can open: PNG grid, WAVs or text files."""
    out.mkdir(parents=True, exist_ok=True)
    name = config.data.name
    if name == "cifar10":
        prompt_rows = None
        if prompt is not None:
            prompt_rows = prompt.shape[1] // int(np.prod(config.model.pos_shape[1:]))
        return [outputs.write_png_grid(tokens, out / f"samples_step{step}.png", prompt_rows=prompt_rows, scale=2)]
    if name == "audio":
        return outputs.write_wav(tokens, out, config.data.sample_rate, prefix=f"step{step}")
    return outputs.write_text(tokens, out, prefix=f"step{step}")
