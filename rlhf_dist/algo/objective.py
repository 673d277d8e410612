"""The per-micro-batch training objective: policy loss + KL to the reference - entropy bonus.

    L = agg(l_pg) + beta * agg(KL_est(pi || pi_ref)) - c_ent * agg(H(pi))

`agg` is `aggregate_loss` with the mini-batch's global token/sequence counts, so summing L over
micro-batches and data-parallel ranks gives exactly the loss of the whole mini-batch (shard
invariance). Every returned metric is additive the same way.
"""

from __future__ import annotations

import torch

from rlhf_dist.algo.kl import kl_penalty
from rlhf_dist.algo.masked import aggregate_loss
from rlhf_dist.algo.policy_loss import compute_policy_loss


def policy_objective(
    logprobs: torch.Tensor,  # (B, T) current policy, with grad
    old_logprobs: torch.Tensor,  # (B, T) behaviour policy (rollout engine)
    advantages: torch.Tensor,  # (B, T)
    response_mask: torch.Tensor,  # (B, T)
    ref_logprobs: torch.Tensor | None = None,  # (B, T) needed when kl_coef > 0
    entropy: torch.Tensor | None = None,  # (B, T) needed when entropy_coef > 0
    *,
    policy_loss: str = "clipped",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    loss_agg: str = "token_mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Returns (loss, additive metrics, per-micro-batch policy stats such as clip_frac)."""
    def agg(per_token: torch.Tensor) -> torch.Tensor:
        return aggregate_loss(per_token, response_mask, loss_agg, num_tokens=num_tokens, num_seqs=num_seqs)

    pg_per_token, pg_stats = compute_policy_loss(
        policy_loss,
        logprobs=logprobs,
        old_logprobs=old_logprobs,
        advantages=advantages,
        response_mask=response_mask,
        clip_low=clip_low,
        clip_high=clip_high,
    )
    pg_loss = agg(pg_per_token)
    loss = pg_loss
    metrics = {"loss/policy": pg_loss.detach()}
    if ref_logprobs is not None:
        kl = agg(kl_penalty(logprobs, ref_logprobs, kl_estimator))
        metrics["kl/mean"] = kl.detach()
        if kl_coef > 0:
            loss = loss + kl_coef * kl
    if entropy is not None:
        ent = agg(entropy)
        metrics["entropy/mean"] = ent.detach()
        if entropy_coef > 0:
            loss = loss - entropy_coef * ent
    metrics["loss/total"] = loss.detach()
    return loss, metrics, {k: v.detach() for k, v in pg_stats.items()}
