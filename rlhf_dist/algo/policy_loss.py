"""Policy losses (picked by name from config), rollout importance weights, and the PPO value loss.

A policy loss maps per-token log-probabilities to a (B, T) per-token loss plus a dict of detached
scalar stats; `aggregate_loss` (masked.py) reduces the per-token loss to the scalar to backprop.
Every variant takes the same keyword arguments and ignores the ones it does not use:

    logprobs       (B, T)  log pi_theta(y_t), with grad
    old_logprobs   (B, T)  log pi_old(y_t) of the policy that produced the batch (no grad)
    advantages     (B, T)
    response_mask  (B, T)  1 on response tokens, 0 on padding
    clip_low, clip_high    the PPO ratio range [1 - clip_low, 1 + clip_high]
    clip_ratio_c           dual-clip bound for negative advantages (None: no dual clip)
    is_weights     (B, T)  truncated importance weights multiplying the per-token loss (or None)

so the learner calls `compute_policy_loss(name, logprobs=..., old_logprobs=..., ...)` whatever
the variant.
"""

from __future__ import annotations

from typing import Callable

import torch

from rlhf_dist.algo._registry import lookup, make_register
from rlhf_dist.algo.masked import masked_mean, masked_var

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


def _masked_min(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Min over masked elements; 0 when nothing is masked in."""
    return -_masked_max(-values, mask)


def _clipped_surrogate(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    clip_ratio_c: float | None,
    is_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clip + dual clip + importance weights on a (B, T) ratio; shared by "clipped" and "gspo".

        l_t = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip_low, 1 + clip_high))
        l_t = min(l_t, -A_t * c)    where A_t < 0, if clip_ratio_c = c is given (dual clip)
        l_t = w_t * l_t             if is_weights w is given (detached)
    """
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise ValueError(
            f"clip_ratio_c={clip_ratio_c}: the dual-clip bound must be > 1 (Ye et al. 2020 use "
            "3); set it to None to disable dual clipping."
        )
    unclipped_loss = -advantages * ratio  # (B, T)
    clipped_loss = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (B, T)
    per_token_loss = torch.maximum(unclipped_loss, clipped_loss)  # (B, T)
    negative = advantages < 0  # (B, T)
    dual_clipped = torch.zeros_like(negative)  # (B, T)
    if clip_ratio_c is not None:
        dual_bound = -advantages * clip_ratio_c  # (B, T)
        dual_clipped = negative & (per_token_loss > dual_bound)
        dual_loss = torch.minimum(per_token_loss, dual_bound)  # (B, T)
        per_token_loss = torch.where(negative, dual_loss, per_token_loss)
    if is_weights is not None:
        per_token_loss = per_token_loss * is_weights.detach()
    per_token_loss = torch.where(response_mask.bool(), per_token_loss, 0.0)

    with torch.no_grad():
        log_ratio = ratio.log()
        clipped_low = negative & (ratio < 1.0 - clip_low)  # (B, T)
        clipped_high = (advantages > 0) & (ratio > 1.0 + clip_high)  # (B, T)
        clip_frac_low = masked_mean(clipped_low.float(), response_mask)
        clip_frac_high = masked_mean(clipped_high.float(), response_mask)
        stats = {
            "clip_frac_low": clip_frac_low,
            "clip_frac_high": clip_frac_high,
            "clip_frac_dual": masked_mean(dual_clipped.float(), response_mask),
            "clip_frac": clip_frac_low + clip_frac_high,
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio, response_mask),
            "ratio_mean": masked_mean(ratio, response_mask),
            "ratio_min": _masked_min(ratio, response_mask),
            "ratio_max": _masked_max(ratio, response_mask),
        }
    return per_token_loss, stats


@register_policy_loss("clipped")
def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float | None = None,
    is_weights: torch.Tensor | None = None,
    **_,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), negated, with optional dual clip.

        ratio_t = pi_theta(y_t) / pi_old(y_t)
        loss_t  = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip_low, 1 + clip_high))
        loss_t  = min(loss_t, -A_t * c)     for A_t < 0 when clip_ratio_c = c is given

    Separate `clip_low` / `clip_high` allow DAPO's asymmetric "clip-higher" (Yu et al. 2025).
    Dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL", eq. 5):
    with A < 0 the PPO loss -A * ratio grows without bound as the ratio grows; capping it at
    -A * c (c > 1, e.g. 3) bounds one stale token's loss, and its gradient is then 0.
    `is_weights` (detached) multiply the per-token loss (TIS, see `truncated_is_weights`).

    Returns:
        per_token_loss: (B, T), zero on padding.
        stats: detached masked means over response tokens:
            "clip_frac_low"  A < 0 and ratio < 1 - clip_low (clipped from below, gradient 0),
            "clip_frac_high" A > 0 and ratio > 1 + clip_high (clipped from above, gradient 0),
            "clip_frac"      their sum,
            "clip_frac_dual" A < 0 and the dual bound is active (also gradient 0),
            "approx_kl"      k3 estimate of KL(pi_old || pi_theta) from the tokens pi_old
                             sampled: (ratio - 1) - log ratio (Schulman 2020),
            "ratio_mean", and masked "ratio_min" / "ratio_max" (0 when the mask is empty).
    """
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)  # (B, T)
    return _clipped_surrogate(
        ratio, advantages, response_mask, clip_low, clip_high, clip_ratio_c, is_weights
    )


@register_policy_loss("gspo")
def gspo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float | None = None,
    is_weights: torch.Tensor | None = None,
    **_,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"), in its GSPO-token form.

        s_i    = exp( (1/|y_i|) sum_t log(pi_theta(y_it) / pi_old(y_it)) )   sequence ratio
        s_it   = sg[s_i] * pi_theta(y_it) / sg[pi_theta(y_it)]                value s_i
        loss_t = max(-A_t * s_it, -A_t * clip(s_it, 1 - clip_low, 1 + clip_high))

    Every token of a sequence has the same ratio value s_i, so a sequence is clipped as a whole,
    and each unclipped token's gradient is -A_t * s_i * grad log pi_theta(y_it). Aggregating with
    "seq_mean_token_mean" gives GSPO's (1/|y_i|) sum_t; the dual clip and `is_weights` act as in
    "clipped". GSPO uses much smaller clip ranges than PPO (the paper: 3e-4 / 4e-4).

    Returns: per_token_loss (B, T) zero on padding, and the stats of "clipped", computed on s_it.
    """
    log_ratio = logprobs - old_logprobs.detach()  # (B, T)
    seq_log_ratio = masked_mean(log_ratio, response_mask, dim=-1)  # (B,)
    seq_log_ratio = seq_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).detach()
    token_log_ratio = logprobs - logprobs.detach() + seq_log_ratio[:, None]  # (B, T), value log s_i
    ratio = torch.exp(token_log_ratio)  # (B, T)
    return _clipped_surrogate(
        ratio, advantages, response_mask, clip_low, clip_high, clip_ratio_c, is_weights
    )


