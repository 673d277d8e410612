"""Every config group option composes, and bad values fail with a message that names the fix."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlhf_dist.config import RLConfig, check_override_keys, validate
from rlhf_dist.errors import ConfigError
from rlhf_dist.main import conf_dir

CONF = Path(conf_dir())
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())


def _compose(overrides: list[str]) -> RLConfig:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["trainer.run_dir=/tmp/unused", *overrides])
    return OmegaConf.to_object(cfg)


def test_expected_groups_exist():
    assert {"algo", "model", "task", "cluster", "logger", "experiment"} <= set(GROUPS)


@pytest.mark.parametrize(
    "group,option",
    [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))],
)
def test_every_group_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "model" and option == "hf":
        overrides.append("model.path=/some/model")
    cfg = _compose(overrides)
    assert isinstance(cfg, RLConfig)
    if group != "cluster":  # gpu clusters validate fine too, but say cuda
        validate(cfg)


def test_default_config_is_valid_and_typed():
    cfg = _compose([])
    validate(cfg)
    assert cfg.algo.name == "grpo" and cfg.learner.world_size == 2
    assert cfg.logger.wandb.mode == "offline"


def test_cli_style_overrides_reach_the_schema():
    cfg = _compose(["trainer.total_steps=50", "rollout.num_engines=2", "learner.world_size=2",
                    "algo.kl_estimator=k2"])
    assert (cfg.trainer.total_steps, cfg.rollout.num_engines, cfg.algo.kl_estimator) == (50, 2, "k2")


def test_unknown_key_is_rejected_by_hydra():
    with pytest.raises(Exception, match="no_such_field"):
        _compose(["trainer.no_such_field=1"])


@pytest.mark.parametrize("override,needle", [
    ("trainer.total_step=5", "Did you mean 'trainer.total_steps'?"),
    ("rollout.num_engine=2", "Did you mean 'rollout.num_engines'?"),
    ("trainr.total_steps=5", "Did you mean 'trainer'?"),
    ("learner.optim.lrr=1", "Valid keys under learner.optim:"),
])
def test_unknown_cli_key_gets_a_suggestion(override, needle):
    with pytest.raises(ConfigError) as info:
        check_override_keys([override])
    assert needle in str(info.value)


def test_valid_cli_keys_pass():
    check_override_keys(["trainer.total_steps=5", "algo=grpo", "learner.optim.lr=1e-4",
                         "+experiment=smoke", "hydra.run.dir=x", "model.tiny.arch=llama"])


def test_unknown_group_option_lists_valid_ones():
    with pytest.raises(Exception, match="Available options") as info:
        _compose(["algo=no_such_algo"])
    assert "grpo" in str(info.value)


def test_wrong_type_is_rejected():
    with pytest.raises(Exception, match="total_steps"):
        _compose(["trainer.total_steps=many"])


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["rollout.n_samples_per_prompt=1"], "n_samples_per_prompt=1"),
        (["learner.mini_batch_size=100"], "not a multiple of learner.mini_batch_size=100"),
        (["learner.world_size=3"], "does not split evenly"),
        (["learner.micro_batch_size=24"], "learner.micro_batch_size=16"),
        (["algo.kl_estimator=k9"], "algo.kl_estimator='k9' is not one of"),
        (["learner.zero_stage=4"], "zero_stage=4"),
        (["rollout.temperature=0"], "temperature"),
        (["algo.advantage=nope"], "not registered"),
        (["logger.wandb.mode=cloud"], "logger.wandb.mode"),
        (["rollout.tensor_parallel_size=2"], "rollout.verify_sync=false"),
    ],
)
def test_bad_values_raise_config_error_with_fix(overrides, needle):
    cfg = _compose(overrides)
    with pytest.raises(ConfigError, match=None) as info:
        validate(cfg)
    assert needle in str(info.value)
