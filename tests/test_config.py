"""Config fields that the code reads can be set, and bad batch sizes fail before any work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT, run_python


def test_every_data_field_the_loader_reads_is_in_the_base_config():
    """With lock_config, a field missing from base_config cannot be set on the command line."""
    from sparse_lm.config import base_config

    read = ("name", "path", "seq_len", "download", "files", "split_fractions", "sample_rate",
            "split_by", "cache_dir", "cifar_source", "tfds_data_dir", "valid_size", "max_bytes",
            "download_sha256")  # the fields sparse_lm.data.load_split reads
    assert [f for f in read if f not in base_config().data] == []


def test_download_sha256_can_be_set_on_the_command_line():
    code = (
        "import sys; from absl import flags; from sparse_lm import cli; cli.define_common_flags(); "
        "cli.parse_flags(sys.argv); print(flags.FLAGS.config.data.download_sha256)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "--config=configs/enwik8.py", "--workdir=/tmp/unused",
         "--config.data.download_sha256=abc123"],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "abc123"


@pytest.mark.parametrize("value,files", [
    ("corpus/a.txt", ["corpus/a.txt"]),
    ("('corpus/a.txt','more/*.txt')", ["corpus/a.txt", "more/*.txt"]),
])
def test_text_files_can_be_set_on_the_command_line(value, files):
    """data.files, the 'text' data set's inputs: one path or glob, or a tuple of them."""
    code = (
        "import sys, json; from absl import flags; from sparse_lm import cli; cli.define_common_flags(); "
        "cli.parse_flags(sys.argv); print(json.dumps(list(flags.FLAGS.config.data.files)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "--config=configs/quickstart.py", "--workdir=/tmp/unused",
         "--config.data.name=text", f"--config.data.files={value}"],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == files


def test_smoke_configs_find_the_sample_data_from_anywhere():
    """$SPARSE_LM_SHARED_DATA, else shared/data beside the repository: never relative to
    the directory the command runs in."""
    out = run_python("""
        import json, os
        os.chdir("/")
        from configs import audio, cifar10, enwik8
        paths = [m.get_config("smoke").data.path for m in (enwik8, cifar10, audio)]
        os.environ["SPARSE_LM_SHARED_DATA"] = "/data/samples"
        paths += [enwik8.get_config("smoke").data.path]
        print(json.dumps(paths))
    """, env={"SPARSE_LM_SHARED_DATA": ""})
    beside = str(REPO_ROOT.parent / "shared" / "data")
    assert out == [f"{beside}/text/enwik8_first_1MB.xml", f"{beside}/cifar10-sample/cifar-10-batches-bin",
                   f"{beside}/audio/spoken_digits", "/data/samples/text/enwik8_first_1MB.xml"]


def test_eval_batch_size_that_the_devices_cannot_share_is_a_config_error():
    out = run_python(
        """
        import json
        from sparse_lm import sharding
        from sparse_lm.config import ConfigError, base_config
        from sparse_lm.evaluate import Evaluator
        cfg = base_config()
        mesh = sharding.make_mesh(cfg.mesh)
        cfg.data.eval_batch_size = 3
        try:
            Evaluator(None, cfg, mesh)
            message = None
        except ConfigError as e:
            message = str(e)
        cfg.data.eval_batch_size = 4
        Evaluator(None, cfg, mesh)  # a multiple of the devices is fine
        print(json.dumps({"message": message}))
        """,
        devices=2,
    )
    assert out["message"] and "eval_batch_size=3" in out["message"] and "multiple of 2" in out["message"]


def test_a_negative_profile_window_is_a_config_error_naming_the_fields():
    import pytest

    from sparse_lm.config import ConfigError, base_config, validate

    cfg = base_config()
    cfg.data.path = "unused"
    validate(cfg)  # profiling off by default
    cfg.train.profile_from = -1
    with pytest.raises(ConfigError, match="profile_from=-1 must be >= 0"):
        validate(cfg)
    cfg.train.profile_from, cfg.train.profile_steps = 5, 0
    with pytest.raises(ConfigError, match="profile_steps=0 >= 1"):
        validate(cfg)


@pytest.mark.parametrize("field,value", [
    ("keep_checkpoints", 0),  # Orbax would keep none: the trained model deleted at the end
    ("checkpoint_every", 0),  # step % 0 after the first step
    ("log_every", 0),
    ("log_every", -5),
    ("eval_every", -1),
])
def test_train_intervals_that_would_lose_work_or_crash_are_config_errors(field, value):
    from sparse_lm.config import ConfigError, base_config, validate

    cfg = base_config()
    cfg.data.path = "unused"
    cfg.train[field] = value
    with pytest.raises(ConfigError, match=f"config.train.{field}={value} must be"):
        validate(cfg)


def test_a_config_that_sets_a_removed_field_gets_an_error_naming_the_removal():
    """Config files are not locked while they build the config, so a removed field set
    there would come back silently: validate and gpu_kernel_options refuse it, and a
    --config override of it is told it was removed, not to check the spelling."""
    import pytest

    from sparse_lm.cli import _unknown_field_message
    from sparse_lm.config import REMOVED_FIELDS, ConfigError, base_config, validate
    from sparse_lm.model import gpu_kernel_options

    assert REMOVED_FIELDS["attention"]
    for section, fields in REMOVED_FIELDS.items():
        for name in fields:
            assert name not in base_config()[section]
            cfg = base_config()
            cfg.data.path = "unused"
            cfg[section][name] = False  # even set to the old default
            with pytest.raises(ConfigError, match=rf"config\.{section}\.{name} was removed on"):
                validate(cfg)
            if section == "attention":
                with pytest.raises(ConfigError, match=rf"config\.attention\.{name} was removed on"):
                    gpu_kernel_options(cfg.attention)
            override = f"--config.{section}.{name}=true"
            message = _unknown_field_message(["train.py", override], AttributeError(f"'{name}'"))
            assert f"config.{section}.{name} was removed on" in message and "spelling" not in message
