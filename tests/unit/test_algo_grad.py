"""Gradient tests: a loss whose value is right can still push the wrong way.

On a small categorical pi = softmax(logits) over 5 outcomes, the EXACT expected gradient of a
per-token loss term k(y) on samples y ~ pi, with the gradient flowing through log pi only, is

    E_pi[grad k(y)] = grad sum_y sg[pi(y)] * k(log pi(y) - log ref(y))

and is compared with the closed-form gradient each form claims (kl.py module docstring).
"""

import pytest
import torch

from rlhf_dist.algo import (
    aggregate_loss,
    clipped_policy_loss,
    compute_policy_loss,
    kl_penalty,
    policy_objective,
    rollout_correction,
)

NUM_OUTCOMES = 5
F64 = torch.float64  # exact comparisons: every tensor here is float64


def categorical(seed):
    """(logits leaf with grad, ref log-probs) of two clearly different 5-outcome distributions."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(NUM_OUTCOMES, generator=generator, dtype=F64).requires_grad_(True)
    ref_logprobs = torch.log_softmax(torch.randn(NUM_OUTCOMES, generator=generator, dtype=F64), -1)
    return logits, ref_logprobs


def sample_outcomes(logits, seed, num_samples=200_000):
    """(N,) outcomes drawn from softmax(logits)."""
    probs = torch.softmax(logits.detach(), -1)
    return torch.multinomial(probs, num_samples, replacement=True, generator=torch.Generator().manual_seed(seed))


def expected_kl_term_grad(estimator, logits, ref_logprobs):
    """grad sum_y sg[pi(y)] k(log pi(y) - log ref(y)): the exact expected gradient of the loss term."""
    logprobs = torch.log_softmax(logits, -1)  # (V,)
    probs = logprobs.exp().detach()  # sampling distribution, not differentiated
    per_outcome = kl_penalty(logprobs[None], ref_logprobs[None], estimator)[0]  # (V,)
    return torch.autograd.grad((probs * per_outcome).sum(), logits)[0]


def reverse_kl_grad(logits, ref_logprobs):
    """grad KL(pi || ref) = grad sum_y pi log(pi / ref), by autograd of the closed form."""
    logprobs = torch.log_softmax(logits, -1)
    return torch.autograd.grad((logprobs.exp() * (logprobs - ref_logprobs)).sum(), logits)[0]


def forward_kl_grad(logits, ref_logprobs):
    """grad KL(ref || pi) = grad sum_y ref log(ref / pi)."""
    logprobs = torch.log_softmax(logits, -1)
    return torch.autograd.grad((ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(), logits)[0]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_k1_in_loss_has_zero_expected_gradient(seed):
    logits, ref_logprobs = categorical(seed)
    grad = expected_kl_term_grad("k1", logits, ref_logprobs)
    torch.testing.assert_close(grad, torch.zeros(NUM_OUTCOMES, dtype=F64), atol=1e-12, rtol=0)
    assert reverse_kl_grad(logits, ref_logprobs).abs().max() > 0.05  # there was a KL to reduce


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("estimator", ["k2", "k3_st"])
def test_k2_and_k3_st_in_loss_follow_reverse_kl(estimator, seed):
    logits, ref_logprobs = categorical(seed)
    grad = expected_kl_term_grad(estimator, logits, ref_logprobs)
    reverse = reverse_kl_grad(logits, ref_logprobs)
    torch.testing.assert_close(grad, reverse, atol=1e-10, rtol=1e-8)
    # ...and not the forward KL's: the test would catch a swap.
    assert (grad - forward_kl_grad(logits, ref_logprobs)).abs().max() > 0.05


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_k3_in_loss_follows_forward_kl_not_reverse(seed):
    logits, ref_logprobs = categorical(seed)
    grad = expected_kl_term_grad("k3", logits, ref_logprobs)
    torch.testing.assert_close(grad, forward_kl_grad(logits, ref_logprobs), atol=1e-10, rtol=1e-8)
    assert (grad - reverse_kl_grad(logits, ref_logprobs)).abs().max() > 0.05


@pytest.mark.parametrize(
    "estimator, closed_form", [("k3", forward_kl_grad), ("k3_st", reverse_kl_grad)]
)
def test_kl_term_gradient_monte_carlo(estimator, closed_form):
    # The same claims with sampled tokens, as the learner sees them: mean over y ~ pi of grad k.
    logits, ref_logprobs = categorical(seed=0)
    samples = sample_outcomes(logits, seed=1)
    logprobs = torch.log_softmax(logits, -1)[samples][None]  # (1, N)
    estimate = kl_penalty(logprobs, ref_logprobs[samples][None], estimator).mean()
    grad = torch.autograd.grad(estimate, logits)[0]
    torch.testing.assert_close(grad, closed_form(logits, ref_logprobs), atol=0.01, rtol=0)


# ---------------------------------------------------------------------------------------------
# Policy losses: the gradient is the policy gradient where unclipped, 0 where clipped
# ---------------------------------------------------------------------------------------------


def token_policy(seed, batch_size=6, num_steps=5, vocab=7):
    """Per-token log-probs of fixed sampled tokens under softmax(logits), logits a leaf."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch_size, num_steps, vocab, generator=generator, dtype=F64)
    logits.requires_grad_(True)
    tokens = torch.randint(vocab, (batch_size, num_steps), generator=generator)
    drift = 0.5 * torch.randn(batch_size, num_steps, generator=generator, dtype=F64)
    advantages = torch.randn(batch_size, num_steps, generator=generator, dtype=F64)
    logprobs = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]  # (B, T)
    old_logprobs = logprobs.detach() + drift  # (B, T) ratios spread around 1
    return logits, logprobs, old_logprobs, advantages


