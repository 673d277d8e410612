"""trainer.keep_best: which eval's policy is kept (rlhf_dist/rl/keep_best.py)."""

import math

import pytest

from rlhf_dist.errors import ConfigError
from rlhf_dist.rl.keep_best import BestPolicy


def _run(keeper, evals):
    """Feed (step, gold, kl) evals as the fit loop does; return the steps that were saved."""
    saved = []
    for step, gold, kl in evals:
        evaluation = {"eval/rule_mean": gold, "eval/model_mean": 10.0 * step}
        if keeper.consider(evaluation, kl):
            weights = keeper.dir.with_name("best.tmp")
            weights.mkdir(parents=True)
            (weights / "model.safetensors").write_text(f"the policy of step {step}")
            keeper.kept(step, evaluation, kl, weights)
            saved.append(step)
    return saved


def test_the_best_gold_is_kept_even_when_the_last_policy_is_worse(tmp_path):
    """Over-optimisation: gold peaks at step 20 and falls while the learned reward keeps rising."""
    keeper = BestPolicy("eval/rule_mean", None, str(tmp_path))
    saved = _run(keeper, [(0, 0.70, 0.0), (10, 0.80, 1.0), (20, 0.86, 2.0), (30, 0.81, 4.0), (40, 0.60, 9.0)])
    assert saved == [0, 10, 20]
    assert keeper.summary() == {"best/step": 20, "best/metric": "eval/rule_mean", "best/value": 0.86,
                                "best/kl": 2.0}
    assert (keeper.dir / "model.safetensors").read_text() == "the policy of step 20"
    assert not keeper.dir.with_name("best.tmp").exists() and not keeper.dir.with_name("best.old").exists()
    assert BestPolicy("eval/rule_mean", None, str(tmp_path), resumed_at=30).best.step == 20  # resumed: kept
    # resumed from a checkpoint before the kept step: that policy belongs to the abandoned steps
    assert BestPolicy("eval/rule_mean", None, str(tmp_path), resumed_at=10).best is None
    assert not keeper.dir.exists()


def test_a_kl_budget_rules_out_policies_that_drifted_too_far(tmp_path):
    """Without gold, the learned reward only rises; the budget keeps the last policy inside it."""
    keeper = BestPolicy("eval/model_mean", 3.0, str(tmp_path))
    assert _run(keeper, [(0, 0.7, 0.0), (10, 0.8, 1.0), (20, 0.8, 2.9), (30, 0.8, 3.1), (40, 0.8, 8.0)]) == [0, 10, 20]


def test_the_initial_policy_stays_when_rl_only_hurts(tmp_path):
    keeper = BestPolicy("eval/rule_mean", None, str(tmp_path))
    assert _run(keeper, [(0, 0.95, 0.0), (10, 0.90, 1.0), (20, math.nan, 2.0), (30, 0.94, 3.0)]) == [0]


def test_a_metric_the_run_does_not_log_is_named_with_the_ones_it_does(tmp_path):
    keeper = BestPolicy("eval/gold_mean", None, str(tmp_path))
    with pytest.raises(ConfigError, match=r"eval/gold_mean.*\['eval/reward_mean', 'eval/solved_frac'\]"):
        keeper.consider({"eval/reward_mean": 0.5, "eval/solved_frac": 0.1}, 0.0)


def test_an_eval_whose_rewards_failed_is_no_candidate_and_no_error(tmp_path):
    """reward.fallback_score=null: an unscored eval has only NaN metrics; the run goes on."""
    keeper = BestPolicy("eval/rule_mean", None, str(tmp_path))
    assert _run(keeper, [(0, 0.7, 0.0)]) == [0]
    nan = float("nan")
    assert not keeper.consider({"eval/reward_mean": nan, "eval/solved_frac": nan}, 1.0)
