"""Every config group option composes, and bad values fail with a message that names the fix."""

from pathlib import Path

import pytest

from helpers import compose_config

from rlhf_dist.config import RLConfig
from rlhf_dist.validation import check_override_keys, validate
from rlhf_dist.errors import ConfigError
from rlhf_dist.session import conf_dir

CONF = Path(conf_dir())
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())


_compose = compose_config


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
                    "algo.kl_loss_estimator=k2", "critic.optim.lr=5e-4"])
    assert (cfg.trainer.total_steps, cfg.rollout.num_engines, cfg.algo.kl_loss_estimator) == (50, 2, "k2")
    assert cfg.critic.optim.lr == 5e-4 and cfg.learner.optim.lr == 3e-4


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "algo").glob("*.yaml")))
def test_every_algo_preset_names_itself_and_validates(option):
    """`algo=<x>` sets algo.name=<x>, and every preset is a valid config as it stands."""
    cfg = _compose([f"algo={option}"])
    assert cfg.algo.name == option
    validate(cfg)


def test_experiment_ppo_trains_policy_and_critic_on_two_ranks_each():
    cfg = _compose(["experiment=ppo"])
    validate(cfg)
    assert (cfg.algo.name, cfg.algo.advantage, cfg.learner.world_size, cfg.critic.world_size) == ("ppo", "gae", 2, 2)
    assert cfg.algo.kl_in_reward and cfg.algo.whiten_advantages