@pytest.mark.parametrize("clip_ratio_c", [None, 1.5])
def test_clipped_loss_gradient_is_policy_gradient_where_unclipped(clip_ratio_c):
    clip_low, clip_high = 0.2, 0.28
    logits, logprobs, old_logprobs, advantages = token_policy(seed=0)
    per_token_loss, _ = clipped_policy_loss(
        logprobs, old_logprobs, advantages, torch.ones_like(advantages),
        clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c,
    )
    grad = torch.autograd.grad(per_token_loss.sum(), logits, retain_graph=True)[0]

    ratio = (logprobs - old_logprobs).exp().detach()  # (B, T)
    clipped = ((advantages > 0) & (ratio > 1 + clip_high)) | ((advantages < 0) & (ratio < 1 - clip_low))
    if clip_ratio_c is not None:
        clipped |= (advantages < 0) & (ratio > clip_ratio_c)
    assert 0 < clipped.sum() < clipped.numel() - 5  # both kinds of token are present
    # d loss_t = -A_t * ratio_t * d log pi(y_t) on unclipped tokens, nothing from clipped ones.
    weights = torch.where(clipped, 0.0, -advantages * ratio)  # (B, T)
    expected = torch.autograd.grad((weights * logprobs).sum(), logits)[0]
    torch.testing.assert_close(grad, expected)


def test_on_policy_clipped_loss_expected_gradient_ascends_expected_reward():
    # On-policy (ratio = 1, nothing clipped), A(y) = r(y) - b: the exact expected gradient
    # sum_y sg[pi(y)] grad loss(y) = -grad E_pi[r], whatever the baseline b.
    logits, _ = categorical(seed=5)
    reward = torch.tensor([1.0, -0.5, 2.0, 0.0, 0.3], dtype=F64)
    logprobs = torch.log_softmax(logits, -1)[None]  # (1, V): every outcome as one "token"
    advantages = (reward - 0.7)[None]  # (1, V)
    mask = torch.ones(1, NUM_OUTCOMES, dtype=F64)
    per_outcome, _ = clipped_policy_loss(logprobs, logprobs.detach(), advantages, mask)
    expected_grad = torch.autograd.grad((logprobs.exp().detach() * per_outcome).sum(), logits)[0]
    reward_grad = torch.autograd.grad((torch.softmax(logits, -1) * reward).sum(), logits)[0]
    torch.testing.assert_close(expected_grad, -reward_grad)


