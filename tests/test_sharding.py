"""The mesh and batch placement, specified by what must hold (CPU; 4 virtual devices in
a subprocess, since the device count is fixed when JAX starts)."""

from __future__ import annotations

import ml_collections
import pytest

from sparse_lm.sharding import MeshError, mesh_shape
from tests.helpers import run_python


@pytest.mark.parametrize("sizes,problem", [
    ((-1, 0, 1), "config.mesh.fsdp=0"),
    ((-2, -2, 2), "config.mesh.data=-2"),
    ((2, 2.0, 1), "config.mesh.fsdp=2.0"),
    ((-1, -1, 1), "at most one"),
    ((3, 1, 1), "uses 3 devices but 8"),
])
def test_a_mesh_size_that_cannot_be_used_is_refused_naming_the_field(sizes, problem):
    cfg = ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"), sizes)))
    with pytest.raises(MeshError, match=problem):
        mesh_shape(cfg, 8)


def test_every_host_must_hold_the_batch_rows_it_reads():
    """Two simulated hosts of two devices each: a host reads rows [p * L, (p + 1) * L)
    of every batch, so meshes that split rows by host pass, and a mesh whose batch is
    replicated across hosts (tensor over all four devices) is refused, instead of
    training on 'replicated' rows that differ from host to host."""
    out = run_python("""
        import json
        import jax, ml_collections
        from sparse_lm import sharding

        host = lambda device: device.id // 2  # devices 0, 1 on host 0; 2, 3 on host 1
        verdicts = {}
        for data, fsdp, tensor in [(4, 1, 1), (2, 2, 1), (2, 1, 2), (1, 1, 4), (1, 2, 2)]:
            mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)))
            name = f"{data}x{fsdp}x{tensor}"
            for extra in (0, 1):  # rows as the first axis, or behind an accumulation axis
                try:
                    sharding.check_host_rows(mesh, 8, extra, process_of=host)
                    verdicts[f"{name}/{extra}"] = "ok"
                except sharding.MeshError as e:
                    verdicts[f"{name}/{extra}"] = str(e)
        print(json.dumps(verdicts))
    """, devices=4)
    for mesh in ("4x1x1", "2x2x1", "2x1x2", "1x2x2"):  # 1x2x2: tensor pairs within a host
        assert out[f"{mesh}/0"] == out[f"{mesh}/1"] == "ok", (mesh, out)
    for mesh in ("1x1x4",):
        for extra in (0, 1):
            assert "keep the tensor axis within a host" in out[f"{mesh}/{extra}"], out
            assert "each host reads its own 4-row block" in out[f"{mesh}/{extra}"]
