"""A run directory that already holds a run is refused before anything is written or started,
unless trainer.resume continues it; an empty or new directory is fine."""

import pytest

from helpers import run_cli
from rlhf_dist.errors import ConfigError
from rlhf_dist.validation import check_run_dir


def test_existing_run_is_refused_unless_resumed(tmp_path):
    check_run_dir(tmp_path / "new", None)  # not there yet
    check_run_dir(tmp_path, None)  # there, empty (a test's tmp dir, a dir made beforehand)
    (tmp_path / "config.yaml").write_text("a: 1\n")  # a run that stopped on bad input
    check_run_dir(tmp_path, None)

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError) as info:
        check_run_dir(tmp_path, None)
    message = str(info.value)
    assert f"the run directory {tmp_path} (trainer.run_dir) already holds a run (metrics.jsonl)" in message
    assert "trainer.resume=auto" in message and "a new trainer.run_dir" in message
    check_run_dir(tmp_path, "auto")
    check_run_dir(tmp_path, str(tmp_path / "checkpoints" / "step_00000010"))

    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoints\)"):
        check_run_dir(tmp_path, None)


def test_checkpoint_dir_elsewhere_that_holds_checkpoints_is_refused(tmp_path):
    elsewhere = tmp_path / "ckpt"
    elsewhere.mkdir()
    check_run_dir(tmp_path / "run", None, str(elsewhere))  # empty: fine
    (elsewhere / "step_00000005").mkdir()
    with pytest.raises(ConfigError, match=f"trainer.checkpoint_dir={elsewhere} is not empty"):
        check_run_dir(tmp_path / "run", None, str(elsewhere))


def test_cli_stops_before_writing_or_starting_anything(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.5}\n')
    (run_dir / "config.yaml").write_text("the: old run\n")
    result = run_cli([f"trainer.run_dir={run_dir}", "experiment=smoke"], cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: the run directory {run_dir} (trainer.run_dir) already holds a run" in result.stderr
    assert "trainer.resume=auto" in result.stderr and "Traceback" not in result.stderr
    assert "[warmup]" not in result.stdout and "[start]" not in result.stdout
    assert (run_dir / "config.yaml").read_text() == "the: old run\n"  # nothing written over
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "reward/mean": 0.5}\n'
