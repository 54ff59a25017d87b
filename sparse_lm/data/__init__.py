"""Data: every data set as fixed-length byte sequences (vocabulary 256).

``load_split(data_cfg, split)`` gives a ``ByteSource``; ``TrainIterator`` turns it into
shuffled, host-sharded, resumable training batches and ``eval_batches`` into weighted
batches that cover every byte of a split once.
"""

from sparse_lm.data.audio import AudioReadWarning, load_audio
from sparse_lm.data.cifar10 import IMAGE_BYTES, IMAGE_SHAPE, load_cifar10
from sparse_lm.data.enwik8 import load_enwik8
from sparse_lm.data.errors import DataError
from sparse_lm.data.loader import NAMES, load_split
from sparse_lm.data.mulaw import mulaw_decode, mulaw_encode
from sparse_lm.data.pipeline import TrainIterator, eval_batches
from sparse_lm.data.resample import resample
from sparse_lm.data.source import ByteSource
from sparse_lm.data.splits import SPLITS
from sparse_lm.data.text import load_pystdlib, load_text

__all__ = [
    "IMAGE_BYTES",
    "IMAGE_SHAPE",
    "NAMES",
    "SPLITS",
    "AudioReadWarning",
    "ByteSource",
    "DataError",
    "TrainIterator",
    "eval_batches",
    "load_audio",
    "load_cifar10",
    "load_enwik8",
    "load_pystdlib",
    "load_split",
    "load_text",
    "mulaw_decode",
    "mulaw_encode",
    "resample",
]
