"""Raw audio at 12 kHz, 8-bit mu-law, context 65,536, strided pattern (paper: 1.97 bits per byte).

The paper reports a 152M-parameter model; 12 layers of d_model 1,024 with 4x
feed-forward have about that many (12 * 12 * 1024^2 = 151M). l = 256 = sqrt(65,536).

Variants: (none) that model; ``small`` 4 layers of 512 for one-GPU checks; ``smoke``
tiny, on the real spoken-digit recordings of the shared sample data
($SPARSE_LM_SHARED_DATA, else shared/data beside the repository), for CPU tests.
"""

from sparse_lm.config import ConfigError, base_config, long_run_defaults, shared_data_path, smoke_defaults


def get_config(variant: str = ""):
    c = long_run_defaults(base_config())
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
    c.attention.pattern = "strided"
    c.attention.stride = 256
    c.attention.combine = "merged"
    c.train.num_steps = 100_000
    c.sample.length = 65536
    if variant == "small":
        c.model.num_layers = 4
        c.model.d_model = 512
        c.model.num_heads = 8
    elif variant == "smoke":
        smoke_defaults(c)
        c.data.path = shared_data_path("audio", "spoken_digits")
        c.data.sample_rate = 8000
        c.data.seq_len = 1024
        c.data.batch_size = 4
        c.data.eval_batch_size = 8
        c.model.d_model = 32
        c.model.num_heads = 2
        c.model.pos_shape = (32, 32)
        c.attention.stride = 32
        c.sample.length = 1024
    elif variant:
        raise ConfigError(f"unknown audio config variant {variant!r}; use '', 'small' or 'smoke'.")
    return c
