"""Unit tests for rlhf_dist.algo: hand-computed values, batched vs. loop, shard invariance, errors.

Gradient directions (which KL each estimator optimises, the policy gradient of the losses) are
tested in test_algo_grad.py.
"""

import math
import subprocess
import sys

import pytest
import torch

from rlhf_dist.algo import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    POLICY_LOSSES,
    AdaptiveKLController,
    FixedKLController,
    aggregate_loss,
    bradley_terry_loss,
    clipped_policy_loss,
    clipped_value_loss,
    compute_advantages,
    compute_policy_loss,
    count_normalizers,
    dr_grpo_advantages,
    explained_variance,
    gae_advantages,
    grpo_advantages,
    gspo_policy_loss,
    kl_penalty,
    make_kl_controller,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_objective,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    token_level_rewards,
    truncated_is_weights,
    value_objective,
)
from rlhf_dist.errors import ConfigError

NAN = float("nan")


def right_padded_mask(lengths, num_steps):
    """(B, T) mask with lengths[i] leading ones per row."""
    return (torch.arange(num_steps)[None, :] < torch.tensor(lengths)[:, None]).float()


def whiten_by_hand(values):
    """(v - mean) / unbiased std of a python list."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return [(v - mean) / std for v in values]


# ---------------------------------------------------------------------------------------------
# 1. Hand-computed values: advantages
# ---------------------------------------------------------------------------------------------


def test_token_level_rewards_hand_computed():
    # row 0: length 3, score 2:  [-0.1, -0.2, 2 - 0.3]    = [-0.1, -0.2, 1.7]
    # row 1: length 1, score -1: [-1 - 0.5, 0, 0]          = [-1.5, 0, 0]  (NaN padding ignored)
    # row 2: no response token:  all zeros, the score 5 goes nowhere
    # row 3: mask [1, 0, 1] (a masked tool-output token): last response token is t = 2
    #        [-0.1, 0, 4 - 0.3] = [-0.1, 0, 3.7]
    scores = torch.tensor([2.0, -1.0, 5.0, 4.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, NAN, NAN], [1.0, 1.0, 1.0], [0.1, 0.2, 0.3]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0], [0, 0, 0], [1, 0, 1]])
    expected = torch.tensor([[-0.1, -0.2, 1.7], [-1.5, 0, 0], [0, 0, 0], [-0.1, 0, 3.7]])
    torch.testing.assert_close(token_level_rewards(scores, kl, mask), expected)


def test_grpo_and_dr_grpo_hand_computed_2x3():
    # Group 1: r = [1, 0, 0], mean 1/3, deviations [2/3, -1/3, -1/3].
    #   unbiased var = (4/9 + 1/9 + 1/9) / 2 = 1/3, std = 1/sqrt(3)
    #   A = dev * sqrt(3) = [2/sqrt(3), -1/sqrt(3), -1/sqrt(3)] = [1.1547, -0.5774, -0.5774]
    # Group 2: r = [1, 1, 0], mean 2/3, deviations [1/3, 1/3, -2/3], same std
    #   A = [0.5774, 0.5774, -1.1547]
    # Dr. GRPO keeps the deviations: [2/3, -1/3, -1/3, 1/3, 1/3, -2/3].
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    mask = right_padded_mask([2, 3, 1, 3, 2, 1], num_steps=3)
    no_kl = torch.zeros(6, 3)
    advantages, returns = grpo_advantages(scores, no_kl, mask, group_size=3, eps=0.0)
    s = 1.0 / math.sqrt(3.0)
    expected_seq = torch.tensor([2 * s, -s, -s, s, s, -2 * s])
    torch.testing.assert_close(advantages, expected_seq[:, None] * mask)
    torch.testing.assert_close(returns, advantages)
    assert advantages[0, 2] == 0.0  # padding stays zero

    centered, centered_returns = compute_advantages(
        "dr_grpo", scores=scores, kl_penalty=no_kl, response_mask=mask, group_size=3
    )
    expected_centered = torch.tensor([2 / 3, -1 / 3, -1 / 3, 1 / 3, 1 / 3, -2 / 3])
    torch.testing.assert_close(centered, expected_centered[:, None] * mask)
    torch.testing.assert_close(centered_returns, centered)


def test_grpo_kl_in_sequence_reward_and_equal_rewards():
    # r = score - sum of the KL penalty over response tokens:
    #   row 0: 1 - (0.1 + 0.2) = 0.7;  row 1: 0 - 0.3 = -0.3 (NaN padding ignored)
    #   mean 0.2, deviations +-0.5, unbiased std sqrt(0.5) -> A = +-0.5 / sqrt(0.5) = +-0.70711
    kl = torch.tensor([[0.1, 0.2], [0.3, NAN]])
    mask = right_padded_mask([2, 1], num_steps=2)
    advantages, _ = grpo_advantages(torch.tensor([1.0, 0.0]), kl, mask, group_size=2, eps=0.0)
    a = 0.5 / math.sqrt(0.5)
    torch.testing.assert_close(advantages, torch.tensor([[a, a], [-a, 0.0]]))
    # A group whose rewards are all equal gets A = 0.
    advantages, _ = grpo_advantages(torch.ones(4), torch.zeros(4, 2), torch.ones(4, 2), group_size=2)
    assert torch.equal(advantages, torch.zeros(4, 2))


def test_rloo_hand_computed_with_kl_in_reward():
    # Group 1, scores [3, 1, 0], lengths [2, 3, 1]; the KL penalty summed over response tokens:
    #   row 0: 0.5 + 0.5 = 1 (the 9 is padding)   -> r0 = 3 - 1   = 2
    #   row 1: 0.2 + 0.3 + 0.5 = 1                -> r1 = 1 - 1   = 0
    #   row 2: -0.5 (k1 can be negative)          -> r2 = 0 + 0.5 = 0.5
    #   A_i = r_i - mean of the other two:
    #   A0 = 2 - (0 + 0.5)/2 = 1.75;  A1 = 0 - (2 + 0.5)/2 = -1.25;  A2 = 0.5 - (2 + 0)/2 = -0.5
    # Group 2: equal scores, no KL -> A = 0.
    scores = torch.tensor([3.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    kl = torch.tensor([[0.5, 0.5, 9.0], [0.2, 0.3, 0.5], [-0.5, 7.0, 7.0]] + [[0.0] * 3] * 3)
    mask = right_padded_mask([2, 3, 1, 3, 3, 3], num_steps=3)
    advantages, returns = rloo_advantages(scores, kl, mask, group_size=3)
    expected_seq = torch.tensor([1.75, -1.25, -0.5, 0.0, 0.0, 0.0])
    torch.testing.assert_close(advantages, expected_seq[:, None] * mask)
    torch.testing.assert_close(returns, advantages)


def test_reinforce_pp_hand_computed():
    # gamma = 0.5. Token rewards (score on the last token minus the KL penalty):
    #   row 0: score 1, kl [0.1, 0.1, 0.1] -> r = [-0.1, -0.1, 0.9]
    #   row 1: score 0, kl [0.2, -0.2, (NaN)], length 2 -> r = [-0.2, 0.2]
    # Returns-to-go G_t = r_t + 0.5 G_{t+1}:
    #   row 0: G2 = 0.9, G1 = -0.1 + 0.45 = 0.35, G0 = -0.1 + 0.175 = 0.075
    #   row 1: G1 = 0.2, G0 = -0.2 + 0.1 = -0.1
    # Whitened over all 5 response tokens: mean 0.285, unbiased var 0.582 / 4 = 0.1455.
    scores = torch.tensor([1.0, 0.0])
    kl = torch.tensor([[0.1, 0.1, 0.1], [0.2, -0.2, NAN]])
    mask = right_padded_mask([3, 2], num_steps=3)
    advantages, returns = compute_advantages(
        "reinforce_pp", scores=scores, kl_penalty=kl, response_mask=mask, gamma=0.5
    )
    torch.testing.assert_close(returns, torch.tensor([[0.075, 0.35, 0.9], [-0.1, 0.2, 0.0]]))
    std = math.sqrt(0.1455)
    expected = [
        [(g - 0.285) / std for g in (0.075, 0.35, 0.9)],
        [(g - 0.285) / std for g in (-0.1, 0.2)] + [0.0],
    ]
    torch.testing.assert_close(advantages, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert whiten_by_hand([0.075, 0.35, 0.9, -0.1, 0.2])[0] == pytest.approx(expected[0][0])


def test_reinforce_pp_baseline_hand_computed():
    # G = 2, gamma = 1. Scores [1, 0 | 3, 3] centred by the group mean BEFORE the KL penalty:
    #   [0.5, -0.5 | 0, 0]
    # Token rewards (lengths [2, 2, 1, 2]):
    #   row 0: kl [0.1, 0.1] -> [-0.1, 0.5 - 0.1] = [-0.1, 0.4]
    #   row 1: kl [0, 0.2]   -> [0, -0.5 - 0.2]   = [0, -0.7]
    #   row 2: kl [0.5]      -> [0 - 0.5]         = [-0.5]
    #   row 3: kl [0, 0]     -> [0, 0]
    # Returns-to-go: row 0 [0.3, 0.4], row 1 [-0.7, -0.7], row 2 [-0.5, (0)], row 3 [0, 0]
    # Whitened over the 7 response tokens: mean -1.2/7, unbiased var (1.48 - 1.44/7) / 6 = 0.212381
    scores = torch.tensor([1.0, 0.0, 3.0, 3.0])
    kl = torch.tensor([[0.1, 0.1], [0.0, 0.2], [0.5, NAN], [0.0, 0.0]])
    mask = right_padded_mask([2, 2, 1, 2], num_steps=2)
    advantages, returns = reinforce_pp_baseline_advantages(scores, kl, mask, group_size=2)
    torch.testing.assert_close(returns, torch.tensor([[0.3, 0.4], [-0.7, -0.7], [-0.5, 0.0], [0.0, 0.0]]))
    mean, std = -1.2 / 7, math.sqrt(0.212381)
    expected = (returns - mean) / std * mask
    torch.testing.assert_close(advantages, expected, atol=1e-5, rtol=1e-5)
    whitened = whiten_by_hand([0.3, 0.4, -0.7, -0.7, -0.5, 0.0, 0.0])
    torch.testing.assert_close(advantages[mask.bool()], torch.tensor(whitened), atol=1e-5, rtol=1e-5)


def test_gae_hand_computed_3_steps():
    # gamma = 0.9, lam = 0.8, gamma*lam = 0.72. Row 0 (3 valid steps):
    #   score 1, kl [0.1, 0, 0] -> r = [-0.1, 0, 1];  V = [0.5, 0.4, 0.6], V_3 = 0
    #   delta_2 = 1    + 0.9*0   - 0.6 =  0.4
    #   delta_1 = 0    + 0.9*0.6 - 0.4 =  0.14
    #   delta_0 = -0.1 + 0.9*0.4 - 0.5 = -0.24
    #   A_2 = 0.4;  A_1 = 0.14 + 0.72*0.4 = 0.428;  A_0 = -0.24 + 0.72*0.428 = 0.06816
    #   R = A + V = [0.56816, 0.828, 1.0]
    # Row 1 (2 valid steps; the padded step holds garbage that must not leak in):
    #   score 1 -> r = [0, 1, (pad)], V = [0.5, 0.4, (9)]
    #   delta_1 = 1 + 0 - 0.4 = 0.6;  delta_0 = 0 + 0.9*0.4 - 0.5 = -0.14
    #   A = [-0.14 + 0.72*0.6, 0.6, 0] = [0.292, 0.6, 0];  R = [0.792, 1.0, 0]
    scores = torch.tensor([1.0, 1.0])
    kl = torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.0, -5.0]])
    values = torch.tensor([[0.5, 0.4, 0.6], [0.5, 0.4, 9.0]])
    mask = right_padded_mask([3, 2], num_steps=3)
    advantages, returns = compute_advantages(
        "gae", scores=scores, kl_penalty=kl, response_mask=mask, values=values, gamma=0.9, lam=0.8
    )
    torch.testing.assert_close(advantages, torch.tensor([[0.06816, 0.428, 0.4], [0.292, 0.6, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.56816, 0.828, 1.0], [0.792, 1.0, 0.0]]))


def test_gae_needs_values():
    with pytest.raises(ValueError, match="values"):
        compute_advantages("gae", scores=torch.zeros(2), kl_penalty=torch.zeros(2, 3),
                           response_mask=torch.ones(2, 3))


# ---------------------------------------------------------------------------------------------
# 1. Hand-computed values: policy and value losses
# ---------------------------------------------------------------------------------------------


def ratio_grid_batch():
    """Ratios 0.5 / 1 / 1.5 / 4 for A = +2 (row 0) and A = -2 (row 1)."""
    ratios = torch.tensor([[0.5, 1.0, 1.5, 4.0], [0.5, 1.0, 1.5, 4.0]])
    old_logprobs = torch.full((2, 4), -1.0)
    logprobs = (old_logprobs + ratios.log()).requires_grad_(True)
    advantages = torch.tensor([[2.0] * 4, [-2.0] * 4])
    return ratios, logprobs, old_logprobs, advantages, torch.ones(2, 4)


def test_clipped_policy_loss_hand_computed():
    # clip 0.2 -> ratio clipped to [0.8, 1.2]. loss = max(-A*r, -A*clip(r)):
    #   A = +2: r=0.5 -> max(-1, -1.6) = -1 | r=1 -> -2 | r=1.5 -> max(-3, -2.4) = -2.4 (high)
    #           r=4   -> max(-8, -2.4) = -2.4 (high)
    #   A = -2: r=0.5 -> max(1, 1.6) = 1.6 (low) | r=1 -> 2 | r=1.5 -> max(3, 2.4) = 3
    #           r=4   -> max(8, 2.4) = 8 (no dual clip: unbounded in r)
    # d loss / d logprob = -A*r where unclipped, 0 where clipped.
    ratios, logprobs, old_logprobs, advantages, mask = ratio_grid_batch()
    loss, stats = clipped_policy_loss(logprobs, old_logprobs, advantages, mask, 0.2, 0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.0, -2.0, -2.4, -2.4], [1.6, 2.0, 3.0, 8.0]]))
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.0, -2.0, 0.0, 0.0], [0.0, 2.0, 3.0, 8.0]]))
    # 8 tokens: clipped low 1 (A<0, r=0.5), clipped high 2 (A>0, r=1.5 and 4), no dual clip.
    expected_stats = {
        "clip_frac_low": 1 / 8, "clip_frac_high": 2 / 8, "clip_frac": 3 / 8, "clip_frac_dual": 0.0,
        "ratio_mean": 14 / 8, "ratio_min": 0.5, "ratio_max": 4.0,
        # approx_kl = mean(r - 1 - log r) = 2 * sum over [0.5, 1, 1.5, 4] / 8
        "approx_kl": 2 * sum(r - 1 - math.log(r) for r in (0.5, 1.0, 1.5, 4.0)) / 8,
    }
    for key, value in expected_stats.items():
        torch.testing.assert_close(stats[key], torch.tensor(value), msg=key)
    assert all(not value.requires_grad for value in stats.values())


def test_dual_clipped_policy_loss_hand_computed():
    # clip_ratio_c = 3: for A < 0 the loss is min(ppo_loss, -A * 3) = min(., 6).
    #   A = -2: r=0.5 -> 1.6 | r=1 -> 2 | r=1.5 -> 3 | r=4 -> min(8, 6) = 6 (dual, gradient 0)
    #   A = +2: unchanged (-1, -2, -2.4, -2.4).
    ratios, logprobs, old_logprobs, advantages, mask = ratio_grid_batch()
    loss, stats = compute_policy_loss(
        "clipped", logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages,
        response_mask=mask, clip_ratio_c=3.0,
    )
    torch.testing.assert_close(loss, torch.tensor([[-1.0, -2.0, -2.4, -2.4], [1.6, 2.0, 3.0, 6.0]]))
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.0, -2.0, 0.0, 0.0], [0.0, 2.0, 3.0, 0.0]]))
    torch.testing.assert_close(stats["clip_frac_dual"], torch.tensor(1 / 8))
    torch.testing.assert_close(stats["clip_frac"], torch.tensor(3 / 8))
    # A ratio of 2.5 < c stays on the PPO loss: -A * r = 5.
    loss, stats = clipped_policy_loss(
        torch.tensor([[math.log(2.5)]]), torch.zeros(1, 1), torch.tensor([[-2.0]]), torch.ones(1, 1),
        clip_ratio_c=3.0,
    )
    torch.testing.assert_close(loss, torch.tensor([[5.0]]))
    assert stats["clip_frac_dual"] == 0.0
    with pytest.raises(ValueError, match="clip_ratio_c"):
        clipped_policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1),
                            clip_ratio_c=0.5)


def test_clipped_policy_loss_asymmetric_clip_and_is_weights():
    # clip_high = 0.28 (DAPO clip-higher): A = +1 at r = 1.25 is no longer clipped.
    logprobs = torch.tensor([[math.log(1.25)]])
    loss, _ = compute_policy_loss(
        "clipped", logprobs=logprobs, old_logprobs=torch.zeros(1, 1),
        advantages=torch.ones(1, 1), response_mask=torch.ones(1, 1), clip_high=0.28,
    )
    torch.testing.assert_close(loss, torch.tensor([[-1.25]]))
    # IS weights multiply the per-token loss and its gradient; weights never get a gradient.
    _, logprobs, old_logprobs, advantages, mask = ratio_grid_batch()
    is_weights = torch.full((2, 4), 0.5, requires_grad=True)
    loss, _ = clipped_policy_loss(logprobs, old_logprobs, advantages, mask, is_weights=is_weights)
    torch.testing.assert_close(loss, 0.5 * torch.tensor([[-1.0, -2.0, -2.4, -2.4], [1.6, 2.0, 3.0, 8.0]]))
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, 0.5 * torch.tensor([[-1.0, -2.0, 0, 0], [0, 2.0, 3.0, 8.0]]))
    assert is_weights.grad is None


def test_gspo_hand_computed():
    # clip 0.2. Sequence ratio s_i = exp(mean log ratio over response tokens):
    #   row 0: log ratios [0.2, -0.1, (pad)] -> s = e^0.05 = 1.051271, A = +1: unclipped
    #          loss = -1.051271 per token, gradient -A * s = -1.051271 per token
    #   row 1: [0.3, 0.5, 0.4] -> s = e^0.4 = 1.491825, A = +1: clipped to 1.2, loss -1.2, grad 0
    #   row 2: same ratios, A = -0.5: loss max(0.745912, 0.6) = 0.745912, grad 0.5 * s = 0.745912
    #   row 3: [-0.5, -0.3, (pad)] -> s = e^-0.4 = 0.670320, A = -1: clipped to 0.8, loss 0.8, grad 0
    # Clip fractions over 10 tokens: high 3 (row 1), low 2 (row 3).
    old_logprobs = torch.full((4, 3), -2.0)
    log_ratios = torch.tensor([[0.2, -0.1, 7.0], [0.3, 0.5, 0.4], [0.3, 0.5, 0.4], [-0.5, -0.3, 7.0]])
    logprobs = (old_logprobs + log_ratios).requires_grad_(True)
    advantages = torch.tensor([1.0, 1.0, -0.5, -1.0])[:, None].expand(4, 3)
    mask = right_padded_mask([2, 3, 3, 2], num_steps=3)
    loss, stats = gspo_policy_loss(logprobs, old_logprobs, advantages, mask)
    s0, s1 = math.exp(0.05), math.exp(0.4)
    expected_loss = [[-s0, -s0, 0.0], [-1.2] * 3, [0.5 * s1] * 3, [0.8, 0.8, 0.0]]
    torch.testing.assert_close(loss, torch.tensor(expected_loss))
    # Token form s_it = sg[s_i] * exp(logprob_t - sg[logprob_t]): loss_t depends on token t only,
    # d loss_00 / d logprob_00 = -A * s0 (not -A * s0 / |y| spread over the row).
    (token_grad,) = torch.autograd.grad(loss[0, 0], logprobs, retain_graph=True)
    torch.testing.assert_close(token_grad[0], torch.tensor([-s0, 0.0, 0.0]))
    loss.sum().backward()
    expected_grad = [[-s0, -s0, 0.0], [0.0] * 3, [0.5 * s1] * 3, [0.0] * 3]
    torch.testing.assert_close(logprobs.grad, torch.tensor(expected_grad))
    torch.testing.assert_close(stats["clip_frac_high"], torch.tensor(0.3))
    torch.testing.assert_close(stats["clip_frac_low"], torch.tensor(0.2))
    torch.testing.assert_close(stats["ratio_max"], torch.tensor(s1))
    torch.testing.assert_close(stats["ratio_min"], torch.tensor(math.exp(-0.4)))


def test_gspo_equals_clipped_with_one_token_per_sequence():
    generator = torch.Generator().manual_seed(0)
    old_logprobs = -torch.rand(6, 3, generator=generator)
    advantages = torch.randn(6, 3, generator=generator)
    mask = torch.zeros(6, 3)
    mask[torch.arange(6), torch.tensor([0, 1, 2, 0, 1, 2])] = 1.0  # one response token per row
    start = old_logprobs + 0.4 * torch.randn(6, 3, generator=generator)
    results = {}
    for name in ("clipped", "gspo"):
        logprobs = start.clone().requires_grad_(True)
        loss, stats = compute_policy_loss(
            name, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages,
            response_mask=mask, clip_ratio_c=3.0,
        )
        loss.sum().backward()
        results[name] = (loss.detach(), logprobs.grad, stats)
    torch.testing.assert_close(results["gspo"][0], results["clipped"][0])
    torch.testing.assert_close(results["gspo"][1], results["clipped"][1])
    for key in results["clipped"][2]:
        torch.testing.assert_close(results["gspo"][2][key], results["clipped"][2][key], msg=key)


def test_ratio_stats_on_empty_mask_are_zero():
    logprobs, old_logprobs = torch.randn(2, 3), torch.randn(2, 3)
    _, stats = clipped_policy_loss(logprobs, old_logprobs, torch.ones(2, 3), torch.zeros(2, 3))
    for key in ("ratio_min", "ratio_max", "ratio_mean", "clip_frac"):
        assert stats[key] == 0.0, key


def test_truncated_is_weights_hand_computed():
    # d = old - rollout = [0, ln 2, -ln 2, ln 5, (pad)], cap 3:
    #   w = [1, 2, 0.5, min(5, 3) = 3, 1 (padding)]
    #   mean 6.5/4 = 1.625, max 3, capped 1/4, max |d| = ln 5
    #   mismatch kl = mean(e^d - 1 - d) = (0 + (1 - ln 2) + (-0.5 + ln 2) + (4 - ln 5)) / 4
    #               = (4.5 - ln 5) / 4
    rollout_logprobs = torch.full((1, 5), -3.0)
    log_diff = torch.tensor([[0.0, math.log(2), -math.log(2), math.log(5), 50.0]])
    old_logprobs = rollout_logprobs + log_diff
    mask = right_padded_mask([4], num_steps=5)
    weights, stats = truncated_is_weights(old_logprobs, rollout_logprobs, mask, cap=3.0)
    torch.testing.assert_close(weights, torch.tensor([[1.0, 2.0, 0.5, 3.0, 1.0]]))
    torch.testing.assert_close(stats["is_weight_mean"], torch.tensor(1.625))
    torch.testing.assert_close(stats["is_weight_max"], torch.tensor(3.0))
    torch.testing.assert_close(stats["is_capped_frac"], torch.tensor(0.25))
    torch.testing.assert_close(stats["rollout_mismatch_kl"], torch.tensor((4.5 - math.log(5)) / 4))
    torch.testing.assert_close(stats["rollout_logprob_diff_max"], torch.tensor(math.log(5)))
    old_with_grad = old_logprobs.clone().requires_grad_(True)
    assert not truncated_is_weights(old_with_grad, rollout_logprobs, mask, cap=3.0)[0].requires_grad


def test_clipped_value_loss_hand_computed():
    # old V = 0, c = 0.2, R = 1:
    #   V = 0.5: clip -> 0.2; max((0.5-1)^2, (0.2-1)^2) = 0.64 -> loss 0.32 (clipped term wins)
    #   V = 0.1: inside the range, (0.1-1)^2 = 0.81 -> loss 0.405
    #   V = 1.5: clip -> 0.2; max(0.25, 0.64) = 0.64 -> 0.32
    # Without clipping (clip_range=None): 0.5 * [0.25, 0.81, 0.25] = [0.125, 0.405, 0.125]
    values = torch.tensor([[0.5, 0.1, 1.5]])
    loss, stats = clipped_value_loss(values, torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3))
    torch.testing.assert_close(loss, torch.tensor([[0.32, 0.405, 0.32]]))
    torch.testing.assert_close(stats["clip_frac"], torch.tensor(2 / 3))
    loss, stats = clipped_value_loss(values, torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3), None)
    torch.testing.assert_close(loss, torch.tensor([[0.125, 0.405, 0.125]]))
    assert stats["clip_frac"] == 0.0


def test_value_objective_hand_computed():
    # Same batch as above, token_mean: (0.32 + 0.405 + 0.32) / 3 = 0.348333; coef 0.5 halves it.
    values = torch.tensor([[0.5, 0.1, 1.5]], requires_grad=True)
    loss, metrics, stats = value_objective(
        values, torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3), clip_range=0.2,
        loss_agg="token_mean", num_tokens=None, num_seqs=None, value_loss_coef=0.5,
    )
    torch.testing.assert_close(metrics["critic/value_loss"], torch.tensor(1.045 / 3))
    torch.testing.assert_close(loss, torch.tensor(0.5 * 1.045 / 3))
    torch.testing.assert_close(stats["critic/value_clip_frac"], torch.tensor(2 / 3))
    torch.testing.assert_close(stats["critic/values_mean"], torch.tensor(0.7))
    torch.testing.assert_close(stats["critic/returns_mean"], torch.tensor(1.0))
    loss.backward()
    # Only V = 0.1 is unclipped: d/dV 0.5 * 0.5/3 * (V - 1)^2 = (0.1 - 1) / 6 = -0.15
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -0.15, 0.0]]))


def test_explained_variance_hand_computed():
    # R = [1, 2, 3, 4], V = [1, 2, 3, 2] (+ garbage padding): residual R - V = [0, 0, 0, 2]
    #   Var[R - V] = (3 * 0.25 + 2.25) / 3 = 1;  Var[R] = 5/3  ->  EV = 1 - 3/5 = 0.4
    returns = torch.tensor([[1.0, 2.0, 3.0], [4.0, NAN, 100.0]])
    values = torch.tensor([[1.0, 2.0, 3.0], [2.0, NAN, -7.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    torch.testing.assert_close(explained_variance(values, returns, mask), torch.tensor(0.4))
    torch.testing.assert_close(explained_variance(returns, returns, mask), torch.tensor(1.0))
    # Var[R] = 0 -> 0 by convention (no division by zero).
    assert explained_variance(torch.zeros(2, 2), torch.ones(2, 2), torch.ones(2, 2)) == 0.0


def test_bradley_terry_hand_computed():
    # Equal rewards: -log sigmoid(0) = log 2. Gap 2: log(1 + e^-2) = 0.126928.
    # Gap 2 with margin 1: log(1 + e^-1) = 0.313262.
    loss, stats = bradley_terry_loss(torch.tensor([0.3, -1.0]), torch.tensor([0.3, -1.0]))
    torch.testing.assert_close(loss, torch.tensor(math.log(2.0)))
    assert stats["accuracy"] == 0.0
    loss, stats = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0]))
    torch.testing.assert_close(loss, torch.tensor(0.126928), atol=1e-6, rtol=0)
    assert stats["accuracy"] == 1.0 and stats["margin_mean"] == 2.0
    loss, _ = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0]), margin=1.0)
    torch.testing.assert_close(loss, torch.tensor(0.313262), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# 1. Hand-computed values: KL estimators and controllers
# ---------------------------------------------------------------------------------------------


def test_kl_estimators_hand_computed():
    # log r = [-1, 0, 0.5, 2]
    #   k1 = log r;  k2 = 0.5 (log r)^2 = [0.5, 0, 0.125, 2]
    #   k3 = e^{-log r} - 1 + log r = [e - 2, 0, e^{-0.5} - 0.5, e^{-2} + 1]
    #      = [0.718282, 0, 0.106531, 1.135335]
    #   k3_st has k3's value and k2's gradient d(0.5 d^2)/dd = d = log r.
    log_ratio = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    ref_logprobs = torch.full_like(log_ratio, -2.0)
    logprobs = (ref_logprobs + log_ratio).requires_grad_(True)
    k3_expected = torch.tensor([[0.718282, 0.0, 0.106531, 1.135335]])
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "k1"), log_ratio)
    torch.testing.assert_close(
        kl_penalty(logprobs, ref_logprobs, "k2"), torch.tensor([[0.5, 0.0, 0.125, 2.0]])
    )
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "k3"), k3_expected, atol=1e-6, rtol=0)
    k3_st = kl_penalty(logprobs, ref_logprobs, "k3_st")
    torch.testing.assert_close(k3_st, k3_expected, atol=1e-6, rtol=0)
    k3_st.sum().backward()
    torch.testing.assert_close(logprobs.grad, log_ratio)


def test_k3_nonnegative_finite_and_differentiable():
    logprobs = (torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) * 5).requires_grad_()
    ref_logprobs = torch.randn(64, 16, generator=torch.Generator().manual_seed(1)) * 5
    ref_logprobs[0, 0] = logprobs[0, 0].item() + 1000.0  # would overflow exp without the clamp
    for estimator in ("k3", "k3_st"):
        logprobs.grad = None
        k3 = kl_penalty(logprobs, ref_logprobs, estimator)
        assert torch.isfinite(k3).all() and (k3 >= 0).all()
        k3.sum().backward()
        assert logprobs.grad is not None and torch.isfinite(logprobs.grad).all()


def test_k1_k3_unbiased_for_kl_pi_ref():
    # Tokens sampled from pi: the means of k1 and k3 match the exact KL(pi || pi_ref); using
    # exp(+log r) in k3 (the reverse direction) would land near KL(pi_ref || pi) = 0.33 instead.
    pi = torch.tensor([0.6, 0.3, 0.1])
    pi_ref = torch.tensor([0.2, 0.3, 0.5])
    exact_kl = float((pi * (pi / pi_ref).log()).sum())  # 0.5 ln3 + 0.1 ln0.2 = 0.4982
    samples = torch.multinomial(pi, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logprobs, ref_logprobs = pi.log()[samples][None], pi_ref.log()[samples][None]
    for estimator in ("k1", "k3", "k3_st"):
        estimate = float(kl_penalty(logprobs, ref_logprobs, estimator).mean())
        assert abs(estimate - exact_kl) < 0.01, (estimator, estimate, exact_kl)


def test_adaptive_kl_controller_hand_computed():
    # beta_0 = 0.2, target 1, horizon 10:  beta *= 1 + clip(KL/1 - 1, -0.2, 0.2) * n / 10
    #   KL = 1.5, n = 5:  error 0.5 -> clipped to 0.2;  beta = 0.2 * (1 + 0.2 * 0.5)   = 0.22
    #   KL = 0.9, n = 5:  error -0.1;                   beta = 0.22 * (1 - 0.1 * 0.5)  = 0.209
    #   KL = 0,   n = 10: error -1 -> clipped to -0.2;  beta = 0.209 * (1 - 0.2)      = 0.1672
    controller = make_kl_controller(0.2, target_kl=1.0, horizon=10)
    assert isinstance(controller, AdaptiveKLController)
    for current_kl, n_steps, expected in [(1.5, 5, 0.22), (0.9, 5, 0.209), (0.0, 10, 0.1672)]:
        controller.update(current_kl, n_steps)
        assert controller.value == pytest.approx(expected, rel=1e-12)
    restored = AdaptiveKLController(0.2, target_kl=1.0, horizon=10)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value == controller.state_dict()["value"]
    with pytest.raises(ValueError, match="target_kl"):
        AdaptiveKLController(0.1, target_kl=0.0, horizon=10)


def test_fixed_kl_controller_unchanged():
    controller = make_kl_controller(0.05, target_kl=None, horizon=10)
    assert isinstance(controller, FixedKLController)
    for current_kl in (0.0, 10.0, 1e6):
        controller.update(current_kl, n_steps=1000)
    assert controller.value == 0.05
    controller.load_state_dict({"value": 0.3})
    assert controller.state_dict() == {"value": 0.3}


# ---------------------------------------------------------------------------------------------
# 1. Hand-computed values: aggregation, masked stats, objective
# ---------------------------------------------------------------------------------------------


def test_aggregate_loss_modes_hand_computed():
    # Row 0: tokens [1, 2, 3]; row 1: token [4] (+ padding 100s); row 2: all padding.
    #   token_mean              = (1 + 2 + 3 + 4) / 4 = 2.5
    #   seq_mean_token_sum      = (6 + 4) / 2         = 5     (empty row not counted)
    #   seq_mean_token_mean     = (2 + 4) / 2         = 3
    #   seq_mean_token_sum_norm = (6/3 + 4/3) / 2     = 5/3   (horizon H = 3, not |o_i|)
    per_token_loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0], [100.0, 100.0, 100.0]])
    mask = right_padded_mask([3, 1, 0], num_steps=3)
    expected = {
        "token_mean": 2.5, "seq_mean_token_sum": 5.0, "seq_mean_token_mean": 3.0,
        "seq_mean_token_sum_norm": 5 / 3,
    }
    assert set(expected) == set(LOSS_AGG_MODES)
    for mode, value in expected.items():
        torch.testing.assert_close(aggregate_loss(per_token_loss, mask, mode, horizon=3), torch.tensor(value))
    # Explicit normalizers override the local counts.
    torch.testing.assert_close(
        aggregate_loss(per_token_loss, mask, "token_mean", num_tokens=8), torch.tensor(10 / 8)
    )
    torch.testing.assert_close(
        aggregate_loss(per_token_loss, mask, "seq_mean_token_mean", num_seqs=4), torch.tensor(1.5)
    )
    torch.testing.assert_close(  # (6 + 4) / 4 seqs / horizon 5
        aggregate_loss(per_token_loss, mask, "seq_mean_token_sum_norm", num_seqs=4, horizon=5),
        torch.tensor(0.5),
    )
    with pytest.raises(ValueError, match="horizon"):
        aggregate_loss(per_token_loss, mask, "seq_mean_token_sum_norm")


def test_masked_stats_match_torch_on_selected_elements():
    values = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    mask = right_padded_mask([7, 3, 1, 5, 2], num_steps=7)
    values_with_garbage = torch.where(mask.bool(), values, torch.tensor(NAN))
    selected = values[mask.bool()]
    torch.testing.assert_close(masked_mean(values_with_garbage, mask), selected.mean())
    torch.testing.assert_close(masked_var(values_with_garbage, mask), selected.var())
    torch.testing.assert_close(masked_mean(values, mask, dim=-1)[1], values[1, :3].mean())
    whitened = masked_whiten(values, mask)[mask.bool()]
    torch.testing.assert_close(whitened.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(whitened.std(), torch.tensor(1.0))
    assert masked_mean(values, torch.zeros_like(mask)) == 0.0  # empty mask -> 0, not NaN


def test_policy_objective_terms_and_metrics():
    # token_mean over 4 tokens; loss = pg + 0.1 * kl_term - 0.01 * entropy.
    generator = torch.Generator().manual_seed(0)
    old_logprobs = -torch.rand(2, 2, generator=generator)
    logprobs = old_logprobs + 0.1 * torch.randn(2, 2, generator=generator)
    ref_logprobs = -torch.rand(2, 2, generator=generator)
    entropy = torch.rand(2, 2, generator=generator)
    advantages, mask = torch.randn(2, 2, generator=generator), torch.ones(2, 2)
    loss, metrics, stats = policy_objective(
        logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy,
        kl_loss_coef=0.1, kl_loss_estimator="k2", entropy_coef=0.01, loss_agg="token_mean",
        num_tokens=4, num_seqs=2,
    )
    pg, _ = clipped_policy_loss(logprobs, old_logprobs, advantages, mask)
    kl_term = (0.5 * (logprobs - ref_logprobs) ** 2).mean()
    assert set(metrics) == {"loss/policy", "loss/total", "kl/loss_term", "entropy/mean"}
    torch.testing.assert_close(metrics["loss/policy"], pg.mean())
    torch.testing.assert_close(metrics["kl/loss_term"], kl_term)
    torch.testing.assert_close(metrics["entropy/mean"], entropy.mean())
    torch.testing.assert_close(loss, pg.mean() + 0.1 * kl_term - 0.01 * entropy.mean())
    torch.testing.assert_close(metrics["loss/total"], loss)
    assert "clip_frac" in stats and "ratio_min" in stats
    # Without a reference there is no KL metric, and a positive coefficient is an error.
    _, metrics, _ = policy_objective(logprobs, old_logprobs, advantages, mask)
    assert set(metrics) == {"loss/policy", "loss/total"}
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_objective(logprobs, old_logprobs, advantages, mask, kl_loss_coef=0.1)


# ---------------------------------------------------------------------------------------------
# 2. Vectorized vs. an obvious loop
# ---------------------------------------------------------------------------------------------


def random_batch(batch_size, num_steps, seed):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, num_steps + 1, (batch_size,), generator=generator).tolist()
    token_rewards = torch.randn(batch_size, num_steps, generator=generator)
    values = torch.randn(batch_size, num_steps, generator=generator)
    return token_rewards, values, right_padded_mask(lengths, num_steps), lengths


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_matches_loop(seed):
    gamma, lam = 0.97, 0.9
    kl, values, mask, lengths = random_batch(batch_size=6, num_steps=9, seed=seed)
    scores = torch.randn(6, generator=torch.Generator().manual_seed(seed + 100))
    advantages, returns = gae_advantages(scores, kl, mask, values, gamma=gamma, lam=lam)
    for row, length in enumerate(lengths):
        v = values[row].tolist()
        r = [-kl[row, t].item() + (scores[row].item() if t == length - 1 else 0.0) for t in range(length)]
        for t in range(length):
            # A_t = sum_l (gamma lam)^l delta_{t+l}, straight from the definition.
            expected = 0.0
            for k in range(t, length):
                next_value = v[k + 1] if k + 1 < length else 0.0
                expected += (gamma * lam) ** (k - t) * (r[k] + gamma * next_value - v[k])
            assert advantages[row, t].item() == pytest.approx(expected, abs=1e-5)
            assert returns[row, t].item() == pytest.approx(expected + v[t], abs=1e-5)
        assert (advantages[row, length:] == 0).all() and (returns[row, length:] == 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reinforce_pp_matches_loop(seed):
    gamma = 0.9
    kl, _, mask, lengths = random_batch(batch_size=6, num_steps=7, seed=seed)
    scores = torch.randn(6, generator=torch.Generator().manual_seed(seed + 100))
    advantages, returns = reinforce_pp_advantages(scores, kl, mask, gamma=gamma)
    all_returns = []
    for row, length in enumerate(lengths):
        r = [-kl[row, t].item() + (scores[row].item() if t == length - 1 else 0.0) for t in range(length)]
        row_returns = [sum(gamma ** (s - t) * r[s] for s in range(t, length)) for t in range(length)]
        assert returns[row, :length].tolist() == pytest.approx(row_returns, abs=1e-5)
        all_returns += row_returns
    assert advantages[mask.bool()].tolist() == pytest.approx(whiten_by_hand(all_returns), abs=1e-4)
    assert (advantages[~mask.bool()] == 0).all() and (returns[~mask.bool()] == 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_matches_loop(seed):
    group_size, num_prompts, num_steps = 4, 5, 6
    kl, _, mask, _ = random_batch(num_prompts * group_size, num_steps, seed)
    scores = torch.randn(num_prompts * group_size, generator=torch.Generator().manual_seed(seed))
    advantages, _ = grpo_advantages(scores, kl, mask, group_size=group_size, eps=1e-6)
    rewards = (scores - (kl * mask).sum(-1)).tolist()
    for prompt in range(num_prompts):
        group = rewards[prompt * group_size:(prompt + 1) * group_size]
        mean = sum(group) / group_size
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (group_size - 1))
        for i, reward in enumerate(group):
            row = prompt * group_size + i
            for t in range(num_steps):
                expected = (reward - mean) / (std + 1e-6) if mask[row, t] else 0.0
                assert advantages[row, t].item() == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# 3. Shard invariance: one batch == the sum over shards with global normalizers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy_loss", ["clipped", "gspo"])
@pytest.mark.parametrize("mode", sorted(LOSS_AGG_MODES))
def test_aggregate_loss_shard_invariance(mode, policy_loss):
    token_rewards, _, mask, _ = random_batch(batch_size=8, num_steps=10, seed=3)
    mask[5] = 0.0  # an all-padding row, as used to even out micro-batches
    old_logprobs = -torch.rand(8, 10, generator=torch.Generator().manual_seed(4))
    advantages = token_rewards  # any (B, T) tensor will do

    def shard_loss(logprobs, rows, num_tokens=None, num_seqs=None):
        per_token_loss, _ = compute_policy_loss(
            policy_loss, logprobs=logprobs[rows], old_logprobs=old_logprobs[rows],
            advantages=advantages[rows], response_mask=mask[rows],
        )
        return aggregate_loss(per_token_loss, mask[rows], mode, num_tokens, num_seqs, horizon=10)

    logprobs = (old_logprobs + 0.3 * torch.randn(8, 10)).requires_grad_(True)
    whole = shard_loss(logprobs, slice(0, 8))
    whole.backward()
    whole_grad = logprobs.grad.clone()

    logprobs.grad = None
    shards = [slice(0, 4), slice(4, 8)]
    num_tokens, num_seqs = (sum(n) for n in zip(*(count_normalizers(mask[s]) for s in shards)))
    assert (num_tokens, num_seqs) == (int(mask.sum()), 7)
    split = sum(shard_loss(logprobs, s, num_tokens, num_seqs) for s in shards)
    split.backward()
    torch.testing.assert_close(split, whole)
    torch.testing.assert_close(logprobs.grad, whole_grad)


# ---------------------------------------------------------------------------------------------
# 4. Errors users can cause
# ---------------------------------------------------------------------------------------------


def _unknown_advantage():
    compute_advantages("ppo_gae", scores=torch.zeros(2), kl_penalty=torch.zeros(2, 1),
                       response_mask=torch.ones(2, 1))


@pytest.mark.parametrize(
    "call, registry",
    [
        (_unknown_advantage, ADVANTAGE_ESTIMATORS),
        (lambda: kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4"), KL_ESTIMATORS),
        (lambda: compute_policy_loss("clip"), POLICY_LOSSES),
        (lambda: aggregate_loss(torch.zeros(1, 1), torch.ones(1, 1), "mean"), LOSS_AGG_MODES),
    ],
)
def test_unknown_name_lists_choices(call, registry):
    with pytest.raises(ConfigError) as excinfo:
        call()
    for name in registry:
        assert name in str(excinfo.value)


def test_registries_hold_the_documented_variants():
    assert set(ADVANTAGE_ESTIMATORS) == {
        "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gae"
    }
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3", "k3_st"}
    assert set(POLICY_LOSSES) == {"clipped", "gspo"}


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"])
@pytest.mark.parametrize("batch_size, group_size", [(6, 4), (4, 1)])
def test_bad_group_size_raises(name, batch_size, group_size):
    with pytest.raises(ConfigError, match="group_size"):
        compute_advantages(
            name, scores=torch.zeros(batch_size), kl_penalty=torch.zeros(batch_size, 3),
            response_mask=torch.ones(batch_size, 3), group_size=group_size,
        )


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="scores"):
        compute_advantages("rloo", scores=torch.zeros(3), kl_penalty=torch.zeros(4, 2),
                           response_mask=torch.ones(4, 2), group_size=2)
    with pytest.raises(ValueError, match="kl_penalty"):
        compute_advantages("reinforce_pp", scores=torch.zeros(4), kl_penalty=torch.zeros(4),
                           response_mask=torch.ones(4, 2))


def test_algo_imports_no_heavy_frameworks():
    code = (
        "import sys, rlhf_dist.algo\n"
        "bad = {'ray', 'vllm', 'deepspeed', 'hydra', 'wandb'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_loss_messages_name_only_parameters_the_objectives_take():
    """PolicyLossConfig / ValueLossConfig cross Ray to the ranks; every field they pass on must be
    a keyword of the objective it feeds (a renamed parameter fails here, not in a Ray actor)."""
    import dataclasses
    import inspect

    from rlhf_dist.algo.objective import PolicyLossConfig, ValueLossConfig, policy_objective, value_objective

    policy_params = inspect.signature(policy_objective).parameters
    assert set(PolicyLossConfig(temperature=1.0).objective_kwargs()) <= set(policy_params)
    value_params = inspect.signature(value_objective).parameters
    assert {f.name for f in dataclasses.fields(ValueLossConfig)} <= set(value_params)