def test_unknown_experiment_lists_the_ones_that_exist():
    with pytest.raises(Exception, match="Available options") as info:
        _compose(["experiment=nosuch"])
    assert "smoke" in str(info.value) and "ppo" in str(info.value)


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
        (["learner.max_tokens_per_micro_batch=100", "task.max_prompt_len=64", "rollout.max_new_tokens=48"],
         "learner.max_tokens_per_micro_batch=100 is smaller than one sequence of maximum length: "
         "task.max_prompt_len + rollout.max_new_tokens = 64 + 48 = 112 tokens. "
         "Fix: learner.max_tokens_per_micro_batch=112 or more"),
        (["algo.kl_loss_estimator=k9"], "algo.kl_loss_estimator='k9' is not registered; valid: ['k1', 'k2', 'k3', 'k3_st']"),
        (["algo.kl_reward_estimator=k7"], "algo.kl_reward_estimator='k7' is not registered"),
        (["algo.loss_agg=sum"], "algo.loss_agg='sum' is not registered; valid:"),
        (["algo.advantage=vtrace"], "algo.advantage='vtrace' is not registered; valid: ['dr_grpo', 'gae', 'grpo'"),
        (["algo.policy_loss=cispo"], "algo.policy_loss='cispo' is not registered; valid: ['clipped', 'gspo']"),
        (["algo=ppo", "critic.world_size=0"], "needs state values from a critic, but critic.world_size=0"),
        (["algo=ppo", "critic.micro_batch_size=48"], "critic.micro_batch_size=32"),
        (["algo=ppo", "critic.micro_batch_size=0"], "critic.micro_batch_size=0 must be > 0"),
        (["algo.gamma=1.5"], "algo.gamma=1.5 is out of range: expected [0.0, 1.0]"),
        (["algo.lam=-0.1"], "algo.lam=-0.1 is out of range"),
        (["algo.clip_low=-0.2"], "algo.clip_low=-0.2 is out of range"),
        (["algo.clip_high=-1"], "algo.clip_high=-1.0 is out of range"),
        (["algo.kl_coef=-0.01"], "algo.kl_coef=-0.01 is out of range"),
        (["algo.clip_ratio_c=1.0"], "algo.clip_ratio_c=1.0: the dual-clip bound must be > 1"),
        (["algo.kl_target=0"], "algo.kl_target=0.0 must be > 0"),
        (["algo.kl_in_loss=false"], "both algo.kl_in_reward and algo.kl_in_loss are false"),
        (["rollout.top_p=0.9"], "rollout.top_p=0.9"),
        (["critic.zero_stage=5"], "critic.zero_stage=5"),
        (["learner.zero_stage=4"], "zero_stage=4"),
        (["rollout.temperature=0"], "temperature"),
        (["logger.wandb.mode=cloud"], "logger.wandb.mode"),
        (["rollout.tensor_parallel_size=2", "rollout.sync_transport=object_store"], "Fix: add rollout.sync_transport=collective"),
        (["rollout.tensor_parallel_size=64", "rollout.sync_transport=collective"], "CPU cores"),
        (["rollout.sync_transport=ipc"], "Options that work on CPU: rollout.sync_transport=collective"),
        (["rollout.sync_transport=nccl"], "rollout.sync_transport='nccl' is not one of ['object_store', 'collective', 'ipc']"),
        (["rollout.sleep_level=1"], "vLLM's CPU platform has no sleep mode"),
        (["rollout.sleep_level=3"], "rollout.sleep_level=3 is not one of [0, 1, 2]"),
        (["cluster=gpu8", "rollout.tensor_parallel_size=2", "rollout.sync_transport=collective"],
         "Fix: add cluster.gpus_per_engine=2"),
        (["cluster=gpu1", "rollout.num_engines=2"], "needs one engine with one shard on the learner's GPU"),
        # default batch: 96 prompts x 8 samples = 768 sequences in 6 mini-batches of 128
        (["trainer.async_rollout=true"],
         "trainer.async_rollout=true without algo.recompute_old_logprobs takes log pi_old from the "
         "training forward itself, which is exact only with one optimizer step per batch; got "
         "algo.ppo_epochs=1 x 768 // learner.mini_batch_size=128 = 6 steps for the 768 sequences of a "
         "step. Fix: algo.ppo_epochs=1 learner.mini_batch_size=768"),
        (["algo.rollout_correction=true", "algo.ppo_epochs=2", "learner.mini_batch_size=768"],
         "algo.rollout_correction=true without algo.recompute_old_logprobs"),
        (["trainer.async_rollout=true", "algo.recompute_old_logprobs=true", "algo.tis_cap=null"],
         "trainer.async_rollout=true with algo.tis_cap=null: nothing would correct"),
        (["algo.rollout_correction=true", "algo.recompute_old_logprobs=true"], "both choose log pi_old"),
        (["cluster=gpu1", "trainer.async_rollout=true"], "so they cannot free their memory then"),
        (["trainer.keep_best=reward/mean"], "must name a greedy held-out eval metric (eval/<name>)"),
        (["trainer.keep_best=eval/held_out/pass@4"], "per-set metrics (eval/<set>/pass@k) cannot be selected on"),
        (["algo.dynamic_sampling=true", "rollout.n_samples_per_prompt=6", "learner.world_size=4"],
         "n_samples_per_prompt to be a multiple of 4"),
        (["trainer.keep_best=eval/rule_mean"], "logged only beside a reward model"),
        (["trainer.kl_budget=2.0"], "trainer.keep_best is not set"),
        (["trainer.keep_best=eval/reward_mean", "trainer.kl_budget=2", "algo.kl_coef=0"], "not measured with algo.kl_coef=0"),
        (["trainer.kl_budget=0", "trainer.keep_best=eval/reward_mean"], "trainer.kl_budget=0.0 must be > 0"),
        (["reward.model.uncertainty_coef=1.0"], "reward.model.ensemble=3"),
        (["reward.model.ensemble=0"], "reward.model.ensemble=0 must be > 0"),
        (["algo.sft_coef=-1"], "algo.sft_coef=-1.0 is out of range"),
        (["algo.sft_coef=0.1", "algo.sft_batch_size=3"], "must split evenly over learner.world_size=2"),
        (["recipe.bias=1.5"], "recipe.bias=1.5 is out of range"),
        (["cluster=gpu1", "rollout.sync_transport=collective"], "NCCL refuses two members of the weight group"),
        (["cluster=gpu1", "learner.world_size=2", "cluster.gpus_per_learner=1", "learner.zero_stage=2"],
         "vLLM's IPC sender needs every learner rank in each sync"),
        (["cluster=gpu8", "cluster.gpus_per_learner=0.5"], "NCCL refuses two ranks of a group on one device"),
        (["cluster=gpu8", "algo=ppo", "cluster.gpus_per_critic=0.25", "critic.world_size=2"],
         "Fix: cluster.gpus_per_critic=1"),
    ],
)
def test_bad_values_raise_config_error_with_fix(overrides, needle):
    cfg = _compose(overrides)
    with pytest.raises(ConfigError, match=None) as info:
        validate(cfg)
    assert needle in str(info.value)


