"""The three entry points, run as a user runs them, on each kind of data."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile
from PIL import Image

from tests.helpers import REPO_ROOT

DATA_PATHS = {
    "enwik8": "text/enwik8_first_1MB.xml",
    "cifar10": "cifar10-sample/cifar-10-batches-bin",
    "audio": "audio/spoken_digits",
}


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / f"{name}.py"), *args],
        capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "HOME": str(REPO_ROOT / ".." )},
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module", params=["enwik8", "cifar10", "audio"])
def trained(request, tmp_path_factory, shared_data):
    """A two-step smoke run of each config, trained through scripts/train.py."""
    name = request.param
    workdir = tmp_path_factory.mktemp(name)
    flags = [
        f"--config=configs/{name}.py:smoke", f"--workdir={workdir}",
        f"--config.data.path={shared_data / DATA_PATHS[name]}",
        "--config.train.num_steps=2", "--config.train.log_every=1",
        "--config.train.eval_every=0", "--config.train.eval_max_batches=1",
    ]
    out = run_script("train", *flags)
    assert "Done at step 2" in out.stdout
    return name, workdir, flags[:3]


def test_evaluate_writes_the_figure_to_json(trained):
    name, workdir, flags = trained
    out = run_script("evaluate", *flags, "--split=test", "--max_batches=1")
    # The first batch only: a partial result, named so (never the whole split's file).
    result = json.loads((workdir / "eval_test_2_b1.json").read_text())
    assert result["step"] == 2 and result["split"] == "test" and result["max_batches"] == 1
    assert not (workdir / "eval_test_2.json").exists()
    assert 0 < result["bits_per_byte"] < 9 and result["num_bytes"] > 0
    assert f"{result['bits_per_byte']:.4f}" in out.stdout


def test_sample_writes_the_data_sets_format(trained, tmp_path):
    name, workdir, flags = trained
    length = {"enwik8": 64, "cifar10": 3072, "audio": 256}[name]
    out_dir = tmp_path / "samples"
    run_script(
        "sample", *flags, "--num_samples=2", f"--length={length}", f"--output={out_dir}",
        "--prompt_from_split=valid", "--temperature=1.0",
    )
    manifest = json.loads((out_dir / "samples_step2.json").read_text())
    # Half of each sample is prompt (sample.prompt_fraction), whole rows for images.
    assert manifest["length"] == length and manifest["prompt_length"] == length // 2
    files = [p for p in out_dir.iterdir() if p.suffix != ".json"]
    if name == "enwik8":
        assert sorted(p.suffix for p in files) == [".txt", ".txt"]
        assert all(p.stat().st_size == length for p in files)
    elif name == "cifar10":
        (png,) = files
        with Image.open(png) as image:
            image.load()
            assert image.format == "PNG" and image.mode == "RGB"
            assert image.width >= 2 * 32 and image.height >= 32
    else:
        assert sorted(p.suffix for p in files) == [".wav", ".wav"]
        for wav in files:
            audio, rate = soundfile.read(wav)
            assert rate == 8000 and audio.shape == (length,)
            assert np.all(np.abs(audio) <= 1.0) and np.abs(audio).max() > 0
