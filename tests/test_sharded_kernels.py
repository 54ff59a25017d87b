"""Kernels compose with the sharded train step: same losses as the reference on one device.

XLA cannot partition a Pallas call, so under a mesh the kernels run per shard
(``attention.adapt`` for the GPU kernel, ``pallas_tpu.shard_attention`` for TPU). Both
run here in interpret mode on 4 virtual CPU devices with a (data=2, tensor=2) mesh.
"""

from __future__ import annotations

import numpy as np

from tests.helpers import run_python

_RUNS = """
import json, jax, tempfile
from pathlib import Path
from tests.helpers import smoke_config
from sparse_lm.metrics import read_metrics
from sparse_lm.train import train_and_evaluate
# Imported before the first trace: a kernel module imported during it adds JAX config
# state to the tracing context, so the first run's step 2 would trace and compile again.
import sparse_lm.attention.pallas_gpu, sparse_lm.attention.pallas_tpu
out = {{"devices": jax.device_count()}}
for impl, combine in {cases!r}:
    # Smaller than the smoke config where the property does not depend on size (the
    # interpreted kernels' cost grows with the rows and positions): 4 rows of 256 bytes
    # still split over data=2, the fixed pattern (stride 32) still has 8 blocks, and the
    # final evaluation, which the test does not compare, reads one batch of 4.
    cfg = smoke_config("enwik8", Path({data!r}), **{{
        "train.num_steps": 2, "train.log_every": 1, "train.eval_every": 0,
        "train.eval_max_batches": 1, "train.checkpoint_every": 100,
        "data.seq_len": 256, "model.pos_shape": (8, 32), "data.batch_size": 4,
        "data.eval_batch_size": 4,
        "train.async_checkpoint": False, "model.d_model": 128, "model.num_heads": 2,
        "attention.impl": impl, "attention.combine": combine,
        "mesh.data": {mesh[0]}, "mesh.fsdp": 1, "mesh.tensor": {mesh[1]},
    }})
    with tempfile.TemporaryDirectory() as workdir:
        train_and_evaluate(cfg, workdir)
        out[impl + "/" + combine] = [r["loss"] for r in read_metrics(workdir, "train")]
print(json.dumps(out))
"""


def test_kernels_under_a_data_and_tensor_mesh_match_the_reference(shared_data):
    reference = run_python(
        _RUNS.format(cases=[("reference", "merged"), ("reference", "multihead")],
                     data=str(shared_data), mesh=(1, 1)),
        devices=1,
    )
    kernels = run_python(
        _RUNS.format(
            cases=[("pallas_gpu", "merged"), ("pallas_gpu", "multihead"), ("pallas_tpu", "merged")],
            data=str(shared_data), mesh=(2, 2),
        ),
        devices=4,
    )
    assert kernels["devices"] == 4
    for impl in ("pallas_gpu", "pallas_tpu"):
        for combine in ("merged", "multihead"):
            key = f"{impl}/{combine}"
            if key in kernels:
                assert len(kernels[key]) == 2
                np.testing.assert_allclose(
                    kernels[key], reference[f"reference/{combine}"], rtol=2e-5, err_msg=key
                )


def test_heads_are_split_only_where_every_tensor_shard_has_the_same_pattern():
    from jax.sharding import AbstractMesh

    from sparse_lm.attention import PatternSpec
    from sparse_lm.attention.adapt import head_shards

    mesh = AbstractMesh((2, 1, 2), ("data", "fsdp", "tensor"))
    merged = PatternSpec("fixed", 16, 4, "merged").layer_pattern(0, 4)
    multihead = PatternSpec("fixed", 16, 4, "multihead").layer_pattern(0, 4)
    distinct = PatternSpec("fixed", 16, 4, "merged", distinct_summaries=True).layer_pattern(0, 4)
    assert head_shards(merged, mesh) == 2
    assert head_shards(multihead, mesh) == 1  # heads 0-1 use A1, heads 2-3 use A2
    # Offsets cycle over l // c = 4 sub-blocks: heads 0-1 and 2-3 read different ones.
    assert head_shards(distinct, mesh) == 1
    assert head_shards(merged[:3], mesh) == 1  # 3 heads do not split in 2


def test_half_size_query_key_heads_match_the_reference_through_a_kernel():
    import jax
    import jax.numpy as jnp

    from sparse_lm.attention import PatternSpec, attention, reference_attention

    pattern = PatternSpec("strided", 16, combine="merged").layer_pattern(0, 2)
    kq, kk, kv = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(kq, (2, 64, 2, 16))
    k = jax.random.normal(kk, (2, 64, 2, 16))
    v = jax.random.normal(kv, (2, 64, 2, 32))
    ref = reference_attention(q, k, v, pattern)
    out = attention(q, k, v, pattern, impl="pallas_gpu")
    assert out.shape == v.shape
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 1e-5
    grads = jax.grad(lambda q, k: attention(q, k, v, pattern, impl="pallas_gpu").sum(), (0, 1))(q, k)
    ref_grads = jax.grad(lambda q, k: reference_attention(q, k, v, pattern).sum(), (0, 1))(q, k)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        assert float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r)) < 1e-5