def test_tensor_parallel_size_must_divide_the_heads():
    from rlhf_dist.validation import check_tensor_parallel

    check_tensor_parallel({"num_attention_heads": 4, "num_key_value_heads": 2}, 2, "m")
    with pytest.raises(ConfigError, match=r"does not divide the model's attention heads \(4 query, "
                                          r"2 key/value heads, m\).*e.g. 2"):
        check_tensor_parallel({"num_attention_heads": 4, "num_key_value_heads": 2}, 4, "m")


def test_gpu1_colocates_with_ipc_and_sleep():
    cfg = _compose(["cluster=gpu1"])
    validate(cfg)
    assert (cfg.rollout.sync_transport, cfg.rollout.sleep_level, cfg.cluster.device) == ("ipc", 1, "cuda")


@pytest.mark.parametrize("overrides,source", [
    ([], "rollout"),
    (["algo.recompute_old_logprobs=true"], "recomputed"),
    (["algo.rollout_correction=true", "learner.mini_batch_size=768"], "current"),
    (["trainer.async_rollout=true", "learner.mini_batch_size=768"], "current"),
    (["trainer.async_rollout=true", "algo.recompute_old_logprobs=true"], "recomputed"),
])
def test_where_pi_old_comes_from(overrides, source):
    """Async rollout with one optimizer step per batch takes pi_old from the training forward; with
    several it needs the recomputed one (test_bad_values_raise_config_error_with_fix)."""
    from rlhf_dist.config import old_logprobs_source

    cfg = _compose(overrides)
    validate(cfg)
    assert old_logprobs_source(cfg) == source


def test_what_an_estimator_needs_comes_from_its_registry_entry():
    """A new estimator registered with values=True gets a critic, one with groups=True needs
    n >= 2 samples per prompt: no list of names elsewhere to update."""
    import dataclasses

    from rlhf_dist.algo.advantages import ADVANTAGE_ESTIMATORS, ESTIMATOR_NEEDS, register_advantage
    from rlhf_dist.config import uses_critic

    @register_advantage("test_values", values=True)
    def _values(**kwargs):
        raise NotImplementedError

    @register_advantage("test_groups", groups=True)
    def _groups(**kwargs):
        raise NotImplementedError

    try:
        cfg = _compose([])
        with_values = dataclasses.replace(cfg, algo=dataclasses.replace(cfg.algo, advantage="test_values"))
        assert uses_critic(with_values) and not uses_critic(cfg)
        no_critic = dataclasses.replace(with_values, critic=dataclasses.replace(cfg.critic, world_size=0))
        with pytest.raises(ConfigError, match="algo.advantage=test_values .* needs state values from a critic"):
            validate(no_critic)
        grouped = dataclasses.replace(cfg, algo=dataclasses.replace(cfg.algo, advantage="test_groups"),
                                      rollout=dataclasses.replace(cfg.rollout, n_samples_per_prompt=1))
        with pytest.raises(ConfigError, match="algo.advantage=test_groups compares samples within a group"):
            validate(grouped)
    finally:
        for name in ("test_values", "test_groups"):
            ADVANTAGE_ESTIMATORS.pop(name), ESTIMATOR_NEEDS.pop(name)


@pytest.mark.parametrize("overrides,alone", [([], False), (["cluster=gpu1"], True), (["cluster=gpu8"], False)])
def test_engines_start_alone_only_on_a_gpu_they_share(overrides, alone):
    """vLLM profiles GPU memory while it starts: on a shared GPU nothing else may load meanwhile."""
    from rlhf_dist.rl.launcher import engines_start_alone

    assert engines_start_alone(_compose(overrides)) is alone