def test_gspo_token_gradient_equals_sequence_objective_gradient():
    # With "seq_mean_token_mean", GSPO-token's gradient is that of the sequence-level objective
    # (1/S) sum_i -A_i s_i(theta), s_i = exp(mean_t log ratio), on unclipped sequences.
    logits, logprobs, old_logprobs, _ = token_policy(seed=1, num_steps=4)
    drift = torch.randn(6, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    old_logprobs = logprobs.detach() + 0.02 * drift  # small: no sequence is clipped
    mask = (torch.arange(4)[None] < torch.tensor([4, 3, 1, 2, 4, 4])[:, None]).double()
    seq_advantages = torch.tensor([1.0, -0.5, 2.0, -1.0, 0.3, -0.2], dtype=F64)
    advantages = seq_advantages[:, None].expand(6, 4)
    per_token, stats = compute_policy_loss(
        "gspo", logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, response_mask=mask
    )
    assert stats["clip_frac"] == 0.0
    loss = aggregate_loss(per_token, mask, "seq_mean_token_mean")
    grad = torch.autograd.grad(loss, logits, retain_graph=True)[0]
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, 0.0)
    seq_ratio = (log_ratio.sum(-1) / mask.sum(-1)).exp()  # (B,)
    expected = torch.autograd.grad((-seq_advantages * seq_ratio).mean(), logits)[0]
    torch.testing.assert_close(grad, expected)


def test_policy_objective_gradient_includes_kl_loss_term():
    # loss = agg(pg) + coef * agg(k3_st): its gradient is that of agg(pg) + coef * KL(pi || ref)
    # in expectation. Exactly: the objective's gradient equals that sum of terms ...
    logits, logprobs, old_logprobs, advantages = token_policy(seed=3)
    offset = torch.rand(6, 5, generator=torch.Generator().manual_seed(4), dtype=F64)
    ref_logprobs = logprobs.detach() - 0.3 * offset
    mask = torch.ones(6, 5, dtype=F64)
    loss, _, _ = policy_objective(
        logprobs, old_logprobs, advantages, mask, ref_logprobs,
        kl_loss_coef=0.25, loss_agg="token_mean",
    )
    pg, _ = clipped_policy_loss(logprobs, old_logprobs, advantages, mask)
    kl_k2 = 0.5 * (logprobs - ref_logprobs) ** 2  # k3_st's gradient is k2's
    manual = pg.mean() + 0.25 * kl_k2.mean()
    grad = torch.autograd.grad(loss, logits, retain_graph=True)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(manual, logits)[0])


def test_policy_objective_kl_term_expected_gradient_is_reverse_kl():
    # ... and in expectation over sampled tokens (A = 0, so only the KL term pushes) it is
    # coef * grad KL(pi || ref) with the default estimator k3_st.
    logits, ref_logprobs = categorical(seed=6)
    samples = sample_outcomes(logits, seed=7)
    logprobs = torch.log_softmax(logits, -1)[samples][None]  # (1, N)
    loss, metrics, _ = policy_objective(
        logprobs, logprobs.detach(), torch.zeros_like(logprobs), torch.ones_like(logprobs),
        ref_logprobs[samples][None], kl_loss_coef=0.5, loss_agg="token_mean",
    )
    grad = torch.autograd.grad(loss, logits)[0]
    torch.testing.assert_close(grad, 0.5 * reverse_kl_grad(logits, ref_logprobs), atol=0.005, rtol=0)
    exact_kl = (torch.softmax(logits, -1) * (torch.log_softmax(logits, -1) - ref_logprobs)).sum()
    torch.testing.assert_close(metrics["kl/loss_term"], exact_kl.detach(), atol=0.01, rtol=0)


