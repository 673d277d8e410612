"""Every estimator preset runs real RL steps end to end on the tiny model.

One set of actors (vLLM engine, reference, reward, 2 learner ranks, 2 critic ranks) is started
with algo=ppo; each preset's `algo` section then drives two full steps (generate, score,
advantages, train, verified sync) through those same actors. The critic takes part only in the
presets whose estimator needs values (gae).
"""

import math

import pytest
import ray
import torch

from rlhf_dist.algo import compute_advantages, kl_penalty, masked_whiten
from rlhf_dist.errors import ConfigError

from helpers import REPO, compose_config, start_trainer

pytestmark = [pytest.mark.ray, pytest.mark.slow]
# preset -> (advantage estimator, policy loss) it must run: a preset that fell back to GRPO fails
PRESETS = {"grpo": ("grpo", "clipped"), "dr_grpo": ("dr_grpo", "clipped"), "rloo": ("rloo", "clipped"),
           "reinforce_pp": ("reinforce_pp", "clipped"),
           "reinforce_pp_baseline": ("reinforce_pp_baseline", "clipped"), "gspo": ("grpo", "gspo"),
           "ppo": ("gae", "clipped")}


def _cfg(run_dir, model_dir, *overrides):
    return compose_config([f"trainer.run_dir={run_dir}", f"model.path={model_dir}", "experiment=smoke",
                           f"reward.fn={REPO / 'examples' / 'my_rewards.py'}:score", *overrides])


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, tmp_path_factory):
    trainer = start_trainer(tmp_path_factory.mktemp("run"), tiny_model_dir, ["algo=ppo"])
    yield trainer
    trainer.shutdown()
    ray.shutdown()


def _advantages_by(name, batch, algo, coef, group_size):
    """What estimator `name` gives on the step's batch, from the same inputs as the trainer."""
    mask = batch["response_mask"]
    penalty = torch.zeros_like(mask)
    if algo.kl_in_reward:
        old_logprobs = batch.tensors.get("old_logprobs", batch["rollout_logprobs"])
        penalty = coef * kl_penalty(old_logprobs, batch["ref_logprobs"], algo.kl_reward_estimator) * mask
    advantages, _ = compute_advantages(name, scores=batch["rewards"], kl_penalty=penalty, response_mask=mask,
                                       values=batch.tensors.get("values"), group_size=group_size,
                                       gamma=algo.gamma, lam=algo.lam)
    return masked_whiten(advantages, mask) * mask if algo.whiten_advantages else advantages


@pytest.mark.parametrize("preset", PRESETS)
def test_every_estimator_runs_end_to_end(trainer, tiny_model_dir, tmp_path, preset):
    algo = _cfg(tmp_path, tiny_model_dir, f"algo={preset}").algo
    assert (algo.advantage, algo.policy_loss) == PRESETS[preset]
    trainer.use_algo(algo)
    seen, advantages = {}, trainer.advantages

    def keep_batch(batch):  # the batch phase 3 saw, kept for the check below
        seen["batch"] = batch
        return advantages(batch)

    trainer.advantages = keep_batch
    try:
        for step in (1, 2):
            metrics = trainer.step(step)
            bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
            assert not bad, f"{preset}: non-finite metrics {bad}"
    finally:
        del trainer.advantages
    batch, group_size = seen["batch"], trainer.cfg.rollout.n_samples_per_prompt
    used = _advantages_by(PRESETS[preset][0], batch, algo, metrics["kl/coef"], group_size)
    torch.testing.assert_close(batch["advantages"], used, msg=f"{preset}: not the {PRESETS[preset][0]} advantages")
    if PRESETS[preset][0] != "grpo":
        grpo = _advantages_by("grpo", batch, algo, metrics["kl/coef"], group_size)
        assert not torch.allclose(batch["advantages"], grpo, atol=1e-4), f"{preset}: GRPO's advantages"
    for key in ("reward/mean", "advantages/mean", "advantages/std", "loss/policy", "policy/approx_kl",
                "policy/clip_frac_low", "policy/clip_frac_high", "policy/clip_frac_dual",
                "policy/ratio_min", "policy/ratio_max", "entropy/mean", "optim/grad_norm",
                "optim/grad_norm_max", "kl/coef", "sync/verified_tensors"):
        assert key in metrics, f"{preset}: {key} missing"
    assert metrics["advantages/std"] > 0, f"{preset}: all-zero advantages, nothing to learn from"
    assert metrics["sync/rollout_logprob_gap_max"] < 1e-3  # engine samples from the synced weights
    if preset == "ppo":
        for key in ("critic/value_loss", "critic/explained_variance", "critic/value_clip_frac",
                    "critic/optim/grad_norm", "kl/reward_penalty"):
            assert key in metrics, key
        assert metrics["critic/value_loss"] > 0
    else:
        assert "critic/value_loss" not in metrics
    if preset in ("reinforce_pp", "reinforce_pp_baseline"):  # batch-whitened advantages
        assert abs(metrics["advantages/mean"]) < 1e-3 and abs(metrics["advantages/std"] - 1) < 1e-2


