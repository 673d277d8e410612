"""The per-micro-batch training objectives: the policy's and the critic's.

    L_policy = agg(w * l_pg) + beta_loss * agg(k(log pi - log pi_ref)) - c_ent * agg(H(pi))
    L_critic = c_v * agg(l_value)

`agg` is `aggregate_loss` with the mini-batch's global token/sequence counts, so summing L over
micro-batches and data-parallel ranks gives exactly the loss of the whole mini-batch (shard
invariance). Every returned metric is additive the same way; the stats (clip fractions, ratio
extremes, ...) are per micro-batch and are averaged (or maxed) by the caller.

The KL in the loss (GRPO's form, Shao et al. 2024, eq. 3-4) is separate from a KL penalty in the
reward (`kl_penalty` in the advantages); see kl.py for which estimator's gradient is which KL.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from rlhf_dist.algo.kl import kl_penalty
from rlhf_dist.algo.masked import aggregate_loss
from rlhf_dist.algo.policy_loss import clipped_value_loss, compute_policy_loss, truncated_is_weights


@dataclass(frozen=True)
class PolicyLossConfig:
    """Everything a policy rank needs to compute its loss: the message the trainer sends with each
    `train_step` (rlhf_dist.actors.learner)."""

    temperature: float  # the sampling temperature: logprobs of logits / T, as the engine sampled
    policy_loss: str = "clipped"  # registered in policy_loss.py
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_ratio_c: float | None = None  # dual-clip bound, None = off
    kl_loss_coef: float = 0.0  # beta of the KL term in the loss (0: KL in the reward, or none)
    kl_loss_estimator: str = "k3_st"
    entropy_coef: float = 0.0
    loss_agg: str = "token_mean"
    horizon: float | None = None  # seq_mean_token_sum_norm's constant (max_new_tokens)
    old_logprobs_source: str = "rollout"  # rollout | recomputed | current (rollout_correction)
    tis_cap: float | None = None  # truncated IS weight cap (with a source other than rollout)
    same_weights_as_engine: bool = True  # the engine sampled with these very weights (not async)
    banned_token_id: int | None = None  # EOS under fixed lengths: the engine never sampled it
    sft_coef: float = 0.0  # the SFT-mix term's weight (its rows come with the train_step)

    def objective_kwargs(self) -> dict:
        """The keyword arguments of `policy_objective` this config sets."""
        keys = ("policy_loss", "clip_low", "clip_high", "clip_ratio_c", "kl_loss_coef", "kl_loss_estimator",
                "entropy_coef", "loss_agg", "horizon")
        return {k: v for k, v in asdict(self).items() if k in keys}


@dataclass(frozen=True)
class ValueLossConfig:
    """What a critic rank needs for its loss (rlhf_dist.actors.critic), sent with each `train_step`."""

    clip_range: float | None
    loss_agg: str = "token_mean"
    horizon: float | None = None
    value_loss_coef: float = 1.0


def policy_objective(
    logprobs: torch.Tensor,  # (B, T) current policy, with grad
    old_logprobs: torch.Tensor,  # (B, T) the policy that produced the batch
    advantages: torch.Tensor,  # (B, T)
    response_mask: torch.Tensor,  # (B, T)
    ref_logprobs: torch.Tensor | None = None,  # (B, T) needed when kl_loss_coef > 0
    entropy: torch.Tensor | None = None,  # (B, T) needed when entropy_coef > 0
    *,
    policy_loss: str = "clipped",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float | None = None,
    kl_loss_coef: float = 0.0,
    kl_loss_estimator: str = "k3_st",
    entropy_coef: float = 0.0,
    loss_agg: str = "token_mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    horizon: float | None = None,
    is_weights: torch.Tensor | None = None,  # (B, T) truncated IS weights, or None
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Returns (loss, additive metrics, per-micro-batch policy stats such as clip_frac).

    Additive metrics: "loss/policy", "loss/total", "kl/loss_term" (agg of the KL estimate; only
    when `ref_logprobs` is given) and "entropy/mean" (only when `entropy` is given). The KL and
    entropy terms enter the loss only when their coefficient is > 0.
    """
    if kl_loss_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_loss_coef > 0 needs ref_logprobs (B, T); got None.")

    def agg(per_token: torch.Tensor) -> torch.Tensor:
        return aggregate_loss(
            per_token, response_mask, loss_agg,
            num_tokens=num_tokens, num_seqs=num_seqs, horizon=horizon,
        )

    pg_per_token, pg_stats = compute_policy_loss(
        policy_loss,
        logprobs=logprobs,
        old_logprobs=old_logprobs,
        advantages=advantages,
        response_mask=response_mask,
        clip_low=clip_low,
        clip_high=clip_high,
        clip_ratio_c=clip_ratio_c,
        is_weights=is_weights,
    )
    pg_loss = agg(pg_per_token)
    loss = pg_loss
    metrics = {"loss/policy": pg_loss.detach()}
    if ref_logprobs is not None:
        kl_term = agg(kl_penalty(logprobs, ref_logprobs, kl_loss_estimator))
        metrics["kl/loss_term"] = kl_term.detach()
        if kl_loss_coef > 0:
            loss = loss + kl_loss_coef * kl_term
    if entropy is not None:
        entropy_term = agg(entropy)
        metrics["entropy/mean"] = entropy_term.detach()
        if entropy_coef > 0:
            loss = loss - entropy_coef * entropy_term
    metrics["loss/total"] = loss.detach()
    return loss, metrics, {k: v.detach() for k, v in pg_stats.items()}


