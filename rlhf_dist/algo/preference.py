"""Pairwise preference loss for reward-model training."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry negative log-likelihood of the human preference.

    Under the Bradley-Terry model (Bradley & Terry 1952) P(chosen > rejected) =
    sigmoid(r_c - r_r); the reward-model loss (Ouyang et al. 2022, eq. 1) is its negative log:

        loss = -mean(log sigmoid(r_c - r_r - m))

    An optional margin m (scalar or per pair, as in Llama 2, Touvron et al. 2023) asks for a
    larger reward gap on pairs that annotators rated as clearly different.

    Args:
        chosen_rewards: (B,) scalar reward of the preferred response of each pair.
        rejected_rewards: (B,) scalar reward of the other response.
        margin: None, a float, or (B,) per-pair margins.

    Returns:
        loss: scalar.
        stats: detached "accuracy" (fraction of pairs with r_c > r_r, margin ignored) and
            "margin_mean" (mean of r_c - r_r).
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"chosen_rewards {tuple(chosen_rewards.shape)} and rejected_rewards "
            f"{tuple(rejected_rewards.shape)} must have the same (B,) shape."
        )
    reward_gap = chosen_rewards - rejected_rewards  # (B,)
    logits = reward_gap if margin is None else reward_gap - margin
    loss = -F.logsigmoid(logits).mean()  # logsigmoid is stable for large |logits|
    with torch.no_grad():
        stats = {
            "accuracy": (reward_gap > 0).float().mean(),
            "margin_mean": reward_gap.mean(),
        }
    return loss, stats
