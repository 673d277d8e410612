"""Per-token KL estimators between the policy pi and the reference pi_ref, and KL controllers.

Values
------
With d = log pi(y_t) - log pi_ref(y_t) on a token y_t ~ pi, each estimator k(d) estimates
KL(pi || pi_ref) (J. Schulman, "Approximating KL Divergence", 2020):

    k1    = d                      unbiased, high variance, can be negative
    k2    = 0.5 * d^2              biased (low when pi ~ pi_ref), low variance, >= 0
    k3    = exp(-d) - 1 + d        unbiased and >= 0 (since e^x >= 1 + x), low variance
    k3_st = k3 in value, k2 in gradient (straight-through: k2 + sg[k3 - k2])

Schulman's r is pi_ref / pi, i.e. d = -log r, hence exp(-d) in k3.

Gradients when used in the LOSS
-------------------------------
The tokens are sampled from pi and the gradient flows through log pi only (the sampling is not
differentiated), so the expected gradient of the loss term is sum_y pi(y) k'(d(y)) grad log pi(y).
Using sum_y pi grad log pi = grad sum_y pi = 0:

    k1:    k' = 1          ->  E = sum pi grad log pi                    = 0   (optimises nothing)
    k2:    k' = d          ->  E = sum pi (log pi - log ref) grad log pi = grad KL(pi || ref)
    k3:    k' = 1 - ref/pi ->  E = -sum ref grad log pi                  = grad KL(ref || pi)
    k3_st: k' = d (k2's)   ->  E = grad KL(pi || ref)

So k3 in the loss minimises the FORWARD KL(ref || pi), not the reverse KL its value estimates;
k3_st ("k3 value, k2 gradient", verl's straight-through "k3+") logs a low-variance
estimate of KL(pi || ref) and pushes along the reverse KL's gradient. tests/unit/test_algo_grad.py
checks all four on an exact categorical.

In the REWARD (no gradient through the penalty) k1 is the standard choice: r_t - beta * k1 summed
over the sequence gives exactly the KL-regularised objective E[r] - beta KL(pi || ref)
(Ziegler et al. 2019; Ouyang et al. 2022, eq. 2).

Controllers
-----------
`FixedKLController` / `AdaptiveKLController` hold the KL coefficient beta (Ziegler et al. 2019,
"Fine-Tuning Language Models from Human Preferences", sec. 2.2).
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
    """k1 = d. Expected gradient in the loss: 0."""
    return log_ratio


@register_kl_estimator("k2")
def kl_k2(log_ratio: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 * d^2. Expected gradient in the loss: grad KL(pi || ref)."""
    return 0.5 * log_ratio.square()


@register_kl_estimator("k3")
def kl_k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """k3 = exp(-d) - 1 + d, d clamped to +-K3_LOG_RATIO_CLAMP.

    Expected gradient in the loss: grad KL(ref || pi) (the forward KL).
    """
    log_ratio = log_ratio.clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    return torch.exp(-log_ratio) - 1.0 + log_ratio


@register_kl_estimator("k3_st")
def kl_k3_st(log_ratio: torch.Tensor) -> torch.Tensor:
    """Straight-through k3: value k3, gradient k2's, i.e. k2 + sg[k3 - k2].

    Value: the unbiased low-variance estimate of KL(pi || ref). Expected gradient in the loss:
    grad KL(pi || ref).
    """
    k2 = kl_k2(log_ratio)
    return k2 + (kl_k3(log_ratio) - k2).detach()


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref); (B, T), mask it downstream.

    Args:
        logprobs: (B, T) log pi(y_t) of the sampled tokens under the trained policy.
        ref_logprobs: (B, T) log pi_ref(y_t) under the frozen reference policy.
        estimator: a key of `KL_ESTIMATORS` ("k1", "k2", "k3", "k3_st").
    """
    estimator_fn = lookup(KL_ESTIMATORS, estimator, "KL estimator")
    log_ratio = logprobs - ref_logprobs  # (B, T)
    return estimator_fn(log_ratio)


# ----------------------------------------------------------------------------------------------
# KL coefficient controllers (Ziegler et al. 2019, sec. 2.2)
# ----------------------------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient: `value` never changes."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op; present so the trainer can call `update` whatever the controller."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller steering the measured KL towards `target_kl` (Ziegler et al. 2019).

        e_t       = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_t+1  = beta_t * (1 + e_t * n_steps / horizon)

    `n_steps` is the number of samples (or steps) the KL was measured over, so `horizon` is how
    many samples it takes for a persistent error to change beta by about e_t (Ziegler's K_beta =
    0.1 corresponds to horizon = 10 n_steps). The clip bounds the change per update.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int):
        if target_kl <= 0 or horizon <= 0:
            raise ValueError(
                f"AdaptiveKLController needs target_kl > 0 and horizon > 0; got target_kl="
                f"{target_kl}, horizon={horizon}. Set target_kl to None for a fixed coefficient."
            )
        self.value = float(init_kl_coef)
        self.target_kl = float(target_kl)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target_kl - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def make_kl_controller(
    kl_coef: float, target_kl: float | None, horizon: int
) -> FixedKLController | AdaptiveKLController:
    """Fixed coefficient when `target_kl` is None, else adaptive starting from `kl_coef`."""
    if target_kl is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target_kl, horizon)
