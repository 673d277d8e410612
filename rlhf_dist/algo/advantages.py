"""Advantage estimators, picked by name from config (`compute_advantages("grpo", ...)`).

Every estimator takes the same keyword arguments and ignores the ones it does not use:

    scores         (B,)    one outcome score per sampled response (reward model or checker)
    kl_penalty     (B, T)  per-token KL penalty ALREADY multiplied by the KL coefficient beta
                           (all zeros when the KL is not in the reward but in the loss)
    response_mask  (B, T)  1 on response tokens, 0 on padding (responses are right-padded) and on
                           the observation tokens of multi-turn episodes (not steps of the policy)
    values         (B, T)  critic values V(s_t), used by "gae" only
    group_size, gamma, lam
    turn_rewards   (B, T)  optional rewards an environment gave during a multi-turn episode, each
                           on the last token of the policy turn it rewards (compute_advantages
                           only: it folds them into the per-token term, see there)

and returns `(advantages, returns)`, both (B, T), float32 and zero on padding. For the group
estimators the G = group_size responses to one prompt are contiguous rows: prompt i owns rows
i*G .. i*G+G-1.

The KL penalty enters in one of two ways:
  - token estimators ("reinforce_pp", "reinforce_pp_baseline", "gae") use `token_level_rewards`:
    the score on the last response token, minus the penalty on every token;
  - sequence estimators ("grpo", "dr_grpo", "rloo") use the sequence reward
    r_i = score_i - sum_t kl_penalty_it (KL in the reward as in RLOO, Ahmadian et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rlhf_dist.algo._registry import lookup, make_register
from rlhf_dist.algo.masked import masked_sum, masked_whiten
from rlhf_dist.errors import ConfigError

ADVANTAGE_ESTIMATORS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}
_register = make_register(ADVANTAGE_ESTIMATORS, "advantage estimator")


@dataclass(frozen=True)
class EstimatorNeeds:
    """What an estimator needs from the rest of the system; the trainer, the launcher and config
    validation ask this, never the estimator's name."""

    values: bool = False  # state values V(s_t) per response token: a critic
    groups: bool = False  # n >= 2 samples per prompt, compared within the group


ESTIMATOR_NEEDS: dict[str, EstimatorNeeds] = {}


def register_advantage(name: str, *, values: bool = False, groups: bool = False) -> Callable[[Callable], Callable]:
    """`@register_advantage("name", values=..., groups=...)`: the estimator and what it needs."""
    register = _register(name)

    def decorator(fn: Callable) -> Callable:
        fn = register(fn)  # refuses a name registered twice
        ESTIMATOR_NEEDS[name] = EstimatorNeeds(values=values, groups=groups)
        return fn

    return decorator


def estimator_needs(name: str) -> EstimatorNeeds:
    """What estimator `name` needs (ConfigError naming the valid estimators if unknown)."""
    lookup(ADVANTAGE_ESTIMATORS, name, "advantage estimator")
    return ESTIMATOR_NEEDS[name]


