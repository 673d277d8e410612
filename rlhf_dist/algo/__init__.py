"""Pure torch RLHF math: masked ops, KL estimators, advantages, policy/value and preference losses.

Nothing here imports ray, vllm, deepspeed, hydra or wandb; every function works on plain tensors
and runs on CPU.
"""

from rlhf_dist.algo.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    gae_advantages,
    grpo_advantages,
    register_advantage,
    rloo_advantages,
)
from rlhf_dist.algo.kl import KL_ESTIMATORS, kl_penalty, register_kl_estimator
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
from rlhf_dist.algo.policy_loss import (
    POLICY_LOSSES,
    clipped_policy_loss,
    clipped_value_loss,
    compute_policy_loss,
    register_policy_loss,
)
from rlhf_dist.algo.preference import bradley_terry_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "POLICY_LOSSES",
    "aggregate_loss",
    "bradley_terry_loss",
    "clipped_policy_loss",
    "clipped_value_loss",
    "compute_advantages",
    "compute_policy_loss",
    "count_normalizers",
    "gae_advantages",
    "grpo_advantages",
    "kl_penalty",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "register_advantage",
    "register_kl_estimator",
    "register_loss_agg_mode",
    "register_policy_loss",
    "rloo_advantages",
]
