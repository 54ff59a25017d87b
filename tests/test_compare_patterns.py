"""scripts/compare_patterns.py: dense against sparse on real data, plotted, tabled and sampled."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from configs import quality
from sparse_lm.config import ConfigError
from sparse_lm.metrics import read_metrics
from tests.helpers import REPO_ROOT

SCRIPT = str(REPO_ROOT / "scripts" / "compare_patterns.py")


def run_compare(folder, shared_data, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs the script on the real sample data into ``folder``; returns the finished process."""
    return subprocess.run(
        [sys.executable, SCRIPT, "--workdir", str(folder / "runs"), "--plots",
         str(folder / "plots"), *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
        env={**os.environ, "SPARSE_LM_SHARED_DATA": str(shared_data)},
    )


@pytest.fixture
def compare(tmp_path, shared_data):
    """``run_compare`` into the test's tmp_path."""
    return lambda *args, **kwargs: run_compare(tmp_path, shared_data, *args, **kwargs)


@pytest.fixture(scope="module")
def dense_and_strided(tmp_path_factory, shared_data):
    """One comparison of two patterns on the text suite, with samples: (its folder, the
    finished process). Shared by the tests that read what such a run wrote."""
    folder = tmp_path_factory.mktemp("compare")
    return folder, run_compare(folder, shared_data, "--suites", "text", "--patterns", "dense,strided",
                               "--smoke", "--samples")


def test_suite_configs_differ_only_in_the_pattern():
    for suite in quality.SUITES:
        configs = {p: quality.get_config(f"{suite},{p}") for p in quality.PATTERNS}
        for pattern, c in configs.items():
            assert c.attention.pattern == pattern
            c.attention.pattern = "dense"
        dense = configs["dense"].to_dict()
        assert all(c.to_dict() == dense for c in configs.values()), suite


def test_suites_use_the_papers_context_lengths_and_real_data():
    assert quality.get_config("enwik8,fixed").data.seq_len == 12288
    assert quality.get_config("enwik8,fixed").attention.stride == 128
    assert quality.get_config("enwik8,fixed").attention.summary == 32
    assert quality.get_config("cifar10,strided").data.seq_len == 3072
    assert quality.get_config("music,strided").data.seq_len == 65536
    assert quality.get_config("music,dense").data.path.endswith("audio/music")
    assert quality.get_config("cifar10,dense").data.path.endswith("cifar-10-batches-bin")


def test_a_bad_config_argument_names_the_choices():
    with pytest.raises(ConfigError, match="SUITE,PATTERN"):
        quality.get_config("enwik8")
    with pytest.raises(ConfigError, match="text, enwik8, cifar10, music"):
        quality.get_config("imagenet,dense")


def test_compare_trains_each_pattern_plots_tables_and_samples_the_best(dense_and_strided):
    tmp_path, result = dense_and_strided
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "summary.json").read_text())
    text = summary["results"]["text"]
    assert set(text["runs"]) == {"dense", "strided"}
    for pattern, run in text["runs"].items():
        assert text["status"][pattern] == "done"
        assert run["steps"] == 12 and 0 < run["final_bpb"] < 8.5
        assert run["best_bpb"] <= run["final_bpb"] and run["tokens_per_second"] > 0
        # The evaluation the script reports is the one the run logged.
        logged = read_metrics(tmp_path / "runs" / "text" / pattern, "eval_valid")[-1]
        assert run["final_bpb"] == logged["bits_per_byte"]
    assert text["gap_to_dense"]["strided"] == pytest.approx(
        text["runs"]["strided"]["final_bpb"] - text["runs"]["dense"]["final_bpb"])
    with Image.open(tmp_path / "plots" / "text.png") as image:
        assert image.format == "PNG"
    table = (tmp_path / "plots" / "summary.md").read_text()
    assert "| text | dense | 12 |" in table and "| text | strided | 12 |" in table
    best = min(text["runs"], key=lambda p: text["runs"][p]["final_bpb"])
    assert text["sample"]["pattern"] == best and text["sample"]["status"] == "done"
    samples = list((tmp_path / "plots" / "samples" / "text").glob("*.txt"))
    assert samples and all(s.stat().st_size > 0 for s in samples)


def test_runs_not_started_by_the_deadline_are_reported_not_run(tmp_path, compare):
    result = compare("--suites", "text", "--patterns", "fixed", "--smoke", "--deadline_s", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "summary.json").read_text())
    assert summary["results"]["text"]["status"] == {"fixed": "not run"}
    assert "| text | fixed | not run |" in (tmp_path / "plots" / "summary.md").read_text()


def test_unknown_suite_is_refused_with_the_choices(tmp_path, compare):
    result = compare("--suites", "speech")
    assert result.returncode == 2
    assert "unknown speech; choose from text, enwik8, cifar10, music" in result.stderr


@pytest.mark.parametrize("pattern", ["dense", "strided"])
def test_first_step_is_timed_apart_as_the_compilation(dense_and_strided, pattern):
    """Training logs one ``compiled`` record per process start; plots count time from it.

    Read from the runs of the comparison above (each pattern's run is its own process)
    rather than from a comparison started for this test alone.
    """
    tmp_path, result = dense_and_strided
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(tmp_path / "runs" / "text" / pattern)
    compiled = [r for r in records if r["kind"] == "compiled"]
    assert len(compiled) == 1 and compiled[0]["step"] == 1 and compiled[0]["seconds"] > 0
    assert records[0]["kind"] == "compiled"
    later = [r for r in records if r["time"] >= compiled[0]["time"]]
    assert len(later) == len(records)


def test_sigterm_stops_the_runs_and_still_writes_the_summary(tmp_path, shared_data):
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, SCRIPT, "--workdir", str(tmp_path / "runs"), "--plots", str(tmp_path / "plots"),
         "--suites", "text", "--patterns", "dense,fixed", "--smoke"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        env={**os.environ, "SPARSE_LM_SHARED_DATA": str(shared_data)},
    )
    log = tmp_path / "runs" / "text" / "dense.log"
    for _ in range(600):  # until the first training has started
        if log.exists():
            break
        time.sleep(0.1)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    summary = json.loads((tmp_path / "runs" / "summary.json").read_text())
    status = summary["results"]["text"]["status"]
    assert status["dense"] in ("stopped at deadline", "done")
    assert status["fixed"] == "not run"
    assert (tmp_path / "plots" / "summary.md").exists()
