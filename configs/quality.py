"""Dense against sparse on real data: one model size and schedule, three attention patterns.

``--config configs/quality.py:SUITE,PATTERN[,smoke]`` with

  SUITE    text     the Python standard library's sources (the quickstart's corpus), T=2,048
           enwik8   the real 1 MB enwik8 sample in ../shared/data, T=12,288 (the paper's)
           cifar10  the real 4,000-image CIFAR-10 sample, T=3,072 (one image)
           music    the real orchestral Ogg tracks, 12 kHz mu-law, T=65,536
  PATTERN  dense | strided | fixed (merged heads; the paper's strides for each length)
  smoke    tiny model and a few steps, for CPU tests of the comparison itself

Data paths start at ``$SPARSE_LM_SHARED_DATA`` (default: ``shared/data`` beside the
repository).

Within a suite only ``attention.pattern`` differs, so the runs compare patterns at equal
model size, data and steps; ``scripts/compare_patterns.py`` runs a suite's patterns and
plots them. On GPU ``attention.impl=auto`` gives dense layers cuDNN's fused kernel and
sparse ones the block-sparse Pallas kernel: each pattern at its fastest, for the
wall-clock comparison.

The sample data are small: enwik8's 1 MB and CIFAR's 3,500 training images are seen
several times within a run, so the validation curves show the patterns' relative
standing early in training, not the paper's converged figures.
"""

from sparse_lm.config import ConfigError, base_config, shared_data_path, smoke_defaults

SUITES = ("text", "enwik8", "cifar10", "music")
PATTERNS = ("dense", "strided", "fixed")
# The real sample data: $SPARSE_LM_SHARED_DATA (as for the tests), else shared/data beside
# the repository, wherever the command runs from.
SHARED = shared_data_path()


def _suite(c, suite: str) -> None:
    """Data, model and schedule of a suite (GPU sizes: a minute or two per run on an H100)."""
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True
    c.model.num_layers = 4
    c.model.d_model = 256
    c.model.num_heads = 4
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 50
    c.train.log_every = 25
    c.train.eval_every = 100
    c.train.eval_max_batches = 16
    c.train.checkpoint_every = 100_000  # the final step is always saved
    c.train.keep_checkpoints = 1
    if suite == "text":
        c.data.name = "pystdlib"
        c.data.max_bytes = 24_000_000
        c.data.seq_len = 2048
        c.data.batch_size = 16
        c.data.eval_batch_size = 16
        c.model.pos_shape = (32, 64)
        c.attention.stride, c.attention.summary = 64, 16
        c.train.num_steps = 2000
        c.train.eval_every = 200
        c.sample.length = 2048
    elif suite == "enwik8":
        c.data.name = "enwik8"
        c.data.path = f"{SHARED}/text/enwik8_first_1MB.xml"
        c.data.seq_len = 12288
        c.data.batch_size = 2
        c.data.eval_batch_size = 2
        c.model.dropout = 0.1  # 1 MB of text: several epochs within the run
        c.model.pos_shape = (96, 128)
        c.attention.stride, c.attention.summary = 128, 32  # the paper's enwik8 setting
        c.train.num_steps = 600
        c.sample.length = 4096
    elif suite == "cifar10":
        c.data.name = "cifar10"
        c.data.path = f"{SHARED}/cifar10-sample/cifar-10-batches-bin"
        c.data.seq_len = 3072
        c.data.batch_size = 16
        c.data.eval_batch_size = 16
        c.data.flip = True
        c.model.num_layers = 8
        c.model.num_heads = 2
        c.model.ff_ratio = 2.0
        c.model.qk_ratio = 0.5
        c.model.dropout = 0.1
        c.model.pos_shape = (32, 32, 3)
        c.attention.stride, c.attention.summary = 96, 24  # l = one image row
        c.train.num_steps = 800
        c.sample.length = 3072
        c.sample.num_samples = 16
    elif suite == "music":
        c.data.name = "audio"
        c.data.path = f"{SHARED}/audio/music"
        c.data.sample_rate = 12000
        c.data.split_by = "time"  # four tracks: cut each in time rather than by file
        c.data.seq_len = 65536
        c.data.batch_size = 1
        c.data.eval_batch_size = 1
        c.model.pos_shape = (256, 256)
        c.model.remat = "full"
        c.attention.stride, c.attention.summary = 256, 64
        c.train.num_steps = 300
        c.train.eval_every = 50
        c.sample.length = 65536
        c.sample.num_samples = 1
    else:
        raise ConfigError(f"unknown quality suite {suite!r}; use one of {', '.join(SUITES)}.")


def _smoke(c, suite: str) -> None:
    """CPU-sized: the same data and patterns, a tiny float32 model, a few steps."""
    smoke_defaults(c, num_steps=12)
    c.model.num_layers = 2
    c.model.d_model = 32
    c.model.num_heads = 2
    c.model.scan_layers = True
    c.data.batch_size = 2
    c.data.eval_batch_size = 4
    c.train.log_every = 4
    c.train.eval_every = 6
    c.train.eval_max_batches = 1
    c.sample.num_samples = 1
    if suite == "text":
        c.data.max_bytes = 200_000
        c.data.seq_len, c.model.pos_shape = 256, (16, 16)
        c.attention.stride, c.attention.summary = 16, 4
    elif suite == "enwik8":
        c.data.seq_len, c.model.pos_shape = 512, (16, 32)
        c.attention.stride, c.attention.summary = 32, 8
    elif suite == "cifar10":
        c.data.batch_size = 2
        c.attention.stride, c.attention.summary = 96, 24
    elif suite == "music":
        c.data.seq_len, c.model.pos_shape = 1024, (32, 32)
        c.attention.stride, c.attention.summary = 32, 8
    c.sample.length = min(c.sample.length, c.data.seq_len)


def get_config(arg: str = "text,strided"):
    parts = [p.strip() for p in arg.split(",") if p.strip()]
    smoke = "smoke" in parts
    parts = [p for p in parts if p != "smoke"]
    if len(parts) != 2 or parts[0] not in SUITES or parts[1] not in PATTERNS:
        raise ConfigError(
            f"configs/quality.py takes 'SUITE,PATTERN[,smoke]' with SUITE one of "
            f"{', '.join(SUITES)} and PATTERN one of {', '.join(PATTERNS)}; got {arg!r}, "
            "e.g. configs/quality.py:enwik8,fixed."
        )
    suite, pattern = parts
    c = base_config()
    _suite(c, suite)
    if smoke:
        _smoke(c, suite)
    c.attention.pattern = pattern
    c.attention.combine = "merged"
    return c
