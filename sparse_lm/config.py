"""Default configuration and its validation.

Every config in ``configs/`` starts from ``base_config()`` and overrides what differs,
so each field has one documented default here. Fields are ml_collections
``ConfigDict`` entries: any of them can be overridden on the command line
(``--config.model.num_layers=4``).
"""

from __future__ import annotations

import os
from pathlib import Path

import ml_collections

from sparse_lm.attention import IMPL_NAMES, PatternError, PatternSpec


class ConfigError(ValueError):
    """A config value cannot work; the message names the field and the fix."""


# Fields that were removed, section -> {field: why}. Config files are not locked while
# they build the config, so one that still sets such a field would add it back silently
# (and nothing would read it): ``validate`` and ``model.gpu_kernel_options`` raise
# instead, and the command line names the removal (``cli``).
REMOVED_FIELDS = {
    "attention": {
        "strip_bwd": "removed on 2026-12-03: the one-kernel backward of band parts was "
                     "slower than the default kernels on an H200 (strided f+b 0.716 vs "
                     "0.517 ms)",
        "atomic_dq": "removed on 2026-12-03: the summary dq by float atomics from the "
                     "Triton dK/dV kernel was slower than the default on an H200 (fixed f+b "
                     "2.27 vs 1.96 ms); mosaic_summary_dq is the default's summary dq",
    },
}


def removed_field_error(section: str, fields) -> ConfigError | None:
    """A ConfigError naming the first removed field of ``section`` among ``fields``."""
    for name, why in REMOVED_FIELDS.get(section, {}).items():
        if name in fields:
            return ConfigError(f"config.{section}.{name} was {why}; delete it from the config.")
    return None


