"""Policy losses (picked by name from config) and the PPO value loss.

A policy loss maps per-token log-probabilities to a (B, T) per-token loss plus a dict of detached
scalar stats; `aggregate_loss` (masked.py) reduces the per-token loss to the scalar to backprop.
All variants take keyword arguments and ignore the ones they do not use, so the learner can call
`compute_policy_loss(name, logprobs=..., old_logprobs=..., advantages=..., response_mask=...,
**loss_kwargs)` whatever the variant.
"""

from __future__ import annotations

from typing import Callable

import torch

from rlhf_dist.algo._registry import lookup, make_register
from rlhf_dist.algo.masked import masked_mean

POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]] = {}
register_policy_loss = make_register(POLICY_LOSSES, "policy loss")

# exp(log ratio) overflows float32 past 88 (fp16 past 11). A token with |log ratio| > 20 means the
# policy has left the one that sampled it far behind; clamping keeps its loss finite (its gradient
# is then 0) instead of letting one token turn the whole step into inf or NaN.
LOG_RATIO_CLAMP = 20.0


def compute_policy_loss(name: str, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run the policy loss registered as `name`; returns (per_token_loss (B, T), stats)."""
    return lookup(POLICY_LOSSES, name, "policy loss")(**kwargs)


def _masked_max(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over masked elements; 0 when nothing is masked in."""
    filled = torch.where(mask.bool(), values, torch.full_like(values, float("-inf")))
    max_value = filled.max()
    return torch.where(torch.isinf(max_value), torch.zeros_like(max_value), max_value)


@register_policy_loss("clipped")
def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    **_,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), negated to be minimized.

        ratio_t = pi_theta(y_t) / pi_old(y_t)
        loss_t  = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip_low, 1 + clip_high))

    Separate `clip_low` / `clip_high` allow DAPO's asymmetric "clip-higher" (Yu et al. 2025).

    Args:
        logprobs: (B, T) log-probs of the sampled tokens under the policy being trained.
        old_logprobs: (B, T) the same under the policy that generated the batch (no grad).
        advantages: (B, T) per-token advantages.
        response_mask: (B, T) 1 on response tokens, 0 on padding.

    Returns:
        per_token_loss: (B, T), zero on padding.
        stats: detached masked means: "clip_frac" (tokens where the clipped term is chosen, so
            their gradient is 0), "approx_kl" (k3 estimate of KL(pi_old || pi_theta) from the
            tokens pi_old sampled: (ratio - 1) - log ratio, Schulman 2020), "ratio_mean",
            "ratio_max".
    """
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped_loss = -advantages * ratio  # (B, T)
    clipped_loss = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (B, T)
    per_token_loss = torch.maximum(unclipped_loss, clipped_loss)
    per_token_loss = torch.where(response_mask.bool(), per_token_loss, 0.0)

    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped_loss > unclipped_loss).float(), response_mask),
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio, response_mask),
            "ratio_mean": masked_mean(ratio, response_mask),
            "ratio_max": _masked_max(ratio, response_mask),
        }
    return per_token_loss, stats


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss for a PPO critic (as in OpenAI baselines' PPO2).

        V_clip = old_V + clip(V - old_V, -c, c)
        loss_t = 0.5 * max((V_t - R_t)^2, (V_clip_t - R_t)^2)

    The critic may not move its prediction by more than `clip_range` from the rollout-time value
    in one update unless that also reduces the error.

    Args:
        values: (B, T) current critic values (with grad).
        old_values: (B, T) critic values at rollout time.
        returns: (B, T) regression targets (e.g. GAE returns).
        response_mask: (B, T) 1 on response tokens, 0 on padding.

    Returns:
        per_token_loss: (B, T), zero on padding.
        stats: detached masked means "clip_frac" (tokens where the clipped error is larger),
            "values_mean", "returns_mean".
    """
    old_values, returns = old_values.detach(), returns.detach()
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)  # (B, T)
    unclipped_error = (values - returns).square()  # (B, T)
    clipped_error = (clipped_values - returns).square()  # (B, T)
    per_token_loss = 0.5 * torch.maximum(unclipped_error, clipped_error)
    per_token_loss = torch.where(response_mask.bool(), per_token_loss, 0.0)

    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped_error > unclipped_error).float(), response_mask),
            "values_mean": masked_mean(values, response_mask),
            "returns_mean": masked_mean(returns, response_mask),
        }
    return per_token_loss, stats
