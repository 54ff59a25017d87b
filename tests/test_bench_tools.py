"""The GPU measurement scripts on CPU: bench_train's report, memory search and profile;
tune_attention's refusal off GPU; bench_dropout's comparison.

Speeds mean nothing here; these tests pin down what the scripts compute and write, so a
GPU session spends its time measuring, not debugging.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT, script_env


def run_script(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / name), *args],
                          capture_output=True, text=True, timeout=timeout, env=script_env(),
                          cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def smoke_report(shared_data, tmp_path_factory):
    """One --smoke run of bench_train.py with --find_max_batch and --profile, of an impl
    with an attention option set (as a GPU session compares kernel options)."""
    tmp = tmp_path_factory.mktemp("bench_train")
    out = tmp / "bt.json"
    result = run_script(
        "bench_train.py", "--smoke", "--impls", "auto+colaunch=false", f"--out={out}",
        f"--config=configs/enwik8.py:smoke",
        f"--config.data.path={shared_data / 'text' / 'enwik8_first_1MB.xml'}",
        "--find_max_batch", "--device_memory_gb=0.3", "--max_batch=64",
        f"--profile={tmp / 'prof'}", "--profile_steps=1")
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return json.loads(out.read_text()), result.stdout


def test_bench_train_reports_step_time_flops_and_memory(smoke_report):
    report, stdout = smoke_report
    (r,) = report["results"]
    assert r["resolved_impl"] == "reference" and r["batch_size"] == 8
    assert r["impl"] == "auto+colaunch=false" and r["attention_options"] == {"colaunch": False}
    assert report["config"]["attention"]["colaunch"] is True  # the base config, not the variant
    assert len(r["step_times_s"]) == 3 and r["step_s"] > 0 and r["pipelined_step_s"] > 0
    assert r["tokens_per_s"] == pytest.approx(8 * 512 / r["step_s"])
    assert r["flops"]["train_step"] == pytest.approx(
        8 * (3 * r["flops"]["matmul_fwd"] / 8 + 3.5 * r["flops"]["attention_fwd"] / 8))
    assert r["memory"]["estimated_peak_bytes"] > 0
    assert any(line.startswith("reference+colaunch=false ") for line in stdout.splitlines())


def test_bench_train_refuses_a_bad_impl_option_before_compiling(tmp_path):
    result = run_script("bench_train.py", "--smoke", "--impls", "auto,auto+fast",
                        f"--out={tmp_path / 'bt.json'}", timeout=120)
    assert result.returncode != 0
    assert "'fast' is not a boolean attention option" in result.stderr and "colaunch" in result.stderr
    assert "] compiled in" not in result.stderr + result.stdout and not (tmp_path / "bt.json").exists()


def test_max_batch_search_starts_at_the_timed_batch_and_brackets_the_limit(smoke_report):
    (r,) = smoke_report[0]["results"]
    found = r["max_batch"]
    tried = {int(k): v for k, v in found["tried"].items()}
    limit = found["limit_bytes"]
    assert limit == int(0.3 * 2**30)
    assert min(tried) == 8  # the timed batch, not 1: every probe is a full compile
    best = found["max_batch"]
    assert tried[best] <= limit
    # The next batch up (a multiple of the 1-device unit) was tried and did not fit,
    # or the search hit --max_batch.
    assert best == 64 or (best + 1 in tried and (tried[best + 1] is None or tried[best + 1] > limit))


def test_profile_off_gpu_is_reported_not_faked(smoke_report):
    (r,) = smoke_report[0]["results"]
    assert "no device kernel events" in r["profile"]["error"]


def test_tune_attention_refuses_to_run_off_gpu():
    result = run_script("tune_attention.py", "/tmp/unused.json", timeout=120)
    assert result.returncode != 0
    assert "on a GPU" in result.stderr


def test_tune_attention_names_the_fastest_setting_as_config_overrides():
    import importlib.util

    import ml_collections

    from sparse_lm.model import gpu_kernel_options

    spec = importlib.util.spec_from_file_location("tune_attention", REPO_ROOT / "scripts" / "tune_attention.py")
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)

    def row(pattern, bq, warps, ms, **extra):
        return dict(shape=[2, 16384, 8, 128], pattern=pattern, block_q=bq, block_k=64,
                    num_warps=warps, num_stages=2, fwd_bwd_ms=ms, **extra)

    rows = [row("fixed", 64, 8, 7.2), row("fixed", 64, 4, 3.4), row("fixed", 32, 4, 1.0, error="no"),
            row("strided", 128, 8, 1.5), row("strided", 64, 4, 0.95)]
    best = {r["pattern"]: r for r in tune.best_settings(rows)}
    assert best["fixed"]["fwd_bwd_ms"] == 3.4  # a failed setting never wins
    assert best["strided"]["overrides"] == ("--config.attention.block_q=64 --config.attention.block_k=64 "
                                            "--config.attention.num_warps=4 --config.attention.num_stages=2")
    # The overrides name real config fields that reach the kernel.
    attention = ml_collections.ConfigDict(dict(block_q=0, block_k=0, num_warps=0, num_stages=0))
    for item in best["strided"]["overrides"].split():
        name, value = item.removeprefix("--config.attention.").split("=")
        attention[name] = int(value)
    assert dict(gpu_kernel_options(attention)) == {"block_q": 64, "block_k": 64, "num_warps": 4,
                                                   "num_stages": 2}


def test_bench_dropout_compares_the_two_masks(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_dropout", REPO_ROOT / "scripts" / "bench_dropout.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--shape", "4,256,64"])
    assert out["bernoulli_ms"] > 0 and out["keep_mask_ms"] > 0
    assert "faster" in capsys.readouterr().out


def test_bench_layer_norm_times_both_backwards_and_checks_they_agree(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_layer_norm", REPO_ROOT / "scripts" / "bench_layer_norm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--shape", "2,128,128", "--reps", "2", "--out", str(tmp_path / "ln.json")])
    assert out["xla_ms"] > 0 and out["pallas_gpu_ms"] > 0
    assert out["max_rel_diff"] < 1e-2  # bf16 gradients of the two backwards
    assert json.loads((tmp_path / "ln.json").read_text())["shape"] == [2, 128, 128]
    assert "pallas_gpu" in capsys.readouterr().out


def test_check_kernel_training_checks_every_impl_spec_before_training(tmp_path):
    # The bad spec is the last one: nothing may train (or be written) before the refusal.
    result = run_script("check_kernel_training.py", "--data", str(tmp_path / "unused"),
                        "--out", str(tmp_path / "ck.json"), "--impls", "reference",
                        "pallas_gpu+colaunch=false", "pallas_gpu+fast", timeout=120)
    assert result.returncode != 0
    assert "'fast' is not a boolean attention option" in result.stderr and "narrow_chain" in result.stderr
    assert not (tmp_path / "ck.json").exists()


def test_check_kernel_training_impl_specs_set_options_on_and_off():
    import importlib.util

    from configs.enwik8 import get_config
    from sparse_lm.config import REMOVED_FIELDS

    spec = importlib.util.spec_from_file_location("ckt", REPO_ROOT / "scripts" / "check_kernel_training.py")
    ckt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ckt)
    attention = get_config("small").attention
    assert ckt.parse_spec("pallas_gpu", attention) == ("pallas_gpu", {})
    assert ckt.parse_spec("pallas_gpu+mosaic_forward+colaunch=False", attention) == (
        "pallas_gpu", {"mosaic_forward": True, "colaunch": False})
    # An option unset by default (the kernel decides) can be set either way.
    assert ckt.parse_spec("auto+mosaic_summary_dq=false", attention) == ("auto", {"mosaic_summary_dq": False})
    with pytest.raises(SystemExit, match="'fast' is not one of"):
        ckt.parse_spec("fast+colaunch", attention)
    for removed in REMOVED_FIELDS["attention"]:  # options that no longer exist
        with pytest.raises(SystemExit, match=f"'{removed}' is not a boolean attention option"):
            ckt.parse_spec(f"pallas_gpu+{removed}", attention)
    with pytest.raises(SystemExit, match="colaunch=true or colaunch=false"):
        ckt.parse_spec("pallas_gpu+colaunch=maybe", attention)
