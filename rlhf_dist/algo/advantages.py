"""Advantage estimators, picked by name from config (`compute_advantages("grpo", ...)`).

Every estimator takes keyword arguments from one common superset and ignores the rest:

    rewards        (B,)    one scalar reward per sampled response (outcome reward)
    token_rewards  (B, T)  per-token rewards (e.g. outcome reward on the last token minus a KL
                           penalty on every token), used by "gae"
    values         (B, T)  critic values V(s_t), used by "gae"
    response_mask  (B, T)  1 on response tokens, 0 on padding (responses are right-padded)
    group_size, norm_by_std, eps, gamma, lam

and returns `(advantages, returns)`, both (B, T) and zero on padding. For the group estimators
the G = group_size responses to one prompt are contiguous rows: prompt i owns rows i*G .. i*G+G-1.
"""

from __future__ import annotations

from typing import Callable

import torch

from rlhf_dist.algo._registry import lookup, make_register
from rlhf_dist.errors import ConfigError

ADVANTAGE_ESTIMATORS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}
register_advantage = make_register(ADVANTAGE_ESTIMATORS, "advantage estimator")


def compute_advantages(name: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the advantage estimator registered as `name`; returns (advantages, returns), (B, T)."""
    return lookup(ADVANTAGE_ESTIMATORS, name, "advantage estimator")(**kwargs)


def _grouped(rewards: torch.Tensor, response_mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """Check the group layout and return rewards as (num_prompts, G)."""
    if rewards.dim() != 1 or rewards.shape[0] != response_mask.shape[0]:
        raise ValueError(
            f"rewards must be (B,) with B = response_mask.shape[0] = {response_mask.shape[0]}; "
            f"got shape {tuple(rewards.shape)}."
        )
    batch_size = rewards.shape[0]
    if group_size < 2:
        raise ConfigError(
            f"group_size={group_size}, but group baselines need at least 2 responses per prompt; "
            "set the number of samples per prompt to 2 or more."
        )
    if batch_size % group_size != 0:
        raise ConfigError(
            f"Batch of {batch_size} responses does not split into groups of group_size="
            f"{group_size}; the batch must hold num_prompts * group_size responses."
        )
    return rewards.view(batch_size // group_size, group_size)


def _broadcast_to_tokens(seq_advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B,) per-sequence advantage -> (B, T), zero on padding."""
    return seq_advantages.unsqueeze(-1) * response_mask.to(seq_advantages.dtype)


@register_advantage("grpo")
def grpo_advantages(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_size: int,
    norm_by_std: bool = True,
    eps: float = 1e-6,
    **_,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantage (GRPO, Shao et al. 2024, sec. 4.1.2, outcome supervision).

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)     for every token of response i

    std is the unbiased (n - 1) sample std, as `torch.std` computes it by default; a group whose
    rewards are all equal gets A = 0. `norm_by_std=False` keeps only the mean baseline (Dr. GRPO,
    Liu et al. 2025). There is no critic, so returns are the advantages themselves.
    """
    grouped = _grouped(rewards, response_mask, group_size).to(torch.float32)  # (P, G)
    centered = grouped - grouped.mean(dim=-1, keepdim=True)  # (P, G)
    if norm_by_std:
        centered = centered / (grouped.std(dim=-1, keepdim=True) + eps)
    advantages = _broadcast_to_tokens(centered.reshape(-1), response_mask)  # (B, T)
    return advantages, advantages.clone()


@register_advantage("rloo")
def rloo_advantages(
    rewards: torch.Tensor, response_mask: torch.Tensor, group_size: int, **_
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024).

        A_i = r_i - 1/(G-1) sum_{j != i} r_j  =  G/(G-1) * (r_i - mean(r_group))

    Returns are the advantages, as for "grpo".
    """
    grouped = _grouped(rewards, response_mask, group_size).to(torch.float32)  # (P, G)
    others_mean = (grouped.sum(dim=-1, keepdim=True) - grouped) / (group_size - 1)  # (P, G)
    advantages = _broadcast_to_tokens((grouped - others_mean).reshape(-1), response_mask)
    return advantages, advantages.clone()


@register_advantage("gae")
def gae_advantages(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    **_,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, eq. 11-16).

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = sum_{l>=0} (gamma * lam)^l * delta_{t+l}  =  delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                                  (the critic's regression target)

    The episode ends at the last response token, so V and A beyond it are 0. Masked positions are
    skipped by the backward recursion (the next value and advantage carry through them
    unchanged): for right-padded responses this is exactly "V = 0 past the end", and tokens
    masked inside a response (e.g. tool output) are treated as not being steps at all.
    """
    if not (token_rewards.shape == values.shape == response_mask.shape):
        raise ValueError(
            f"token_rewards {tuple(token_rewards.shape)}, values {tuple(values.shape)} and "
            f"response_mask {tuple(response_mask.shape)} must all be (B, T)."
        )
    token_rewards, values = token_rewards.float(), values.detach().float()
    mask = response_mask.bool()  # (B, T)
    num_steps = token_rewards.shape[1]
    next_value = torch.zeros_like(values[:, 0])  # (B,) V_{t+1}, 0 after the last token
    next_advantage = torch.zeros_like(values[:, 0])  # (B,) A_{t+1}
    advantages = torch.zeros_like(values)  # (B, T)
    for t in reversed(range(num_steps)):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        advantage = delta + gamma * lam * next_advantage  # (B,)
        # torch.where, not a multiply by the mask: padding may hold garbage (inf/NaN) values.
        next_advantage = torch.where(mask[:, t], advantage, next_advantage)
        next_value = torch.where(mask[:, t], values[:, t], next_value)
        advantages[:, t] = torch.where(mask[:, t], advantage, 0.0)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns
