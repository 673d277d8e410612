"""The DeepSpeed learner over gloo, in real Ray actors: sharding must not change the update.

One optimizer step with 2 ranks x 2 gradient-accumulation micro-batches must give the weights
that 1 rank gives on the whole mini-batch, and both must equal a plain-torch AdamW step on the
unsplit loss (ZeRO-2 and ZeRO-3). Adam's first step is lr * g / (|g| + eps); with a large eps it
is ~ lr * g / eps, so a wrong loss scale (a missing world_size or grad-accum factor) shows up.
Then the ZeRO-3 weights, published by both ranks, must reach a live vLLM engine bit for bit.
"""

import dataclasses

import pytest
import ray
import torch

from rlhf_dist.runtime.group import ActorGroup
from rlhf_dist.actors.learner import LearnerActor
from rlhf_dist.algo import count_normalizers
from rlhf_dist.algo.objective import PolicyLossConfig, policy_objective
from rlhf_dist.data.batch import collate_sequences
from rlhf_dist.models.hf import disable_dropout, load_causal_lm, response_logprobs

pytestmark = [pytest.mark.ray, pytest.mark.slow]

LR, EPS = 1e-2, 1.0  # eps >> |g|: the update is proportional to the gradient, not its sign
OPTIM = dict(lr=LR, weight_decay=0.0, betas=[0.9, 0.999], eps=EPS, grad_clip=1e9,
             scheduler="constant", warmup_steps=0, min_lr_ratio=1.0)
LOSS_CFG = PolicyLossConfig(temperature=1.0, policy_loss="clipped", clip_low=0.2, clip_high=0.2, clip_ratio_c=3.0,
                            kl_loss_coef=0.1, kl_loss_estimator="k3_st", entropy_coef=0.01,
                            loss_agg="seq_mean_token_mean", horizon=None, tis_cap=None)
MINI = 8


@pytest.fixture(scope="module")
def kept():
    """Actor groups one test leaves running for the next (the ZeRO-3 learners)."""
    return {}


@pytest.fixture(scope="module")
def minibatch(tiny_model_dir):
    return make_minibatch(tiny_model_dir)


def make_minibatch(tiny_model_dir, prompt_lens=None, response_lens=None):
    """8 sequences of different lengths whose rollout logprobs are the model's own (ratio = 1)."""
    gen = torch.Generator().manual_seed(0)
    prompt_lens = prompt_lens or torch.randint(3, 7, (MINI,), generator=gen).tolist()
    prompts = [torch.randint(3, 98, (n,), generator=gen).tolist() for n in prompt_lens]
    response_lens = response_lens or torch.randint(1, 6, (MINI,), generator=gen).tolist()
    responses = [torch.randint(3, 98, (n,), generator=gen).tolist() for n in response_lens]
    batch = collate_sequences(prompts, responses, [[0.0] * len(r) for r in responses], pad_id=0)
    model = disable_dropout(load_causal_lm(str(tiny_model_dir)))
    with torch.no_grad():
        logprobs, _ = response_logprobs(model, batch["input_ids"], batch["attention_mask"], batch.prompt_width)
    mask = batch["response_mask"]
    batch["rollout_logprobs"] = logprobs * mask
    batch["ref_logprobs"] = (logprobs + 0.3 * torch.randn(logprobs.shape, generator=gen)) * mask
    batch["advantages"] = torch.randn(MINI, generator=gen)[:, None] * mask
    return batch


