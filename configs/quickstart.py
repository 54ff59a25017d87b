"""Quickstart: a small strided Sparse Transformer on real text that needs no download.

The corpus is the Python standard library's own source files (every Python install
holds them), 2 MB of them. Trains in a few minutes on 2 CPU cores.

    python scripts/train.py --config configs/quickstart.py --workdir runs/quickstart
"""

from sparse_lm.config import base_config


def get_config():
    c = base_config()
    c.data.name = "pystdlib"
    c.data.max_bytes = 2_000_000
    c.data.seq_len = 256
    c.data.batch_size = 16
    c.data.eval_batch_size = 64
    c.model.num_layers = 2
    c.model.d_model = 128
    c.model.num_heads = 4
    c.model.pos_shape = (16, 16)
    c.attention.pattern = "strided"
    c.attention.stride = 16
    c.attention.combine = "merged"
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 30
    c.train.num_steps = 300
    c.train.log_every = 20
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.sample.num_samples = 2
    c.sample.length = 256
    c.sample.temperature = 0.8
    return c
