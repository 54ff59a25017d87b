"""scripts/bench_scaling.py on two virtual CPU devices: what it measures and what it writes.

The speed-up itself means nothing on CPU (the two "devices" share the cores); these
tests pin down the report's structure, that the N-device meshes train to the same
float32 losses as one device, and that a run cut short still reports.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO_ROOT, script_env

SCRIPT = REPO_ROOT / "scripts" / "bench_scaling.py"


def command(shared_data, out, *flags: str) -> list[str]:
    return [
        sys.executable, str(SCRIPT), "--config", str(REPO_ROOT / "configs" / "enwik8.py") + ":smoke",
        f"--config.data.path={shared_data / 'text' / 'enwik8_first_1MB.xml'}",
        "--per_device_batch=2", f"--out={out}", *flags,
    ]


@pytest.fixture(scope="module")
def smoke_run(shared_data, tmp_path_factory):
    """One --smoke run on 2 devices: (the JSON report, the printed output)."""
    out = tmp_path_factory.mktemp("scaling") / "scaling.json"
    result = subprocess.run(
        command(shared_data, out, "--smoke"),
        capture_output=True, text=True, timeout=300, env=script_env(devices=2), cwd=REPO_ROOT,
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return json.loads(out.read_text()), result.stdout


def test_each_mesh_gets_a_throughput_row_with_the_same_rows_per_device(smoke_run):
    report, _ = smoke_run
    assert report["device_count"] == 2 and report["status"] == "complete"
    rows = {r["mesh"]: r for r in report["throughput"]}
    assert list(rows) == ["1 device", "data", "fsdp"]
    assert [rows[m]["devices"] for m in rows] == [1, 2, 2]
    assert all(r["per_device_batch"] == 2 for r in rows.values())
    assert [rows[m]["global_batch"] for m in rows] == [2, 4, 4]
    assert rows["data"]["mesh_shape"] == {"data": 2, "fsdp": 1, "tensor": 1}
    assert rows["fsdp"]["mesh_shape"] == {"data": 1, "fsdp": 2, "tensor": 1}
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and len(r["step_times_s"]) == report["steps"] == 3
        assert r["speedup_vs_one_device"] == pytest.approx(r["tokens_per_s"] / rows["1 device"]["tokens_per_s"])


def test_data_and_fsdp_train_to_the_one_device_losses_in_float32(smoke_run):
    report, _ = smoke_run
    assert report["config_summary"]["dtype"] == "float32"
    rows = {r["mesh"]: r for r in report["losses"]}
    assert list(rows) == ["1 device", "data", "fsdp"]
    # Every mesh trained on the same global batch: the 1-device mesh takes both devices' rows.
    assert {r["global_batch"] for r in rows.values()} == {report["loss_batch"]} == {4}
    one = rows["1 device"]["losses"]
    assert len(one) == report["loss_steps"] == 3
    # The shortened warm-up makes the updates move the loss, so later steps test them.
    assert one[-1] < one[0] - 0.1
    for mesh in ("data", "fsdp"):
        assert rows[mesh]["losses"] == pytest.approx(one, rel=1e-4)
        assert rows[mesh]["max_rel_diff_vs_one_device"] < 1e-4
        assert rows[mesh]["within_tolerance"] and report["verdicts"][mesh]["losses_met"]
        # Same shapes as its throughput step: nothing compiled twice.
        assert rows[mesh]["reused_throughput_executable"]


def test_the_report_names_what_was_run(smoke_run):
    report, _ = smoke_run
    assert report["jax_version"] and report["device_kind"] and "--smoke" in report["argv"]
    assert report["config"]["model"]["num_layers"] == report["config_summary"]["num_layers"] == 2
    assert report["config_summary"]["lr_warmup_steps"] == 2


def test_the_table_comes_last(smoke_run):
    _, stdout = smoke_run
    tail = stdout[stdout.index("JSON: "):].splitlines()
    assert tail[2].split()[:3] == ["mesh", "dev", "batch"]
    assert [line.split()[0] for line in tail[3:6]] == ["1", "data", "fsdp"]
    assert tail[-2].startswith("targets (speed-up >= 1.80x")
    assert tail[-1].startswith("status: complete")


def test_sigterm_mid_run_still_writes_the_json_and_prints_the_table(shared_data, tmp_path):
    out = tmp_path / "scaling.json"
    # Endless timing on the 1-device mesh, so the signal lands inside its row.
    proc = subprocess.Popen(
        command(shared_data, out, "--steps=1000000", "--warmup=1"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=script_env(devices=2), cwd=REPO_ROOT,
    )
    try:
        for line in proc.stdout:  # the first line is logged once SIGTERM is handled
            if "rows per device" in line:
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1
    report = json.loads(out.read_text())
    assert report["status"] == "interrupted (signal 15)"
    assert report["throughput"] == [{"mesh": "1 device", "error": "interrupted (signal 15)"}]
    assert stdout.rstrip().splitlines()[-1].startswith("status: interrupted")
