"""`logger.wandb.mode=online` without a W&B key stops before any actor starts and says what to do."""

import os
import subprocess
import sys

import pytest

from rlhf_dist.errors import ConfigError
from rlhf_dist.monitor import check_wandb_credentials

from helpers import REPO

NO_KEY = ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC", "WANDB_MODE")


@pytest.fixture
def no_wandb_key(tmp_path, monkeypatch):
    """An empty home: no WANDB_API_KEY and no ~/.netrc."""
    for key in NO_KEY:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_online_without_a_key_fails_before_any_actor(no_wandb_key):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_dist.main", "logger=wandb_online",
         f"hydra.run.dir={no_wandb_key}/run"],
        cwd=no_wandb_key, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "logger.wandb.mode=online needs a W&B API key" in result.stderr
    assert "logger.wandb.mode=offline" in result.stderr and "wandb login" in result.stderr
    assert "[warmup]" not in result.stdout and "[start]" not in result.stdout
    assert "Traceback" not in result.stderr


def test_offline_and_disabled_need_no_key(no_wandb_key):
    check_wandb_credentials("offline")
    check_wandb_credentials("disabled")
    with pytest.raises(ConfigError, match="no entry for api.wandb.ai"):
        check_wandb_credentials("online")


def test_a_key_in_the_environment_or_netrc_is_enough(no_wandb_key, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    check_wandb_credentials("online")
    monkeypatch.delenv("WANDB_API_KEY")
    netrc = no_wandb_key / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    check_wandb_credentials("online")


def test_a_self_hosted_server_needs_its_own_netrc_entry(no_wandb_key, monkeypatch):
    (no_wandb_key / ".netrc").write_text("machine api.wandb.ai login user password secret\n")
    (no_wandb_key / ".netrc").chmod(0o600)
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    with pytest.raises(ConfigError, match="no entry for wandb.example.com"):
        check_wandb_credentials("online")