def truncated_is_weights(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    cap: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance sampling weights for the rollout-engine / trainer mismatch.

        d_t = log pi_old(y_t) - log pi_rollout(y_t)
        w_t = min(exp(d_t), cap)

    (TIS, Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
    Training".)

    The tokens were sampled by the rollout engine (e.g. vLLM in bf16), whose probabilities differ
    from the trainer's pi_old for the same weights; w_t re-weights the loss towards pi_old, and
    the cap bounds the variance. Weights are detached and 1 on padding.

    Returns:
        weights: (B, T).
        stats (detached, over response tokens): "is_weight_mean", "is_weight_max" (of the capped
            weights), "is_capped_frac" (exp(d) > cap), "rollout_mismatch_kl" (k3 estimate of
            KL(pi_rollout || pi_old) from the rollout's samples: mean of exp(d) - 1 - d, >= 0 and
            unbiased since E_rollout[exp(d)] = 1), "rollout_logprob_diff_max" (max |d|).
    """
    if cap <= 0:
        raise ValueError(f"truncated_is_weights needs cap > 0 (typically 2 to 10); got cap={cap}.")
    mask = response_mask.bool()  # (B, T)
    with torch.no_grad():
        log_diff = (old_logprobs - rollout_logprobs).float()  # (B, T)
        log_diff = torch.where(mask, log_diff, 0.0).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        raw_weights = torch.exp(log_diff)  # (B, T)
        weights = torch.where(mask, raw_weights.clamp(max=cap), 1.0)  # (B, T)
        stats = {
            "is_weight_mean": masked_mean(weights, mask),
            "is_weight_max": _masked_max(weights, mask),
            "is_capped_frac": masked_mean((raw_weights > cap).float(), mask),
            "rollout_mismatch_kl": masked_mean(raw_weights - 1.0 - log_diff, mask),
            "rollout_logprob_diff_max": _masked_max(log_diff.abs(), mask),
        }
    return weights, stats


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    clip_range: float | None = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss for a PPO critic (as in OpenAI baselines' PPO2).

        V_clip = old_V + clip(V - old_V, -c, c)
        loss_t = 0.5 * max((V_t - R_t)^2, (V_clip_t - R_t)^2)

    The critic may not move its prediction by more than `clip_range` from the rollout-time value
    in one update unless that also reduces the error. `clip_range=None`: plain 0.5 (V - R)^2.

    Args:
        values: (B, T) current critic values (with grad).
        old_values: (B, T) critic values at rollout time.
        returns: (B, T) regression targets (e.g. GAE returns).
        response_mask: (B, T) 1 on response tokens, 0 on padding.

    Returns:
        per_token_loss: (B, T), zero on padding.
        stats: detached masked means "clip_frac" (tokens where the clipped error is larger; 0
            without clipping), "values_mean", "returns_mean".
    """
    old_values, returns = old_values.detach(), returns.detach()
    unclipped_error = (values - returns).square()  # (B, T)
    if clip_range is None:
        clipped_error = unclipped_error
    else:
        clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)  # (B, T)
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


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """How much of the returns' variance the critic explains, over the masked tokens (a scalar).

        EV = 1 - Var[R - V] / Var[R]

    1 is a perfect critic, 0 one no better than a constant, < 0 worse than a constant. When
    Var[R] = 0 (all returns equal, or fewer than two tokens) the ratio is undefined and 0 is
    returned. Detached.
    """
    with torch.no_grad():
        values, returns = values.float(), returns.float()
        returns_var = masked_var(returns, mask)
        residual_var = masked_var(returns - values, mask)
        explained = 1.0 - residual_var / returns_var.clamp(min=torch.finfo(returns_var.dtype).tiny)
        return torch.where(returns_var > 0, explained, torch.zeros_like(explained))
