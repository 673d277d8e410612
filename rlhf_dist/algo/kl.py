"""Per-token estimators of KL(pi || pi_ref) from tokens sampled by pi.

With log r = log pi(y_t) - log pi_ref(y_t) on a token y_t ~ pi, each estimator k(log r) has
E_pi[k] ~= KL(pi || pi_ref) (J. Schulman, "Approximating KL Divergence", 2020):

    k1 = log r                      unbiased, high variance, can be negative
    k2 = 0.5 * (log r)^2            biased (low when pi ~ pi_ref), low variance, >= 0
    k3 = exp(-log r) - 1 + log r    unbiased and >= 0 (since e^x >= 1 + x), low variance

Schulman's r is pi_ref / pi; here log r is its negative, hence exp(-log r) in k3.
All estimators return (B, T), unmasked; gradients flow through `logprobs`.
"""

from __future__ import annotations

from typing import Callable

import torch

from rlhf_dist.algo._registry import lookup, make_register

KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
register_kl_estimator = make_register(KL_ESTIMATORS, "KL estimator")

# exp(-log r) in k3 overflows float32 once log r < -88 (fp16 once log r < -11), e.g. a token
# the reference model finds near-impossible; inf would then reach the loss as inf or NaN. e^20 is
# ~5e8, already a huge penalty, so clamping loses nothing useful (outside the range the estimate
# is constant and its gradient zero).
K3_LOG_RATIO_CLAMP = 20.0


@register_kl_estimator("k1")
def kl_k1(log_ratio: torch.Tensor) -> torch.Tensor:
    """k1 = log r."""
    return log_ratio


@register_kl_estimator("k2")
def kl_k2(log_ratio: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 * (log r)^2."""
    return 0.5 * log_ratio.square()


@register_kl_estimator("k3")
def kl_k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """k3 = exp(-log r) - 1 + log r, with log r clamped to +-K3_LOG_RATIO_CLAMP."""
    log_ratio = log_ratio.clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    return torch.exp(-log_ratio) - 1.0 + log_ratio


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref); (B, T), mask it downstream.

    Args:
        logprobs: (B, T) log pi(y_t) of the sampled tokens under the trained policy.
        ref_logprobs: (B, T) log pi_ref(y_t) under the frozen reference policy.
        estimator: a key of `KL_ESTIMATORS` ("k1", "k2", "k3").
    """
    estimator_fn = lookup(KL_ESTIMATORS, estimator, "KL estimator")
    log_ratio = logprobs - ref_logprobs  # (B, T)
    return estimator_fn(log_ratio)
