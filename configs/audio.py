"""Raw audio at 12 kHz, 8-bit mu-law, context 65,536, strided pattern (paper: 1.97 bits per byte).

The paper reports a 152M-parameter model; 12 layers of d_model 1,024 with 4x
feed-forward have about that many (12 * 12 * 1024^2 = 151M). l = 256 = sqrt(65,536).

Variants: (none) that model; ``small`` 4 layers of 512 for one-GPU checks; ``smoke``
tiny, on the real spoken-digit recordings in ../shared/data, for CPU tests.
"""

from sparse_lm.config import base_config


def get_config(variant: str = ""):
    c = base_config()
    c.data.name = "audio"
    c.data.path = "data/audio"  # a folder (or glob) of WAV, FLAC or OGG files
    c.data.sample_rate = 12000
    c.data.seq_len = 65536
    c.data.batch_size = 8
    c.data.eval_batch_size = 8
    c.model.num_layers = 12
    c.model.d_model = 1024
    c.model.num_heads = 16
    c.model.dropout = 0.0
    c.model.pos_shape = (256, 256)
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.attention.pattern = "strided"
    c.attention.stride = 256
    c.attention.combine = "merged"
    c.optim.learning_rate = 3.5e-4
    c.optim.warmup_steps = 5000
    c.train.num_steps = 100_000
    c.train.log_every = 100
    c.train.eval_every = 5000
    c.train.checkpoint_every = 1000
    c.sample.length = 65536
    if variant == "small":
        c.model.num_layers = 4
        c.model.d_model = 512
        c.model.num_heads = 8
    elif variant == "smoke":
        c.data.path = "../shared/data/audio/spoken_digits"
        c.data.sample_rate = 8000
        c.data.seq_len = 1024
        c.data.batch_size = 4
        c.data.eval_batch_size = 8
        c.model.num_layers = 2
        c.model.d_model = 32
        c.model.num_heads = 2
        c.model.pos_shape = (32, 32)
        c.model.dtype = "float32"
        c.model.remat = "none"
        c.attention.stride = 32
        c.optim.learning_rate = 3e-3
        c.optim.warmup_steps = 5
        c.train.num_steps = 20
        c.train.log_every = 5
        c.train.eval_every = 0
        c.train.eval_max_batches = 2
        c.train.checkpoint_every = 10
        c.sample.length = 1024
    elif variant:
        raise ValueError(f"unknown audio config variant {variant!r}; use '', 'small' or 'smoke'.")
    return c