def _torch_reference_step(model_dir, batch, loss_cfg=LOSS_CFG, grad_clip=None, norms=None, sft=None):
    """Plain torch: loss of the whole mini-batch, one AdamW step (gradients clipped to a global
    norm of `grad_clip` if given; the pre-clip norm is appended to `norms`). With `sft`
    demonstrations: + loss_cfg.sft_coef x their token-mean NLL, as PPO-ptx writes it."""
    model = disable_dropout(load_causal_lm(str(model_dir)))
    logprobs, entropy = response_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                          batch.prompt_width, with_entropy=True)
    cfg = loss_cfg.objective_kwargs()
    loss, _, _ = policy_objective(logprobs, batch["rollout_logprobs"], batch["advantages"],
                                  batch["response_mask"], ref_logprobs=batch["ref_logprobs"],
                                  entropy=entropy, **cfg)
    if sft is not None:
        sft_logprobs, _ = response_logprobs(model, sft["input_ids"], sft["attention_mask"], sft.prompt_width)
        mask = sft["response_mask"]
        loss = loss + loss_cfg.sft_coef * (-(sft_logprobs * mask).sum() / mask.sum())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    if norms is not None:
        norms.append(norm.item())
    optimizer.step()
    return {n: p.detach() for n, p in model.named_parameters()}


def _ds_step(model_dir, batch, ranks, micro, zero_stage, max_tokens=0, loss_cfg=LOSS_CFG, optim=OPTIM,
             bf16=False, sft=None):
    """One optimizer step on `ranks` learner ranks; returns (group, train metrics, init info)."""
    group = ActorGroup("learner", LearnerActor, ranks, 0.4, 0.0, 60,
                       [dict(rank=r, world_size=ranks, model_path=str(model_dir)) for r in range(ranks)])
    addr, port = group.run("address", timeout_s=60)[0]
    grad_accum = MINI // ranks // micro
    info = group.wait(group.call("init", addr, port, "gloo", zero_stage, micro, grad_accum, optim, 1,
                                 bf16, False, 300), "init", 600)
    num_tokens, num_seqs = count_normalizers(batch["response_mask"])
    shards = batch.chunk(ranks)
    sft_shards = ([[(part, float(sft["response_mask"].sum()))] for part in sft.chunk(ranks)]
                  if sft is not None else [None] * ranks)
    metrics = group.wait(group.call_each("train_step", [
        ([(shard, float(num_tokens), float(num_seqs))], loss_cfg, 1, max_tokens, rows)
        for shard, rows in zip(shards, sft_shards)]), "train_step", 300)
    return group, metrics, info


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_two_accum_steps_equal_one_rank_and_torch(local_ray, tiny_model_dir, minibatch, zero_stage, kept):
    initial = {n: p.detach() for n, p in load_causal_lm(str(tiny_model_dir)).named_parameters()}
    expected = _torch_reference_step(tiny_model_dir, minibatch)
    one, _, _ = _ds_step(tiny_model_dir, minibatch, ranks=1, micro=MINI, zero_stage=zero_stage)
    single = one.run("get_weights", timeout_s=60)[0]
    one.kill()
    two, metrics, info = _ds_step(tiny_model_dir, minibatch, ranks=2, micro=2, zero_stage=zero_stage)
    split = two.run("get_weights", timeout_s=60)
    assert all(m["optim/grad_norm"] > 0 for m in metrics)
    num_params = sum(w.numel() for w in initial.values())
    for rank_info in info:  # ZeRO-3 loads partitioned (zero.Init): no rank ever held the whole model
        assert rank_info["num_params"] == num_params
        if zero_stage == 3:
            assert rank_info["local_params"] <= num_params // 2 + len(initial), rank_info
        else:
            assert rank_info["local_params"] == num_params
    moved = 0
    for name, want in expected.items():
        torch.testing.assert_close(single[name], want, rtol=1e-4, atol=1e-6, msg=f"1 rank vs torch: {name}")
        for rank_weights in split:
            torch.testing.assert_close(rank_weights[name], single[name], rtol=1e-4, atol=1e-6,
                                       msg=f"2 ranks x 2 micro vs 1 rank: {name}")
        moved += not torch.allclose(want, initial[name], rtol=0, atol=1e-7)
    assert moved >= len(expected) - 2, "the step should move (nearly) every tensor"  # tied/norm edge cases
    if zero_stage == 3:
        kept["zero3"] = two  # reused by the publish test below
    else:
        two.kill()


