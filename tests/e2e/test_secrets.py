"""Secrets stay out of what a run saves and prints: run_dir/config.yaml, Hydra's .hydra/ files, the
W&B config, `--cfg job` and the console. Redacted: the W&B key and HF tokens from the environment
wherever they land in the config, and the value of any config key that names a secret."""

import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from helpers import REPO
from rlhf_dist.session import conf_dir
from rlhf_dist.redact import MASK, looks_secret, redact, redact_text

WANDB_KEY = "wandb-key-0123456789abcdef"
HF_TOKEN = "hf_TOKENabcdefghijklmnop"
LITERAL = "literal-secret-98765"
ENV = {"WANDB_API_KEY": WANDB_KEY, "HF_TOKEN": HF_TOKEN, "HUGGING_FACE_HUB_TOKEN": "hf_hub_token_123456",
       "MY_SERVICE_PASSWORD": "hunter2-hunter2", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "HOME": "/root"}


@pytest.mark.parametrize("name, secret", [
    ("hf_token", True), ("api_key", True), ("apiKey", True), ("WANDB_API_KEY", True),
    ("HUGGING_FACE_HUB_TOKEN", True), ("db_password", True), ("client_secret", True),
    ("task.options.api_key", True), ("max_new_tokens", False), ("max_tokens_per_micro_batch", False),
    ("hf_token_path", False), ("tokenizer", False), ("keys", False), ("RAY_AUTH_MODE", False),
    ("TOKENIZERS_PARALLELISM", False)])
def test_which_names_are_secret(name, secret):
    assert looks_secret(name) is secret


def test_redact_masks_secret_keys_and_environment_secrets_anywhere():
    config = {"model": {"path": f"/m/{HF_TOKEN}/x", "hf_token": "abc", "access_token": None},
              "task": {"options": {"api_key": {"nested": 1}, "max_len": 4}},
              "logger": {"tags": [f"k={WANDB_KEY}", "hf_token=xyz", "ok"], "password": ""},
              "n": 3}
    assert redact(config, ENV) == {
        "model": {"path": f"/m/{MASK}/x", "hf_token": MASK, "access_token": None},
        "task": {"options": {"api_key": MASK, "max_len": 4}},
        "logger": {"tags": [f"k={MASK}", f"hf_token={MASK}", "ok"], "password": ""}, "n": 3}
    assert config["model"]["hf_token"] == "abc"  # a copy: the config itself is not changed


def test_every_shipped_config_is_left_unchanged():
    """No schema key is taken for a secret: redaction changes nothing without secrets."""
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        for extra in ([], ["algo=ppo"], ["experiment=full_recipe"], ["cluster=gpu8"], ["cluster=multinode"]):
            config = OmegaConf.to_container(compose("config", overrides=["trainer.run_dir=/r", *extra]),
                                            resolve=True)
            assert redact(config, ENV) == config, extra
            text = OmegaConf.to_yaml(config)
            assert redact_text(text, ENV) == text, extra


def test_redact_text_keeps_the_layout():
    text = (f"model:\n  path: /m\n  hf_token: {LITERAL}\n  api_key: null\n"
            f"- +task.options.api_key={LITERAL}\noverride_dirname: a=1,hf_token={LITERAL},b=2\n"
            f"name: run-{WANDB_KEY}\r\n")
    assert redact_text(text, ENV) == (
        f"model:\n  path: /m\n  hf_token: '{MASK}'\n  api_key: null\n"
        f"- +task.options.api_key={MASK}\noverride_dirname: a=1,hf_token={MASK},b=2\n"
        f"name: run-{MASK}\r\n")


def _cli(args, cwd, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_API_KEY=WANDB_KEY, HF_TOKEN=HF_TOKEN)
    return subprocess.run([sys.executable, "-m", "rlhf_dist.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _files_holding(root, *secrets):
    return [str(path) for path in root.rglob("*") if path.is_file()
            and any(s.encode() in path.read_bytes() for s in secrets)]


def test_cfg_job_and_hydra_files_and_saved_config_are_redacted(tmp_path):
    overrides = [f"+task.options.api_key={LITERAL}", "critic.model_path=/m/${oc.env:HF_TOKEN}"]
    shown = _cli([*overrides, "trainer.run_dir=/tmp/unused", "--cfg", "job", "--resolve"], tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert LITERAL not in shown.stdout and HF_TOKEN not in shown.stdout
    assert f"api_key: '{MASK}'" in shown.stdout and f"model_path: /m/{MASK}" in shown.stdout

    # a run that stops in prepare() (the reverse task has no api_key option): after
    # run_dir/config.yaml and Hydra's .hydra/ files are written, before any actor starts
    run_dir = tmp_path / "run"
    result = _cli([f"hydra.run.dir={run_dir}", *overrides], tmp_path)
    assert result.returncode == 2 and "has no option(s) ['api_key']" in result.stderr, result.stderr
    assert not _files_holding(run_dir, LITERAL, HF_TOKEN, WANDB_KEY)
    assert LITERAL not in result.stdout + result.stderr
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.task.options.api_key == MASK and saved.critic.model_path == f"/m/{MASK}"
    assert f"+task.options.api_key={MASK}" in (run_dir / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.slow
@pytest.mark.ray
def test_run_with_wandb_offline_writes_no_secret_anywhere(tmp_path):
    """A whole run (W&B offline): no file in the run dir holds the W&B key, the HF token or the
    literal secret, and neither does the console."""
    run_dir = tmp_path / "run"
    # typed on the command line too: W&B records argv, the run's name and its tags
    result = _cli([f"hydra.run.dir={run_dir}", "experiment=smoke", "warmup.steps=2",
                   "trainer.total_steps=1", "logger.wandb.mode=offline",
                   "critic.model_path=/m/${oc.env:HF_TOKEN}", f"logger.wandb.name=run-{WANDB_KEY}",
                   f"logger.wandb.tags=[t-{HF_TOKEN}]"], tmp_path, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert list((run_dir / "wandb").glob("offline-run-*"))
    assert not _files_holding(run_dir, HF_TOKEN, WANDB_KEY)
    assert HF_TOKEN not in result.stdout + result.stderr and WANDB_KEY not in result.stdout + result.stderr