# ---------------------------------------------------------------------------------------------
# Rollout correction: pi_old = sg[pi_theta] with truncated IS weights (one optimizer step per batch)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy_loss", ["clipped", "gspo"])
def test_current_policy_as_pi_old_gives_the_tis_weighted_policy_gradient(policy_loss):
    # The engine sampled with stale weights (rollout logprobs ~ 0.5 nats off). With pi_old taken
    # from the training forward itself the ratio is 1, nothing is clipped, and
    #   d loss = -(1/N) sum_t A_t w_t d log pi(y_t),   w_t = min(pi_theta(y_t) / pi_rollout(y_t), cap)
    # over the N response tokens: the TIS-weighted policy gradient (Yao et al. 2025).
    cap = 1.5
    logits, logprobs, rollout_logprobs, advantages = token_policy(seed=7)
    mask = (torch.arange(5)[None] < torch.tensor([5, 3, 1, 4, 5, 2])[:, None]).double()  # (B, T)
    old_logprobs, is_weights, stats = rollout_correction(
        logprobs, rollout_logprobs, mask, "current", tis_cap=cap)
    assert not old_logprobs.requires_grad and torch.equal(old_logprobs, logprobs.detach())
    loss, _, pg_stats = policy_objective(
        logprobs, old_logprobs, advantages, mask, policy_loss=policy_loss, clip_ratio_c=3.0,
        is_weights=is_weights, loss_agg="token_mean")
    assert pg_stats["clip_frac"] == 0 and pg_stats["ratio_min"] == pg_stats["ratio_max"] == 1.0

    raw = (logprobs.detach() - rollout_logprobs).exp()  # (B, T) pi_theta / pi_rollout
    capped = mask.bool() & (raw > cap)
    assert 0 < capped.sum() < mask.sum() - 5  # the cap binds on some tokens, not on most
    weights = torch.where(mask.bool(), raw.clamp(max=cap), 0.0)  # (B, T)
    # (the weights are computed in float32, hence rtol 1e-6 against these float64 ones)
    torch.testing.assert_close(is_weights.double() * mask, weights, rtol=1e-6, atol=0)
    expected = torch.autograd.grad(-(advantages * weights * logprobs).sum() / mask.sum(), logits,
                                   retain_graph=True)[0]
    grad = torch.autograd.grad(loss, logits, retain_graph=True)[0]
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-9)
    assert stats["is_capped_frac"].item() == pytest.approx((capped.sum() / mask.sum()).item())
    assert stats["is_weight_max"].item() == pytest.approx(cap)
    assert stats["rollout_mismatch_kl"] > 0.05  # the stale engine shows in the logged mismatch

    # exact: the same loss and gradient as a recomputed pi_old from the same (pre-update) weights
    recomputed = rollout_correction(logprobs, rollout_logprobs, mask, "recomputed",
                                    logprobs.detach().clone(), tis_cap=cap)
    loss_recomputed, _, _ = policy_objective(
        logprobs, recomputed[0], advantages, mask, policy_loss=policy_loss, clip_ratio_c=3.0,
        is_weights=recomputed[1], loss_agg="token_mean")
    torch.testing.assert_close(loss_recomputed, loss)
    torch.testing.assert_close(torch.autograd.grad(loss_recomputed, logits)[0], grad)


def test_rollout_logprobs_as_pi_old_get_no_weights():
    logits, logprobs, rollout_logprobs, _ = token_policy(seed=8)
    old_logprobs, is_weights, stats = rollout_correction(
        logprobs, rollout_logprobs, torch.ones_like(logprobs), "rollout", tis_cap=2.0)
    assert old_logprobs is rollout_logprobs and is_weights is None and stats == {}
    with pytest.raises(ValueError, match="'recomputed' with the recomputed old_logprobs"):
        rollout_correction(logprobs, rollout_logprobs, torch.ones_like(logprobs), "recomputed", tis_cap=2.0)
