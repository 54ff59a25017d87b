"""CIFAR-10 as 3,072-byte sequences at the paper's settings (2.80 bits per dim).

128 layers, 2 heads, d_model 256, half-size feed-forward and query/key projections,
strided pattern with l = 96 (one image row: 32 pixels x 3 channels), learning rate
3.5e-4, dropout 0.25. Row, column and channel position embeddings.

Variants: (none) the paper's model; ``small`` 8 layers; ``smoke`` tiny, on the 4,000
real images of the shared sample data ($SPARSE_LM_SHARED_DATA, else shared/data beside
the repository), for CPU tests.
"""

from sparse_lm.config import ConfigError, base_config, long_run_defaults, shared_data_path, smoke_defaults


def get_config(variant: str = ""):
    c = long_run_defaults(base_config())
    c.data.name = "cifar10"
    c.data.path = "data/cifar10"  # cifar-10-binary.tar.gz or cifar-10-batches-bin/
    c.data.seq_len = 3072
    c.data.batch_size = 16
    c.data.eval_batch_size = 32
    c.data.flip = True
    c.model.num_layers = 128
    c.model.d_model = 256
    c.model.num_heads = 2
    c.model.ff_ratio = 2.0
    c.model.qk_ratio = 0.5
    c.model.dropout = 0.25
    c.model.pos_shape = (32, 32, 3)  # row, column, channel
    c.attention.pattern = "strided"
    c.attention.stride = 96
    c.attention.combine = "merged"
    c.optim.learning_rate = 3.5e-4
    c.train.num_steps = 300_000
    c.sample.length = 3072
    if variant == "small":
        c.model.num_layers = 8
        c.model.dropout = 0.0
    elif variant == "smoke":
        smoke_defaults(c)
        c.data.path = shared_data_path("cifar10-sample", "cifar-10-batches-bin")
        c.data.batch_size = 4
        c.data.eval_batch_size = 16
        c.model.d_model = 32
    elif variant:
        raise ConfigError(f"unknown cifar10 config variant {variant!r}; use '', 'small' or 'smoke'.")
    return c