def test_recomputed_old_logprobs_and_truncated_is(trainer, tiny_model_dir, tmp_path):
    """The learner's own old logprobs match the engine's up to kernel numerics; IS weights ~ 1."""
    algo = _cfg(tmp_path, tiny_model_dir, "algo=grpo", "algo.recompute_old_logprobs=true",
                "algo.tis_cap=2.0").algo
    trainer.use_algo(algo)
    metrics = trainer.step(3)
    assert metrics["policy/rollout_logprob_diff_max"] < 1e-3
    assert abs(metrics["policy/is_weight_mean"] - 1.0) < 1e-3
    assert metrics["policy/is_capped_frac"] == 0.0
    # before the first update the ratio against the recomputed logprobs is exactly 1
    assert metrics["policy/ratio_min"] <= 1.0 <= metrics["policy/ratio_max"]


def test_adaptive_kl_coefficient_moves_towards_its_target(trainer, tiny_model_dir, tmp_path):
    """Ziegler et al.'s controller: a KL above target raises beta, below it lowers beta."""
    algo = _cfg(tmp_path, tiny_model_dir, "algo=ppo", "algo.kl_target=1e-6", "algo.kl_horizon=100").algo
    trainer.use_algo(algo)
    trainer.step(4)  # one update, so the policy has left the reference
    first, second = trainer.step(5), trainer.step(6)
    assert first["kl/coef"] < second["kl/coef"]  # beta applied at step 6 grew from step 5's KL
    assert first["kl/seq_mean"] > 1e-6  # ... because that KL was above the target
    assert second["kl/coef"] == pytest.approx(
        first["kl/coef"] * (1 + 0.2 * trainer.cfg.trainer.prompts_per_step * trainer.cfg.rollout.n_samples_per_prompt / 100))
    algo = _cfg(tmp_path, tiny_model_dir, "algo=ppo", "algo.kl_target=1e3", "algo.kl_horizon=100").algo
    trainer.use_algo(algo)
    trainer.step(7)
    assert trainer.kl_ctl.value == pytest.approx(0.01 * (1 - 0.2 * 64 / 100))  # far below target: -20% x n/horizon


def test_use_algo_refuses_an_estimator_whose_needs_were_not_started(tiny_model_dir, tmp_path):
    """A run started without a critic cannot switch to GAE: said before any step, not deep in Ray."""
    from rlhf_dist.rl.trainer import RLTrainer
    cfg = _cfg(tmp_path, tiny_model_dir, "algo=grpo")
    trainer = RLTrainer.__new__(RLTrainer)  # only use_algo's bookkeeping; no actors are needed
    trainer.cfg, trainer.critics, trainer.reference = cfg, None, object()
    with pytest.raises(ConfigError, match="needs a critic"):
        trainer.use_algo(_cfg(tmp_path, tiny_model_dir, "algo=ppo").algo)
    trainer.use_algo(_cfg(tmp_path, tiny_model_dir, "algo=rloo").algo)
    assert trainer.cfg.algo.advantage == "rloo" and not trainer.use_critic
