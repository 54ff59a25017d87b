"""enwik8 at the paper's settings (Child et al. 2019, table 2: 0.99 bits per byte).

30 layers, d_model 512, 8 heads, context 12,288, fixed pattern l=128, c=32 with merged
heads, dropout 0.4, 5,000 warmup steps then cosine decay, gradient clipping 1.0,
weight decay 0.01.

Variants (``--config configs/enwik8.py:VARIANT``):
  (none)  the paper's model.
  small   4 layers, same context and pattern: GPU checks and benchmarks.
  smoke   2 tiny layers at context 512 on the 1 MB sample in the shared sample data
          ($SPARSE_LM_SHARED_DATA, else shared/data beside the repository): CPU tests.
"""

from sparse_lm.config import ConfigError, base_config, long_run_defaults, shared_data_path, smoke_defaults


def get_config(variant: str = ""):
    c = long_run_defaults(base_config())
    c.data.name = "enwik8"
    c.data.path = "data/enwik8"  # the file, enwik8.zip, or a folder holding either
    c.data.seq_len = 12288
    c.data.batch_size = 16
    c.data.eval_batch_size = 16
    c.model.num_layers = 30
    c.model.d_model = 512
    c.model.num_heads = 8
    c.model.dropout = 0.4
    c.model.pos_shape = (96, 128)  # rows x columns of width l
    # The attention kernel outside remat (its forward runs once): 378 vs 413 ms per step
    # at batch 8 on an H200, for 21.6 instead of 10.4 GiB (BENCHMARKS.md, session 4);
    # about twice that at this config's batch 16: it fits an 80 GB card.
    c.model.remat = "save_attention"
    # Layers unrolled, not scanned: no per-layer slice copies of the scan's stacked
    # buffers, 366 vs 376-380 ms per step at batch 8 on an H200, for a 75 s compile instead
    # of 13 s (BENCHMARKS.md, session 5), which a run of many hours earns back. Where
    # memory allows (35 GiB at batch 8, so ~70 GiB at batch 16: an H200, not an 80 GB
    # card), --config.model.remat=save_attention_dots also keeps the matmul outputs:
    # 344 ms per step. At batch 8 on an H200, remat=none with
    # --config.model.residual_dtype=bfloat16: 279 ms in 62 GiB (BENCHMARKS.md, session 13).
    c.model.scan_layers = False
    c.attention.pattern = "fixed"
    c.attention.stride = 128
    c.attention.summary = 32
    c.attention.combine = "merged"
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0
    c.train.num_steps = 200_000
    c.train.eval_max_batches = 0
    c.sample.length = 12288
    if variant == "small":
        c.model.num_layers = 4
        c.model.remat = "full"  # as in the two-GPU scaling rows of BENCHMARKS.md
        c.model.dropout = 0.0
        c.data.batch_size = 8
    elif variant == "smoke":
        smoke_defaults(c, num_steps=200)
        # Scanned, as the paper-size configs were before enwik8 unrolled its layers: the
        # resume, mesh and multi-host tests that use this variant keep covering the scan.
        c.model.scan_layers = True
        c.data.path = shared_data_path("text", "enwik8_first_1MB.xml")
        c.data.seq_len = 512
        c.data.batch_size = 8
        c.data.eval_batch_size = 32
        c.model.d_model = 64
        c.model.num_heads = 2
        c.model.pos_shape = (16, 32)
        c.attention.stride = 32
        c.attention.summary = 8
        c.optim.warmup_steps = 20
        c.train.log_every = 20
        c.train.eval_every = 100
        c.train.eval_max_batches = 0
        c.train.checkpoint_every = 100
        c.sample.length = 512
    elif variant:
        raise ConfigError(f"unknown enwik8 config variant {variant!r}; use '', 'small' or 'smoke'.")
    return c
