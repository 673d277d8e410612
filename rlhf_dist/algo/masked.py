"""Masked reductions over padded (B, T) token tensors, and loss aggregation.

`mask` is 1 (or True) on real response tokens and 0 on padding; it always has the shape of
`values`. Reductions over an empty mask return 0 rather than NaN, so an all-padding micro-batch
contributes nothing instead of poisoning the step.

Loss aggregation and sharding
-----------------------------
A mini-batch is split over data-parallel ranks and, on each rank, over micro-batches whose
gradients are summed. If every shard normalized by its *own* token or sequence count, the summed
loss would weight tokens differently depending on how the batch was cut. `aggregate_loss` therefore
accepts the *global* normalizers of the whole mini-batch (`num_tokens`, `num_seqs`, computed once
with `count_normalizers` and summed over shards); with them every mode is a plain sum over shards:

    sum_k aggregate_loss(loss_k, mask_k, mode, num_tokens=N, num_seqs=S)
        == aggregate_loss(loss, mask, mode)                      # on the unsplit batch

and so are the gradients. (Under DDP/DeepSpeed, whose all-reduce averages over `world_size`
ranks, multiply the shard loss by `world_size` to keep the sum.)
"""

from __future__ import annotations

from typing import Callable

import torch

from rlhf_dist.algo._registry import lookup, make_register


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is set, over `dim` (all elements when None)."""
    masked = torch.where(mask.bool(), values, torch.zeros_like(values))  # NaN/inf in padding stay out
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over the masked elements (0 where nothing is masked in)."""
    count = mask.to(values.dtype)
    count = count.sum() if dim is None else count.sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` over all masked elements (a scalar).

    With `unbiased=True` the Bessel correction n / (n - 1) is applied, as in `torch.var`; it is
    skipped when fewer than two elements are masked in (the variance is then 0, not inf).
    """
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.to(values.dtype).sum()
        bessel = torch.where(count > 1, count / (count - 1).clamp(min=1), torch.ones_like(count))
        var = var * bessel
    return var


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalize `values` to unit variance over the masked elements.

    (v - mean) / sqrt(var + eps), with the mean added back when `shift_mean=False` (only the
    scale changes). Padding positions are transformed too; mask them downstream.
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def _num_nonempty_seqs(mask: torch.Tensor) -> torch.Tensor:
    return mask.bool().any(dim=-1).sum()


def count_normalizers(mask: torch.Tensor) -> tuple[int, int]:
    """(num_tokens, num_seqs) of one shard, to be summed over shards for `aggregate_loss`.

    num_seqs counts only rows with at least one response token, so all-padding rows added to even
    out micro-batches do not dilute the per-sequence modes.
    """
    return int(mask.bool().sum().item()), int(_num_nonempty_seqs(mask).item())


# ----------------------------------------------------------------------------------------------
# Loss aggregation modes: fn(per_token_loss, mask, num_tokens, num_seqs, horizon) -> scalar.
# ----------------------------------------------------------------------------------------------

LOSS_AGG_MODES: dict[str, Callable[..., torch.Tensor]] = {}
register_loss_agg_mode = make_register(LOSS_AGG_MODES, "loss aggregation mode")


def _at_least_one(count):
    """Guard a normalizer against 0 without a host sync when it is already a tensor."""
    return count.clamp(min=1) if torch.is_tensor(count) else max(float(count), 1.0)


@register_loss_agg_mode("token_mean")
def _token_mean(per_token_loss, mask, num_tokens, num_seqs, horizon):
    """sum_{i,t} m_it * l_it / N: every token weighs the same (DAPO's token-level loss, Yu et al. 2025)."""
    if num_tokens is None:
        num_tokens = mask.to(per_token_loss.dtype).sum()
    return masked_sum(per_token_loss, mask) / _at_least_one(num_tokens)


@register_loss_agg_mode("seq_mean_token_sum")
def _seq_mean_token_sum(per_token_loss, mask, num_tokens, num_seqs, horizon):
    """(1/S) sum_i sum_t m_it * l_it: no 1/|o_i| length normalization (cf. Dr. GRPO, Liu et al. 2025)."""
    if num_seqs is None:
        num_seqs = _num_nonempty_seqs(mask)
    seq_sums = masked_sum(per_token_loss, mask, dim=-1)  # (B,)
    return seq_sums.sum() / _at_least_one(num_seqs)


@register_loss_agg_mode("seq_mean_token_mean")
def _seq_mean_token_mean(per_token_loss, mask, num_tokens, num_seqs, horizon):
    """(1/S) sum_i (1/|o_i|) sum_t m_it * l_it: the original GRPO objective (Shao et al. 2024, eq. 3)."""
    if num_seqs is None:
        num_seqs = _num_nonempty_seqs(mask)
    seq_means = masked_mean(per_token_loss, mask, dim=-1)  # (B,); 0 for all-padding rows
    return seq_means.sum() / _at_least_one(num_seqs)


@register_loss_agg_mode("seq_mean_token_sum_norm")
def _seq_mean_token_sum_norm(per_token_loss, mask, num_tokens, num_seqs, horizon):
    """(1/S) sum_i (1/H) sum_t m_it * l_it with a constant H (Dr. GRPO, Liu et al. 2025, sec. 3).

    H = `horizon`, the maximum response length, replaces GRPO's per-sequence 1/|o_i|, which gives
    a short wrong answer a larger per-token gradient than a long one (response-length bias).
    """
    if horizon is None or horizon <= 0:
        raise ValueError(
            f"loss aggregation 'seq_mean_token_sum_norm' needs horizon > 0 (the maximum response "
            f"length, a constant across steps); got horizon={horizon}."
        )
    return _seq_mean_token_sum(per_token_loss, mask, num_tokens, num_seqs, None) / float(horizon)


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token_mean",
    num_tokens: int | float | torch.Tensor | None = None,
    num_seqs: int | float | torch.Tensor | None = None,
    horizon: float | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar.

    Args:
        per_token_loss: (B, T) loss per response token.
        mask: (B, T) 1 on response tokens, 0 on padding.
        mode: a key of `LOSS_AGG_MODES`: "token_mean", "seq_mean_token_sum",
            "seq_mean_token_mean" or "seq_mean_token_sum_norm".
        num_tokens: masked tokens in the whole mini-batch (all ranks and micro-batches). Used by
            "token_mean"; defaults to this shard's count.
        num_seqs: sequences with at least one response token in the whole mini-batch. Used by the
            "seq_mean_*" modes; defaults to this shard's count.
        horizon: the constant length normaliser of "seq_mean_token_sum_norm" (the maximum
            response length); required by that mode, ignored by the others.

    With global `num_tokens` / `num_seqs`, summing the result over shards gives exactly the value
    and gradient of the unsplit batch (module docstring). The per-sequence mean of
    "seq_mean_token_mean" needs no global count: a sequence is never split across shards.
    """
    agg_fn = lookup(LOSS_AGG_MODES, mode, "loss aggregation mode")
    if per_token_loss.shape != mask.shape:
        raise ValueError(
            f"per_token_loss has shape {tuple(per_token_loss.shape)} but mask has shape "
            f"{tuple(mask.shape)}; both must be (B, T)."
        )
    return agg_fn(per_token_loss, mask, num_tokens, num_seqs, horizon)
