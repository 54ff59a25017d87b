"""scripts/plot_runs.py turns run folders into a PNG and a table of final figures."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image

from tests.helpers import REPO_ROOT


def fake_run(folder, curve):
    """A run folder as scripts/train.py writes it, with the given (step, bpb) evaluations."""
    folder.mkdir()
    with (folder / "metrics.jsonl").open("w") as f:
        f.write(json.dumps({"step": 1, "kind": "train", "time": 1000.0, "loss": 5.0}) + "\n")
        for step, bpb in curve:
            f.write(json.dumps({"step": step, "kind": "eval_valid", "time": 1000.0 + 6 * step,
                                "bits_per_byte": bpb, "num_bytes": 10}) + "\n")
    return folder


def test_plot_runs_writes_png_and_table(tmp_path):
    a = fake_run(tmp_path / "dense", [(10, 3.0), (20, 2.5)])
    b = fake_run(tmp_path / "strided", [(10, 3.1), (20, 2.4), (30, 2.2)])
    out = tmp_path / "plot.png"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "plot_runs.py"), str(a), str(b), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 500
    lines = result.stdout.splitlines()
    assert lines[1].split() == ["dense", "20", "2.0", "2.5000", "2.5000"]
    assert lines[2].split() == ["strided", "30", "3.0", "2.2000", "2.2000"]


def test_a_folder_without_metrics_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "plot_runs.py"), str(tmp_path / "empty"),
         "--out", str(tmp_path / "x.png")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "has no metrics.jsonl" in result.stderr


def test_a_last_line_cut_short_by_a_kill_is_ignored(tmp_path):
    run = fake_run(tmp_path / "killed", [(10, 3.0), (20, 2.5)])
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 30, "kind": "eval_va')  # the process died mid-write
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "plot_runs.py"), str(run), "--out", str(tmp_path / "p.png")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split() == ["killed", "20", "2.0", "2.5000", "2.5000"]


def test_wall_clock_counts_from_the_end_of_compilation(tmp_path):
    """Time starts at the ``compiled`` record: compilation is not training time."""
    from sparse_lm.plots import run_curve

    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": 1, "kind": "compiled", "time": 1030.0, "seconds": 30.0},
               {"step": 10, "kind": "train", "time": 1040.0, "loss": 5.0},
               {"step": 10, "kind": "eval_valid", "time": 1045.0, "bits_per_byte": 3.0, "num_bytes": 10}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run_curve(run) == ([10], [15.0], [3.0])


def test_a_resumed_run_counts_only_the_time_its_sessions_trained(tmp_path):
    """A run stopped at step 10 and resumed an hour later: its second session counts
    from its own ``compiled`` record, on top of the first session's 15 s."""
    from sparse_lm.plots import run_curve

    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": 1, "kind": "compiled", "time": 1030.0, "seconds": 30.0},
               {"step": 10, "kind": "eval_valid", "time": 1045.0, "bits_per_byte": 3.0, "num_bytes": 10},
               {"step": 11, "kind": "compiled", "time": 4700.0, "seconds": 40.0},
               {"step": 20, "kind": "eval_valid", "time": 4710.0, "bits_per_byte": 2.5, "num_bytes": 10}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run_curve(run) == ([10, 20], [15.0, 25.0], [3.0, 2.5])