def compute_advantages(
    name: str,
    *,
    scores: torch.Tensor,
    kl_penalty: torch.Tensor,
    response_mask: torch.Tensor,
    values: torch.Tensor | None = None,
    group_size: int = 1,
    gamma: float = 1.0,
    lam: float = 1.0,
    turn_rewards: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the advantage estimator registered as `name`; returns (advantages, returns), (B, T).

    `turn_rewards` (multi-turn episodes) enter as a negative per-token penalty, so every estimator
    sees them where it sees the KL: the sequence estimators' reward is the episode return
    score + sum of turn rewards - sum of KL, and the token estimators (REINFORCE++, GAE) get each
    turn's reward at its own token (for REINFORCE++-baseline only the final score is centred).
    """
    estimator = lookup(ADVANTAGE_ESTIMATORS, name, "advantage estimator")
    if turn_rewards is not None:
        _check_shapes(scores, turn_rewards, response_mask)
        kl_penalty = kl_penalty - torch.where(response_mask.bool(), turn_rewards.float(), 0.0)
    return estimator(
        scores=scores, kl_penalty=kl_penalty, response_mask=response_mask, values=values,
        group_size=group_size, gamma=gamma, lam=lam,
    )


# ----------------------------------------------------------------------------------------------
# Helpers: rewards from scores and KL penalty, group layout, returns-to-go
# ----------------------------------------------------------------------------------------------


def _check_shapes(scores: torch.Tensor, kl_penalty: torch.Tensor, response_mask: torch.Tensor) -> None:
    if response_mask.dim() != 2 or kl_penalty.shape != response_mask.shape:
        raise ValueError(
            f"kl_penalty {tuple(kl_penalty.shape)} and response_mask {tuple(response_mask.shape)} "
            "must both be (B, T); pass torch.zeros_like(response_mask) when the KL is not in the "
            "reward."
        )
    if scores.dim() != 1 or scores.shape[0] != response_mask.shape[0]:
        raise ValueError(
            f"scores must be (B,) with B = response_mask.shape[0] = {response_mask.shape[0]}; "
            f"got shape {tuple(scores.shape)}."
        )


def token_level_rewards(
    scores: torch.Tensor, kl_penalty: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """(B, T) per-token rewards: score on the last response token, minus the KL penalty.

        r_t = score * [t = last response token] - kl_penalty_t     on response tokens, 0 elsewhere

    A row with no response token gets all zeros (its score goes nowhere).
    """
    _check_shapes(scores, kl_penalty, response_mask)
    mask = response_mask.bool()  # (B, T)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # (B, T)
    last = torch.where(mask, positions, -1).max(dim=-1).values  # (B,), -1 for empty rows
    is_last = positions == last[:, None]  # (B, T), all False for empty rows
    rewards = torch.where(mask, -kl_penalty.detach().float(), 0.0)  # (B, T)
    return rewards + torch.where(is_last, scores.detach().float()[:, None], 0.0)


def _sequence_rewards(
    scores: torch.Tensor, kl_penalty: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """(B,) r_i = score_i - sum_t kl_penalty_it over the response tokens."""
    _check_shapes(scores, kl_penalty, response_mask)
    kl_sum = masked_sum(kl_penalty.detach().float(), response_mask, dim=-1)  # (B,)
    return scores.detach().float() - kl_sum


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Check the group layout and return (B,) rewards as (num_prompts, G)."""
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
    return torch.where(response_mask.bool(), seq_advantages.unsqueeze(-1), 0.0)


def _returns_to_go(
    token_rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float
) -> torch.Tensor:
    """(B, T) returns-to-go G_t = r_t + gamma * G_next, zero on padding.

    G_next is G at the next response token (0 after the last one): masked positions are skipped,
    as in `gae_advantages`, so for right-padded rows G_t = sum_{s >= t} gamma^(s - t) r_s.
    """
    mask = response_mask.bool()  # (B, T)
    running = torch.zeros_like(token_rewards[:, 0])  # (B,) G_{t+1}
    returns = torch.zeros_like(token_rewards)  # (B, T)
    for t in reversed(range(token_rewards.shape[1])):
        running = torch.where(mask[:, t], token_rewards[:, t] + gamma * running, running)
        returns[:, t] = torch.where(mask[:, t], running, 0.0)
    return returns


def _whitened_returns(
    token_rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns): returns-to-go, and the same whitened over every masked token."""
    returns = _returns_to_go(token_rewards, response_mask, gamma)  # (B, T)
    advantages = torch.where(response_mask.bool(), masked_whiten(returns, response_mask), 0.0)
    return advantages, returns


def _group_centered(
    seq_rewards: torch.Tensor, group_size: int, norm_by_std: bool, eps: float
) -> torch.Tensor:
    """(B,) r_i - mean_G, divided by (std_G + eps) when `norm_by_std`."""
    grouped = _grouped(seq_rewards, group_size)  # (P, G)
    centered = grouped - grouped.mean(dim=-1, keepdim=True)  # (P, G)
    if norm_by_std:
        centered = centered / (grouped.std(dim=-1, keepdim=True) + eps)
    return centered.reshape(-1)


# ----------------------------------------------------------------------------------------------
# Estimators
# ----------------------------------------------------------------------------------------------


@register_advantage("grpo", groups=True)
def grpo_advantages(
    scores: torch.Tensor,
    kl_penalty: torch.Tensor,
    response_mask: torch.Tensor,
    group_size: int,
    eps: float = 1e-6,
    **_,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantage (GRPO, Shao et al. 2024, sec. 4.1.2, outcome supervision).

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)     for every token of response i

    r_i is the sequence reward (score minus summed KL penalty). std is the unbiased (n - 1)
    sample std, as `torch.std`; a group whose rewards are all equal gets A = 0. There is no
    critic, so returns are the advantages themselves.
    """
    seq_rewards = _sequence_rewards(scores, kl_penalty, response_mask)  # (B,)
    seq_advantages = _group_centered(seq_rewards, group_size, norm_by_std=True, eps=eps)
    advantages = _broadcast_to_tokens(seq_advantages, response_mask)  # (B, T)
    return advantages, advantages.clone()


@register_advantage("dr_grpo", groups=True)
def dr_grpo_advantages(
    scores: torch.Tensor, kl_penalty: torch.Tensor, response_mask: torch.Tensor, group_size: int, **_
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", sec. 3).

        A_i = r_i - mean(r_group)

    GRPO without the division by the group std, which up-weights prompts that are too easy or
    too hard (question-level difficulty bias). Pair with loss_agg "seq_mean_token_sum_norm" to
    also drop GRPO's 1/|o_i| length normalisation. Returns are the advantages.
    """
    seq_rewards = _sequence_rewards(scores, kl_penalty, response_mask)  # (B,)
    seq_advantages = _group_centered(seq_rewards, group_size, norm_by_std=False, eps=0.0)
    advantages = _broadcast_to_tokens(seq_advantages, response_mask)  # (B, T)
    return advantages, advantages.clone()


@register_advantage("rloo", groups=True)
def rloo_advantages(
    scores: torch.Tensor, kl_penalty: torch.Tensor, response_mask: torch.Tensor, group_size: int, **_
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024, eq. 6).

        A_i = r_i - 1/(G-1) sum_{j != i} r_j  =  G/(G-1) * (r_i - mean(r_group))

    with r_i = score_i - sum_t kl_penalty_it (KL in the reward). Returns are the advantages.
    """
    seq_rewards = _sequence_rewards(scores, kl_penalty, response_mask)  # (B,)
    grouped = _grouped(seq_rewards, group_size)  # (P, G)
    others_mean = (grouped.sum(dim=-1, keepdim=True) - grouped) / (group_size - 1)  # (P, G)
    advantages = _broadcast_to_tokens((grouped - others_mean).reshape(-1), response_mask)
    return advantages, advantages.clone()


@register_advantage("reinforce_pp")
def reinforce_pp_advantages(
    scores: torch.Tensor, kl_penalty: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0, **_
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning LLMs").

        r_t = score * [t = last] - kl_penalty_t             (token_level_rewards)
        G_t = sum_{s >= t} gamma^(s-t) r_s                  (returns-to-go)
        A_t = (G_t - mean(G)) / std(G)                      mean/std over ALL response tokens
                                                            of the batch (global normalisation)

    Returns (the second output) are the unwhitened G_t.
    """
    token_rewards = token_level_rewards(scores, kl_penalty, response_mask)  # (B, T)
    return _whitened_returns(token_rewards, response_mask, gamma)


@register_advantage("reinforce_pp_baseline", groups=True)
def reinforce_pp_baseline_advantages(
    scores: torch.Tensor,
    kl_penalty: torch.Tensor,
    response_mask: torch.Tensor,
    group_size: int,
    gamma: float = 1.0,
    **_,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++-baseline (Hu 2025): REINFORCE++ on group-mean-centred scores.

        score'_i = score_i - mean(score_group)               (needs group_size >= 2)
        then r_t, G_t and the global whitening of "reinforce_pp" with score' in place of score.

    Centring before the KL penalty keeps the penalty out of the baseline; the global (not
    per-group) std avoids GRPO's per-prompt difficulty bias.
    """
    _check_shapes(scores, kl_penalty, response_mask)
    grouped = _grouped(scores.detach().float(), group_size)  # (P, G)
    centered = (grouped - grouped.mean(dim=-1, keepdim=True)).reshape(-1)  # (B,)
    token_rewards = token_level_rewards(centered, kl_penalty, response_mask)  # (B, T)
    return _whitened_returns(token_rewards, response_mask, gamma)


@register_advantage("gae", values=True)
def gae_advantages(
    scores: torch.Tensor,
    kl_penalty: torch.Tensor,
    response_mask: torch.Tensor,
    values: torch.Tensor | None,
    gamma: float = 1.0,
    lam: float = 1.0,
    **_,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, eq. 11-16) on token_level_rewards.

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = sum_{l>=0} (gamma * lam)^l * delta_{t+l}  =  delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                                  (the critic's regression target)

    The episode ends at the last response token, so V and A beyond it are 0. Masked positions are
    skipped by the backward recursion (the next value and advantage carry through them
    unchanged): for right-padded responses this is exactly "V = 0 past the end", and tokens
    masked inside a response (e.g. tool output) are treated as not being steps at all.
    """
    if values is None:
        raise ValueError("advantage estimator 'gae' needs critic `values` (B, T); got None.")
    token_rewards = token_level_rewards(scores, kl_penalty, response_mask)  # (B, T)
    if values.shape != token_rewards.shape:
        raise ValueError(
            f"values {tuple(values.shape)} must have the shape of response_mask "
            f"{tuple(response_mask.shape)}, (B, T)."
        )
    values = values.detach().float()
    mask = response_mask.bool()  # (B, T)
    next_value = torch.zeros_like(values[:, 0])  # (B,) V_{t+1}, 0 after the last token
    next_advantage = torch.zeros_like(values[:, 0])  # (B,) A_{t+1}
    advantages = torch.zeros_like(values)  # (B, T)
    for t in reversed(range(values.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        advantage = delta + gamma * lam * next_advantage  # (B,)
        # torch.where, not a multiply by the mask: padding may hold garbage (inf/NaN) values.
        next_advantage = torch.where(mask[:, t], advantage, next_advantage)
        next_value = torch.where(mask[:, t], values[:, t], next_value)
        advantages[:, t] = torch.where(mask[:, t], advantage, 0.0)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns
