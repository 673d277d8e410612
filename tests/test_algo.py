"""Unit tests for rlhf_dist.algo: hand-computed values, batched vs. loop, shard invariance, errors."""

import math
import subprocess
import sys

import pytest
import torch

from rlhf_dist.algo import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    aggregate_loss,
    bradley_terry_loss,
    clipped_policy_loss,
    clipped_value_loss,
    compute_advantages,
    compute_policy_loss,
    count_normalizers,
    gae_advantages,
    grpo_advantages,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    rloo_advantages,
)
from rlhf_dist.errors import ConfigError


def right_padded_mask(lengths, num_steps):
    """(B, T) mask with lengths[i] leading ones per row."""
    return (torch.arange(num_steps)[None, :] < torch.tensor(lengths)[:, None]).float()


# ---------------------------------------------------------------------------------------------
# 1. Hand-computed values
# ---------------------------------------------------------------------------------------------


def test_grpo_hand_computed_2x3():
    # Group 1: r = [1, 0, 0], mean 1/3, deviations [2/3, -1/3, -1/3].
    #   unbiased var = (4/9 + 1/9 + 1/9) / 2 = 1/3, std = 1/sqrt(3)
    #   A = dev * sqrt(3) = [2/sqrt(3), -1/sqrt(3), -1/sqrt(3)] = [1.1547, -0.5774, -0.5774]
    # Group 2: r = [1, 1, 0], mean 2/3, deviations [1/3, 1/3, -2/3], same std
    #   A = [0.5774, 0.5774, -1.1547]
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    mask = right_padded_mask([2, 3, 1, 3, 2, 1], num_steps=3)
    advantages, returns = grpo_advantages(rewards, mask, group_size=3, eps=0.0)
    s = 1.0 / math.sqrt(3.0)
    expected_seq = torch.tensor([2 * s, -s, -s, s, s, -2 * s])
    torch.testing.assert_close(advantages, expected_seq[:, None] * mask)
    torch.testing.assert_close(returns, advantages)
    assert advantages[0, 2] == 0.0  # padding stays zero

    # Without std normalization only the group mean is subtracted.
    centered, _ = grpo_advantages(rewards, mask, group_size=3, norm_by_std=False)
    expected_centered = torch.tensor([2 / 3, -1 / 3, -1 / 3, 1 / 3, 1 / 3, -2 / 3])
    torch.testing.assert_close(centered, expected_centered[:, None] * mask)


def test_grpo_equal_rewards_give_zero_advantage():
    advantages, _ = grpo_advantages(torch.ones(4), torch.ones(4, 2), group_size=2)
    assert torch.equal(advantages, torch.zeros(4, 2))


def test_rloo_hand_computed():
    # r = [3, 1, 0, 2]: A_i = r_i - mean of the other three
    #   3 - (1+0+2)/3 = 2,  1 - (3+0+2)/3 = -2/3,  0 - (3+1+2)/3 = -2,  2 - (3+1+0)/3 = 2/3
    rewards = torch.tensor([3.0, 1.0, 0.0, 2.0])
    mask = torch.ones(4, 2)
    advantages, _ = rloo_advantages(rewards, mask, group_size=4)
    torch.testing.assert_close(advantages[:, 0], torch.tensor([2.0, -2 / 3, -2.0, 2 / 3]))


def test_gae_hand_computed_3_steps():
    # gamma = 0.9, lam = 0.8, gamma*lam = 0.72. Row 0 (3 valid steps):
    #   r = [0, 0, 1], V = [0.5, 0.4, 0.6], V_3 = 0
    #   delta_2 = 1 + 0.9*0   - 0.6 =  0.4
    #   delta_1 = 0 + 0.9*0.6 - 0.4 =  0.14
    #   delta_0 = 0 + 0.9*0.4 - 0.5 = -0.14
    #   A_2 = 0.4;  A_1 = 0.14 + 0.72*0.4 = 0.428;  A_0 = -0.14 + 0.72*0.428 = 0.16816
    #   R = A + V = [0.66816, 0.828, 1.0]
    # Row 1 (2 valid steps; the padded step holds garbage that must not leak in):
    #   r = [0, 1, (5)], V = [0.5, 0.4, (9)]
    #   delta_1 = 1 + 0 - 0.4 = 0.6;  delta_0 = 0 + 0.9*0.4 - 0.5 = -0.14
    #   A = [-0.14 + 0.72*0.6, 0.6, 0] = [0.292, 0.6, 0];  R = [0.792, 1.0, 0]
    token_rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.6], [0.5, 0.4, 9.0]])
    mask = right_padded_mask([3, 2], num_steps=3)
    advantages, returns = gae_advantages(token_rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages, torch.tensor([[0.16816, 0.428, 0.4], [0.292, 0.6, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.66816, 0.828, 1.0], [0.792, 1.0, 0.0]]))


def test_clipped_policy_loss_hand_computed():
    # clip 0.2 -> ratio clipped to [0.8, 1.2]. loss = max(-A*r, -A*clip(r)):
    #   A = +1: r=0.5 -> max(-0.5, -0.8) = -0.5 | r=1 -> -1 | r=1.5 -> max(-1.5, -1.2) = -1.2 (clipped)
    #   A = -1: r=0.5 -> max(0.5, 0.8) = 0.8 (clipped) | r=1 -> 1 | r=1.5 -> max(1.5, 1.2) = 1.5
    # d loss / d logprob = -A*r where unclipped, 0 where clipped.
    ratios = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]])
    old_logprobs = torch.full((2, 3), -1.0)
    logprobs = (old_logprobs + ratios.log()).requires_grad_(True)
    advantages = torch.tensor([[1.0] * 3, [-1.0] * 3])
    mask = torch.ones(2, 3)
    loss, stats = clipped_policy_loss(logprobs, old_logprobs, advantages, mask, 0.2, 0.2)
    torch.testing.assert_close(loss, torch.tensor([[-0.5, -1.0, -1.2], [0.8, 1.0, 1.5]]))
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.5, -1.0, 0.0], [0.0, 1.0, 1.5]]))
    torch.testing.assert_close(stats["clip_frac"], torch.tensor(2 / 6))
    torch.testing.assert_close(stats["ratio_mean"], torch.tensor(1.0))
    torch.testing.assert_close(stats["ratio_max"], torch.tensor(1.5))
    # approx_kl = mean(r - 1 - log r) = 2 * (0.5 - 1 - log 0.5 + 1.5 - 1 - log 1.5) / 6
    expected_kl = 2 * (-0.5 - math.log(0.5) + 0.5 - math.log(1.5)) / 6
    torch.testing.assert_close(stats["approx_kl"], torch.tensor(expected_kl))
    assert all(not value.requires_grad for value in stats.values())


def test_clipped_policy_loss_asymmetric_clip_and_registry():
    # clip_high = 0.28 (DAPO clip-higher): A = +1 at r = 1.25 is no longer clipped.
    logprobs = torch.tensor([[math.log(1.25)]])
    loss, _ = compute_policy_loss(
        "clipped", logprobs=logprobs, old_logprobs=torch.zeros(1, 1),
        advantages=torch.ones(1, 1), response_mask=torch.ones(1, 1), clip_high=0.28,
    )
    torch.testing.assert_close(loss, torch.tensor([[-1.25]]))


def test_clipped_value_loss_hand_computed():
    # old V = 0, c = 0.2, R = 1:
    #   V = 0.5: clip -> 0.2; max((0.5-1)^2, (0.2-1)^2) = 0.64 -> loss 0.32 (clipped term wins)
    #   V = 0.1: inside the range, (0.1-1)^2 = 0.81 -> loss 0.405
    #   V = 1.5 with R = 1: clip -> 0.2; max(0.25, 0.64) = 0.64 -> 0.32
    values = torch.tensor([[0.5, 0.1, 1.5]])
    loss, stats = clipped_value_loss(values, torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3))
    torch.testing.assert_close(loss, torch.tensor([[0.32, 0.405, 0.32]]))
    torch.testing.assert_close(stats["clip_frac"], torch.tensor(2 / 3))


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


def test_kl_estimators_hand_computed():
    # log r = [-1, 0, 0.5, 2]
    #   k1 = log r;  k2 = 0.5 (log r)^2 = [0.5, 0, 0.125, 2]
    #   k3 = e^{-log r} - 1 + log r = [e - 2, 0, e^{-0.5} - 0.5, e^{-2} + 1]
    #      = [0.718282, 0, 0.106531, 1.135335]
    log_ratio = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    ref_logprobs = torch.full_like(log_ratio, -2.0)
    logprobs = ref_logprobs + log_ratio
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "k1"), log_ratio)
    torch.testing.assert_close(
        kl_penalty(logprobs, ref_logprobs, "k2"), torch.tensor([[0.5, 0.0, 0.125, 2.0]])
    )
    torch.testing.assert_close(
        kl_penalty(logprobs, ref_logprobs, "k3"),
        torch.tensor([[0.718282, 0.0, 0.106531, 1.135335]]), atol=1e-6, rtol=0,
    )


def test_k3_nonnegative_finite_and_differentiable():
    logprobs = (torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) * 5).requires_grad_()
    ref_logprobs = torch.randn(64, 16, generator=torch.Generator().manual_seed(1)) * 5
    ref_logprobs[0, 0] = logprobs[0, 0].item() + 1000.0  # would overflow exp without the clamp
    k3 = kl_penalty(logprobs, ref_logprobs, "k3")
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
    for estimator in ("k1", "k3"):
        estimate = float(kl_penalty(logprobs, ref_logprobs, estimator).mean())
        assert abs(estimate - exact_kl) < 0.01, (estimator, estimate, exact_kl)


def test_aggregate_loss_modes_hand_computed():
    # Row 0: tokens [1, 2, 3]; row 1: token [4] (+ padding 100s); row 2: all padding.
    #   token_mean          = (1 + 2 + 3 + 4) / 4 = 2.5
    #   seq_mean_token_sum  = (6 + 4) / 2         = 5     (empty row not counted)
    #   seq_mean_token_mean = (2 + 4) / 2         = 3
    per_token_loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0], [100.0, 100.0, 100.0]])
    mask = right_padded_mask([3, 1, 0], num_steps=3)
    expected = {"token_mean": 2.5, "seq_mean_token_sum": 5.0, "seq_mean_token_mean": 3.0}
    for mode, value in expected.items():
        torch.testing.assert_close(aggregate_loss(per_token_loss, mask, mode), torch.tensor(value))
    # Explicit normalizers override the local counts.
    torch.testing.assert_close(
        aggregate_loss(per_token_loss, mask, "token_mean", num_tokens=8), torch.tensor(10 / 8)
    )
    torch.testing.assert_close(
        aggregate_loss(per_token_loss, mask, "seq_mean_token_mean", num_seqs=4), torch.tensor(1.5)
    )


def test_masked_stats_match_torch_on_selected_elements():
    values = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    mask = right_padded_mask([7, 3, 1, 5, 2], num_steps=7)
    values_with_garbage = torch.where(mask.bool(), values, torch.tensor(float("nan")))
    selected = values[mask.bool()]
    torch.testing.assert_close(masked_mean(values_with_garbage, mask), selected.mean())
    torch.testing.assert_close(masked_var(values_with_garbage, mask), selected.var())
    torch.testing.assert_close(masked_mean(values, mask, dim=-1)[1], values[1, :3].mean())
    whitened = masked_whiten(values, mask)[mask.bool()]
    torch.testing.assert_close(whitened.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(whitened.std(), torch.tensor(1.0))
    assert masked_mean(values, torch.zeros_like(mask)) == 0.0  # empty mask -> 0, not NaN


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
    token_rewards, values, mask, lengths = random_batch(batch_size=6, num_steps=9, seed=seed)
    advantages, returns = gae_advantages(token_rewards, values, mask, gamma=gamma, lam=lam)
    for row, length in enumerate(lengths):
        r, v = token_rewards[row].tolist(), values[row].tolist()
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
def test_grpo_matches_loop(seed):
    group_size, num_prompts, num_steps = 4, 5, 6
    _, _, mask, _ = random_batch(num_prompts * group_size, num_steps, seed)
    rewards = torch.randn(num_prompts * group_size, generator=torch.Generator().manual_seed(seed))
    advantages, _ = grpo_advantages(rewards, mask, group_size=group_size, eps=1e-6)
    for prompt in range(num_prompts):
        group = rewards[prompt * group_size:(prompt + 1) * group_size].tolist()
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


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
def test_aggregate_loss_shard_invariance(mode):
    token_rewards, _, mask, _ = random_batch(batch_size=8, num_steps=10, seed=3)
    mask[5] = 0.0  # an all-padding row, as used to even out micro-batches
    old_logprobs = -torch.rand(8, 10, generator=torch.Generator().manual_seed(4))
    advantages = token_rewards  # any (B, T) tensor will do

    def shard_loss(logprobs, rows, num_tokens=None, num_seqs=None):
        per_token_loss, _ = clipped_policy_loss(
            logprobs[rows], old_logprobs[rows], advantages[rows], mask[rows]
        )
        return aggregate_loss(per_token_loss, mask[rows], mode, num_tokens, num_seqs)

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


@pytest.mark.parametrize(
    "call, registry",
    [
        (lambda: compute_advantages("ppo_gae", rewards=torch.zeros(2)), ADVANTAGE_ESTIMATORS),
        (lambda: kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4"), KL_ESTIMATORS),
        (lambda: compute_policy_loss("clip"), {"clipped": None}),
        (lambda: aggregate_loss(torch.zeros(1, 1), torch.ones(1, 1), "mean"), {"token_mean": None}),
    ],
)
def test_unknown_name_lists_choices(call, registry):
    with pytest.raises(ConfigError) as excinfo:
        call()
    for name in registry:
        assert name in str(excinfo.value)


@pytest.mark.parametrize("name", ["grpo", "rloo"])
@pytest.mark.parametrize("batch_size, group_size", [(6, 4), (4, 1)])
def test_bad_group_size_raises(name, batch_size, group_size):
    with pytest.raises(ConfigError, match="group_size"):
        compute_advantages(
            name, rewards=torch.zeros(batch_size), response_mask=torch.ones(batch_size, 3),
            group_size=group_size,
        )


def test_algo_imports_no_heavy_frameworks():
    code = (
        "import sys, rlhf_dist.algo\n"
        "bad = {'ray', 'vllm', 'deepspeed', 'hydra', 'wandb'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