def shared_data_path(*parts: str) -> str:
    """A path under the real sample data the smoke and quality configs train on:
    ``$SPARSE_LM_SHARED_DATA`` (as for the tests), else ``shared/data`` beside the
    repository, wherever the command runs from."""
    root = os.environ.get("SPARSE_LM_SHARED_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    return os.path.join(root, *parts)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.name = "pystdlib"  # enwik8 | cifar10 | audio | text | pystdlib
    c.data.path = ""  # file, folder or archive, per data set
    c.data.files = ()  # 'text' only: paths or globs (a tuple, so that a flag can set it)
    c.data.download = False  # fetch the official archive when path lacks it
    c.data.download_sha256 = ""  # enwik8: expected SHA-256 of the downloaded zip ('': size check only)
    c.data.seq_len = 256
    c.data.batch_size = 8  # global, over all devices and hosts
    c.data.eval_batch_size = 16  # global
    c.data.split_fractions = (0.9, 0.05, 0.05)  # contiguous corpora: train/valid/test
    c.data.max_bytes = 0  # pystdlib: cap on bytes read (0 = the source's default)
    c.data.sample_rate = 12000  # audio, Hz
    c.data.flip = False  # cifar10: random horizontal flip for training
    c.data.cifar_source = "binary"  # binary | tfds
    c.data.tfds_data_dir = ""
    c.data.split_by = "file"  # audio: 'file' (files hashed into splits) or 'time' (cut each file)
    c.data.cache_dir = ""  # audio: decoded-audio cache ('': ~/.cache/sparse_lm/audio, 'off': none)
    c.data.valid_size = -1  # cifar10: training images held out as 'valid' (-1: min(5000, n/10))

    c.model = ml_collections.ConfigDict()
    c.model.vocab_size = 256
    c.model.num_layers = 2
    c.model.d_model = 128
    c.model.num_heads = 4
    c.model.ff_ratio = 4.0  # 2.0 is the paper's half-size feed-forward
    c.model.qk_ratio = 1.0  # 0.5 is the paper's half-size query/key projections
    c.model.dropout = 0.0
    c.model.pos_shape = (16, 16)  # factorized position embeddings; product == seq_len
    c.model.dtype = "float32"  # compute dtype; bfloat16 on accelerators
    c.model.param_dtype = "float32"
    # The residual stream between blocks: float32, or bfloat16 (half the bytes of the
    # LayerNorms and residual sums; sums still taken in float32, rounded once per block).
    c.model.residual_dtype = "float32"
    # LayerNorm's backward: "auto" (the Pallas kernel on GPU, XLA elsewhere), "xla" (fused
    # by XLA) or "pallas_gpu" (one Pallas kernel that reads x and dy once).
    c.model.layer_norm_impl = "auto"
    c.model.remat = "none"  # none | full | save_attention | save_attention_dots | dots | dots_no_batch
    # Stack the blocks' parameters on a 'layers' axis and apply them with a scan: compile
    # time stops growing with depth. Parameter trees (checkpoints) differ between layouts.
    c.model.scan_layers = False

    c.attention = ml_collections.ConfigDict()
    c.attention.pattern = "strided"  # dense | local | strided | fixed
    c.attention.stride = 16  # the paper's l
    c.attention.summary = 4  # the paper's c (fixed)
    c.attention.combine = "merged"  # interleaved | merged | multihead
    c.attention.distinct_summaries = False
    c.attention.impl = "auto"  # auto | reference | pallas_gpu | mosaic_gpu (experimental) | pallas_tpu | cudnn_dense
    # pallas_gpu options (ignored by the other impls; BENCHMARKS.md "Session 4" times them):
    c.attention.colaunch = True  # the fixed pattern's two parts in one forward/dQ launch
    c.attention.narrow_chain = True  # partial results between the kernel's launches in bf16, not float32
    c.attention.column_bwd = True  # a strided part's dq, dk, dv in one kernel per column (head dim <= 64)
    c.attention.diag_bwd = True  # the fixed pattern's own-block dq, dk, dv in one kernel per block
    c.attention.delta_in_dq = True  # the backward's rowsum(do * o) from the first dQ kernel, not XLA
    c.attention.mosaic_forward = False  # merged fixed heads' forward by Mosaic GPU (bf16; f+b 1-6% faster, see pallas_gpu)
    c.attention.mosaic_forward_persistent = False  # ... launched as one program per SM (D=64; untimed, see pallas_gpu)
    c.attention.mosaic_summary_dkv = False  # the fixed pattern's summary dK/dV by Mosaic GPU (bf16, D=64)
    # ... and its dq too, by TMA reductions. Unset: the kernel's default, on for merged
    # fixed heads where it applies (faster; dq not bitwise reproducible run to run);
    # False: reproducible gradients; True: every summary head group.
    c.attention.mosaic_summary_dq = ml_collections.config_dict.placeholder(bool)
    c.attention.mosaic_dkvdq_persistent = False  # that kernel as one program per SM (untimed, see pallas_gpu)
    # pallas_gpu launch parameters, 0 = the kernel's default (tuned on an H200 with
    # scripts/tune_attention.py; another card may prefer others):
    c.attention.block_q = 0  # query tile rows (power of two >= 16 dividing T)
    c.attention.block_k = 0  # key tile rows
    c.attention.num_warps = 0  # default 4
    c.attention.num_stages = 0  # default 2
    c.attention.summary_dkv_block_q = 0  # query tile rows of the fixed pattern's summary dK/dV kernel (0: block_q; 128 was slower)

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 100
    c.optim.decay_steps = 0  # 0: decay over train.num_steps
    c.optim.min_lr_ratio = 0.0  # final learning rate as a fraction of the peak
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0  # 0 disables clipping
    c.optim.grad_accum_steps = 1

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000
    c.train.log_every = 10
    c.train.eval_every = 200  # 0: only at the end
    c.train.eval_max_batches = 0  # 0: the whole validation split
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 3
    c.train.async_checkpoint = True
    c.train.nonfinite = "skip"  # skip | stop: what a non-finite loss or gradient does
    c.train.max_skipped = 10  # with 'skip': up to this many updates in a row may be skipped; one more stops
    # Trace train.profile_steps steps from step train.profile_from (0: off; a step after
    # the run's first, which compiles) with the JAX profiler into workdir/profile/ and log
    # device time per kernel category and how busy the device was (a "profile" record).
    c.train.profile_from = 0
    c.train.profile_steps = 3
    # Fault injection for tests and drills only: the loss and gradients of these steps
    # (numbered as in the metrics, from 1) are made NaN. Leave empty in real runs.
    c.train.debug_nan_steps = ()

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices left over
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.sample = ml_collections.ConfigDict()
    c.sample.num_samples = 4
    c.sample.length = 0  # 0: the model's context
    c.sample.temperature = 1.0
    c.sample.top_k = 0
    c.sample.top_p = 1.0
    c.sample.prompt_fraction = 0.5  # with --prompt_from_split: share of each sample given
    return c


def pattern_spec(config: ml_collections.ConfigDict) -> PatternSpec:
    return PatternSpec.from_config(config.attention)


def parse_impl_variant(spec: str, attention: ml_collections.ConfigDict) -> tuple[str, dict[str, bool]]:
    """'impl+name[=true|false]+...' -> (impl, {name: value}): an attention impl with some
    of the config's boolean attention options set, as the benchmark and check scripts
    take them (``pallas_gpu+mosaic_forward``, ``auto+colaunch=false``). Raises
    ConfigError naming the options that exist."""
    impl, *items = spec.split("+")
    if impl not in IMPL_NAMES:
        raise ConfigError(f"{spec}: attention impl {impl!r} is not one of {', '.join(IMPL_NAMES)}")
    # Boolean fields, unset ones (placeholder(bool), e.g. mosaic_summary_dq) included.
    booleans = [k for k in attention.keys() if attention.get_type(k) is bool]
    options = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in booleans:
            raise ConfigError(f"{spec}: '{name}' is not a boolean attention option of the config "
                              f"(those are: {', '.join(booleans)})")
        if value.lower() not in ("", "true", "false"):
            raise ConfigError(f"{spec}: '{item}' must be {name}, {name}=true or {name}=false")
        options[name] = value.lower() != "false"
    return impl, options


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks that fields agree with each other; raises ConfigError naming the fix."""
    m, d = config.model, config.data
    for section in REMOVED_FIELDS:
        if section in config and (error := removed_field_error(section, config[section])):
            raise error
    try:
        pattern_spec(config).validate(seq_len=d.seq_len, num_heads=m.num_heads)
    except PatternError as e:
        raise ConfigError(f"config.attention: {e}") from None
    if config.attention.impl not in IMPL_NAMES:
        raise ConfigError(
            f"config.attention.impl={config.attention.impl!r}; choose one of {', '.join(IMPL_NAMES)}."
        )
    if config.train.get("profile_from", 0) < 0 or config.train.get("profile_steps", 1) < 1:
        raise ConfigError(
            f"config.train.profile_from={config.train.profile_from} must be >= 0 (0: off) and "
            f"config.train.profile_steps={config.train.profile_steps} >= 1."
        )
    t = config.train
    for name, meaning in (("log_every", "steps between logged metrics"),
                          ("checkpoint_every", "steps between checkpoints; the last step always saves one"),
                          ("keep_checkpoints", "how many of the latest checkpoints stay on disk")):
        value = t.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"config.train.{name}={value!r} must be a whole number >= 1 ({meaning}).")
    if t.get("eval_every", 0) < 0:
        raise ConfigError(f"config.train.eval_every={t.eval_every} must be >= 0 (0: only at the end).")
    accum = config.optim.grad_accum_steps
    if accum < 1 or d.batch_size % accum:
        raise ConfigError(
            f"config.data.batch_size={d.batch_size} must be a multiple of "
            f"config.optim.grad_accum_steps={accum}."
        )
    if config.train.nonfinite not in ("skip", "stop"):
        raise ConfigError(
            f"config.train.nonfinite={config.train.nonfinite!r}; choose 'skip' or 'stop'."
        )
    nan_steps = config.train.get("debug_nan_steps", ()) or ()
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in nan_steps):
        raise ConfigError(
            f"config.train.debug_nan_steps={tuple(nan_steps)!r} must hold step numbers >= 1 "
            "(it injects NaNs for testing; leave it empty in real runs)."
        )
    # Shapes within the model (pos_shape against seq_len, heads dividing d_model, remat
    # policy, dtypes) are checked where they are used, when the model is built.


def long_run_defaults(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Settings the paper-scale configs share: bf16 with remat, scanned layers, 5,000
    warmup steps, and logging, evaluation and checkpoint intervals suited to runs of
    100k+ steps."""
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.model.scan_layers = True
    c.optim.learning_rate = 3.5e-4
    c.optim.warmup_steps = 5000
    c.train.log_every = 100
    c.train.eval_every = 5000
    c.train.checkpoint_every = 1000
    return c


def smoke_defaults(c: ml_collections.ConfigDict, *, num_steps: int = 20) -> ml_collections.ConfigDict:
    """A tiny float32 model and a short schedule: the ``smoke`` variants used by CPU tests."""
    c.model.num_layers = 2
    c.model.dropout = 0.0
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = max(5, num_steps // 10)
    c.train.num_steps = num_steps
    c.train.log_every = max(5, num_steps // 10)
    c.train.eval_every = 0
    c.train.eval_max_batches = 2
    c.train.checkpoint_every = max(10, num_steps // 2)
    return c