def rollout_correction(
    logprobs: torch.Tensor,  # (B, T) current policy, with grad
    rollout_logprobs: torch.Tensor,  # (B, T) the engine's sampling logprobs
    response_mask: torch.Tensor,  # (B, T)
    source: str,  # "rollout" | "recomputed" | "current" (rlhf_dist.config.old_logprobs_source)
    old_logprobs: torch.Tensor | None = None,  # (B, T) recomputed by the learner, for "recomputed"
    tis_cap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """log pi_old for the policy loss and the TIS weights w_t = min(pi_old(y_t) / pi_rollout(y_t), cap)
    that correct for the tokens having been sampled by the engine (Yao et al. 2025).

        rollout     pi_old = pi_rollout: no weights
        recomputed  pi_old = the learner's own forward before its first update
        current     pi_old = sg[pi_theta], this very forward: the ratio is 1 and the gradient
                    -A_t * w_t * grad log pi_theta(y_t), the TIS-weighted policy gradient. Exact when
                    the batch gets one optimizer step (pi_old is then the policy being trained), and
                    no extra forward pass. With stale engine weights (async rollout) w also
                    corrects for the update the engine has not seen.

    Returns (old_logprobs (B, T) detached, is_weights (B, T) or None, TIS stats).
    """
    if source == "rollout":
        return rollout_logprobs, None, {}
    if source == "current":
        old_logprobs = logprobs.detach()
    elif source != "recomputed" or old_logprobs is None:
        raise ValueError(f"rollout_correction: source={source!r} with old_logprobs "
                         f"{'None' if old_logprobs is None else 'given'}; expected 'rollout', "
                         "'current', or 'recomputed' with the recomputed old_logprobs.")
    if tis_cap is None:
        return old_logprobs, None, {}
    is_weights, stats = truncated_is_weights(old_logprobs, rollout_logprobs, response_mask, tis_cap)
    return old_logprobs, is_weights, stats


def value_objective(
    values: torch.Tensor,  # (B, T) current critic, with grad
    old_values: torch.Tensor,  # (B, T) critic at rollout time
    returns: torch.Tensor,  # (B, T) regression targets
    response_mask: torch.Tensor,  # (B, T)
    *,
    clip_range: float | None,
    loss_agg: str,
    num_tokens: float | None,
    num_seqs: float | None,
    horizon: float | None = None,
    value_loss_coef: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Critic loss c_v * agg(clipped value loss); returns (loss, additive metrics, stats).

    Additive metric "critic/value_loss" is agg(l_value) before the coefficient; per-micro-batch
    stats "critic/value_clip_frac", "critic/values_mean", "critic/returns_mean".
    """
    per_token, stats = clipped_value_loss(values, old_values, returns, response_mask, clip_range)  # (B, T)
    value_loss = aggregate_loss(
        per_token, response_mask, loss_agg, num_tokens=num_tokens, num_seqs=num_seqs, horizon=horizon
    )
    metrics = {"critic/value_loss": value_loss.detach()}
    stats = {
        "critic/value_clip_frac": stats["clip_frac"],
        "critic/values_mean": stats["values_mean"],
        "critic/returns_mean": stats["returns_mean"],
    }
    return value_loss_coef * value_loss, metrics, stats
