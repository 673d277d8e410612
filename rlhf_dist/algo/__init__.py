"""Pure torch RLHF math: masked ops, KL estimators, advantages, policy/value and preference losses.

Nothing here imports ray, vllm, deepspeed, hydra or wandb; every function works on plain tensors
and runs on CPU.
"""

from rlhf_dist.algo.advantages import (
    ADVANTAGE_ESTIMATORS,
    EstimatorNeeds,
    compute_advantages,
    dr_grpo_advantages,
    estimator_needs,
    gae_advantages,
    grpo_advantages,
    register_advantage,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    token_level_rewards,
)
from rlhf_dist.algo.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_penalty,
    make_kl_controller,
    register_kl_estimator,
)
from rlhf_dist.algo.masked import (
    LOSS_AGG_MODES,
    aggregate_loss,
    count_normalizers,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    register_loss_agg_mode,
)
from rlhf_dist.algo.objective import policy_objective, rollout_correction, value_objective
from rlhf_dist.algo.policy_loss import (
    POLICY_LOSSES,
    clipped_policy_loss,
    clipped_value_loss,
    compute_policy_loss,
    explained_variance,
    gspo_policy_loss,
    register_policy_loss,
    truncated_is_weights,
)
from rlhf_dist.algo.preference import bradley_terry_loss
from rlhf_dist.algo.shaping import groups_with_signal, overlong_penalty

__all__ = [
    "groups_with_signal",
    "overlong_penalty",
    "ADVANTAGE_ESTIMATORS",
    "EstimatorNeeds",
    "estimator_needs",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "POLICY_LOSSES",
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate_loss",
    "bradley_terry_loss",
    "clipped_policy_loss",
    "clipped_value_loss",
    "compute_advantages",
    "compute_policy_loss",
    "count_normalizers",
    "dr_grpo_advantages",
    "explained_variance",
    "gae_advantages",
    "grpo_advantages",
    "gspo_policy_loss",
    "kl_penalty",
    "make_kl_controller",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_objective",
    "register_advantage",
    "register_kl_estimator",
    "register_loss_agg_mode",
    "register_policy_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "rloo_advantages",
    "rollout_correction",
    "token_level_rewards",
    "truncated_is_weights",
    "value_objective",
]
