"""Decoding split over the data-parallel devices gives the same samples as on one device."""

from __future__ import annotations

from tests.helpers import run_python

_DECODE = """
import json, jax, numpy as np
from flax import nnx
from tests.test_decode import tiny_config
from sparse_lm import decode
from sparse_lm.model import build_model
from sparse_lm.sharding import make_mesh
import ml_collections
model = build_model(tiny_config("fixed", "merged"), nnx.Rngs(0))
prompt = np.arange(8 * 5, dtype=np.int32).reshape(8, 5) % 256
mesh = make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
kw = dict(batch_size=8, length=32, prompt=prompt, temperature={temperature}, seed=3,
          cache_dtype=np.float32, chunk_size=9)
plain = decode.generate(model, **kw)
decoder = decode.Decoder(model, batch_size=8, length=32, cache_dtype=np.float32, mesh=mesh)
state = decoder.init(prompt)
layout = str(state.cache[0][0].sharding.spec)
sharded = decode.generate(model, mesh=mesh, **kw)
print(json.dumps({{"devices": jax.device_count(), "layout": layout,
                  "same": bool((plain == sharded).all()), "prompt_kept": bool((sharded[:, :5] == prompt).all())}}))
"""


def test_sharded_greedy_and_sampled_decoding_match_one_device():
    for temperature in (0.0, 1.0):
        out = run_python(_DECODE.format(temperature=temperature), devices=4)
        assert out["devices"] == 4
        assert "data" in out["layout"]  # the cache really is split over the batch
        assert out["same"] and out["prompt_kept"], out