def test_zero3_publish_from_two_ranks_reaches_the_engine_bit_exact(local_ray, tiny_model_dir, kept):
    from rlhf_dist.actors.rollout import RolloutActor
    from rlhf_dist.weights.checksum import fuse_like_engine, narrow_to

    learners = kept.get("zero3")
    if learners is None:  # run alone: the ZeRO-3 group the test above would have left
        learners, _, _ = _ds_step(tiny_model_dir, make_minibatch(tiny_model_dir), ranks=2, micro=2, zero_stage=3)
    engines = ActorGroup("rollout", RolloutActor, 1, 0.3, 0.0, 60, [dict(model_path=str(tiny_model_dir))])
    engines.wait(engines.call("ready"), "engine start", 600)
    packed = engines.run("packed_modules", timeout_s=60)[0]
    plan = learners.run("weight_plan", 0.05, "float32", timeout_s=60)[0]
    refs = [a.weights_call.options(num_returns=2).remote("object_store", "send", plan, "float32")
            for a in learners.actors]
    loads = engines.call("weights_call", "object_store", "receive", [refs[0][0]], 60.0, True)
    result = engines.wait(loads, "load", 120)[0]
    assert ray.get(refs[1][1]) is None  # rank 1 gathers with rank 0 but publishes nothing
    assert ray.get(refs[0][1])["buckets"] == len(plan) > 1
    expected = fuse_like_engine(learners.run("get_weights", timeout_s=60)[0], packed)
    held = engines.run("get_weights", timeout_s=60)[0]
    initial = fuse_like_engine(dict(load_causal_lm(str(tiny_model_dir)).named_parameters()), packed)
    assert set(held) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(narrow_to(held[name], tensor.shape), tensor), name
    assert any(not torch.equal(initial[n].detach(), t) for n, t in expected.items())
    assert result["buckets"] > 1
    engines.kill()
    learners.kill()


# Responses of 1..12 tokens, long and short mixed within each rank's fixed-size micro-batches.
# With a 31-token budget (P = 6) rank 0 packs [12] [11] [1, 1] and rank 1 [12] [11] [10] [9]; the
# ranks agree on 4 forwards, so rank 0 halves its largest part.
MIXED_PROMPTS, MIXED_RESPONSES, BUDGET = [3, 6, 4, 5, 6, 3, 5, 4], [1, 12, 1, 11, 12, 11, 10, 9], 31


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_token_budget_micro_batches_give_the_fixed_size_update_with_less_padding(local_ray, tiny_model_dir, zero_stage):
    batch = make_minibatch(tiny_model_dir, MIXED_PROMPTS, MIXED_RESPONSES)
    loss_cfg = dataclasses.replace(LOSS_CFG, entropy_coef=0.0)  # entropy computed as a metric only, no graph
    expected = _torch_reference_step(tiny_model_dir, batch, loss_cfg)
    runs = {}
    for max_tokens in (0, BUDGET):
        group, metrics, _ = _ds_step(tiny_model_dir, batch, ranks=2, micro=2, zero_stage=zero_stage,
                                     max_tokens=max_tokens, loss_cfg=loss_cfg)
        runs[max_tokens] = metrics, group.run("get_weights", timeout_s=60)
        group.kill()
    (fixed, fixed_weights), (budget, budget_weights) = runs[0], runs[BUDGET]
    for name, want in expected.items():
        for weights in fixed_weights + budget_weights:
            torch.testing.assert_close(weights[name], want, rtol=1e-4, atol=1e-6, msg=name)
    assert [m["perf/forwards_per_rank"] for m in fixed] == [2.0, 2.0]
    assert [m["perf/forwards_per_rank"] for m in budget] == [4.0, 4.0]
    padded = {k: sum(m["perf/padded_tokens_per_rank"] for m in runs[k][0]) for k in runs}
    assert padded == {0: 2 * 18 + 2 * 17 + 2 * 18 + 2 * 16, BUDGET: (18 + 17 + 7 + 7) + (18 + 17 + 16 + 15)}
    assert budget[0]["perf/padded_token_frac"] < fixed[0]["perf/padded_token_frac"]
    assert all(m["entropy/mean"] > 0 for m in budget)


@pytest.mark.parametrize("zero_stage,bf16", [(0, False), (2, False), (3, False), (0, True), (2, True)])
def test_grad_norm_is_the_global_pre_clip_norm_and_clipping_uses_it(local_ray, tiny_model_dir, minibatch,
                                                                     zero_stage, bf16):
    """`optim/grad_norm` is the norm torch's clip_grad_norm_ returns on the unsplit mini-batch's
    gradient (before clipping), under every ZeRO stage and dtype, and the clipped step equals
    torch's. (DeepSpeed 0.19.8 returns no norm under ZeRO-0 fp32: it was logged as 0.0.)"""
    clip = 0.05
    norms = []
    expected = _torch_reference_step(tiny_model_dir, minibatch, grad_clip=clip, norms=norms)
    group, metrics, _ = _ds_step(tiny_model_dir, minibatch, ranks=2, micro=2, zero_stage=zero_stage,
                                 optim=dict(OPTIM, grad_clip=clip), bf16=bf16)
    weights = group.run("get_weights", timeout_s=60)
    group.kill()
    assert norms[0] > 10 * clip, "the test needs a gradient that the clip binds"
    for rank_metrics in metrics:
        assert rank_metrics["optim/grad_norm"] == pytest.approx(norms[0], rel=0.03 if bf16 else 1e-4)
    if not bf16:  # Adam with eps >> |g| moves by ~ lr * g / eps: a wrong clip norm shows here
        for name, want in expected.items():
            torch.testing.assert_close(weights[0][name], want, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("zero_stage,micro,num_demos", [(2, 2, 4), (3, 1, 6)])
def test_the_sft_mix_adds_its_coefficient_times_the_demonstrations_gradient(local_ray, tiny_model_dir, minibatch,
                                                                            zero_stage, micro, num_demos):
    """algo.sft_coef (PPO-ptx): 2 ranks x 2 (or 4) micro-batches, the demonstrations sharded beside
    the policy rows (3 per rank in 2 uneven parts in the second case), make the step that torch
    makes on policy loss + coef x token-mean NLL of all demonstrations. Adam with eps >> |g| moves
    by ~ lr x g / eps, so a term left out, a row dropped, a missing coefficient or a per-rank
    instead of global token count shows in the weights."""
    from rlhf_dist.data.batch import demonstration_batch
    from rlhf_dist.models.hf import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts = ["rev abcd=", "rev xyz=", "rev hello=", "rev qq=", "rev tuvw=", "rev mn="][:num_demos]
    demos = demonstration_batch(tokenizer, prompts, [p[4:-1][::-1] for p in prompts])
    loss_cfg = dataclasses.replace(LOSS_CFG, sft_coef=0.5)
    without = _torch_reference_step(tiny_model_dir, minibatch, loss_cfg)
    expected = _torch_reference_step(tiny_model_dir, minibatch, loss_cfg, sft=demos)
    group, metrics, _ = _ds_step(tiny_model_dir, minibatch, ranks=2, micro=micro, zero_stage=zero_stage,
                                 loss_cfg=loss_cfg, sft=demos)
    weights = group.run("get_weights", timeout_s=60)[0]
    group.kill()
    differs = sum(not torch.allclose(without[n], expected[n], rtol=1e-4, atol=1e-6) for n in expected)
    assert differs >= len(expected) // 2, "the demonstrations' term must move the step"
    for name, want in expected.items():
        torch.testing.assert_close(weights[name], want, rtol=1e-4, atol=1e-6, msg=name)
    model = disable_dropout(load_causal_lm(str(tiny_model_dir)))
    with torch.no_grad():
        logprobs, _ = response_logprobs(model, demos["input_ids"], demos["attention_mask"], demos.prompt_width)
    nll = -(logprobs * demos["response_mask"]).sum() / demos["response_mask"].sum()
    assert sum(m["loss/sft"] for m in metrics) == pytest.approx(nll.item(), rel=1e-4)  # summed over ranks
