"""LoRA learner ranks (model.lora) in real Ray actors over gloo, against plain torch + peft.

One optimizer step with 2 ranks x 2 micro-batches under ZeRO-2 and ZeRO-3 must move the adapters
exactly as a single-process AdamW step over the adapters does on the unsplit mini-batch; the
base weights must not move; the merged weights the engines would get must equal W + s * B @ A of
that step; and the reference (adapters off) must give the base model's logprobs.
"""

import pytest
import torch

from rlhf_dist.actors.learner import LearnerActor
from rlhf_dist.algo import count_normalizers
from rlhf_dist.algo.objective import PolicyLossConfig, policy_objective
from rlhf_dist.data.batch import collate_sequences
from rlhf_dist.models.hf import disable_dropout, load_causal_lm, response_logprobs
from rlhf_dist.models.lora import LoraSpec, add_adapters, base_params, lora_layers, merged_weight
from rlhf_dist.runtime.group import ActorGroup

pytestmark = [pytest.mark.ray, pytest.mark.slow]

LR, EPS, MINI, SEED = 1e-2, 1.0, 8, 0  # eps >> |g|: the update is proportional to the gradient
OPTIM = dict(lr=LR, weight_decay=0.0, betas=[0.9, 0.999], eps=EPS, grad_clip=1e9,
             scheduler="constant", warmup_steps=0, min_lr_ratio=1.0)
LOSS_CFG = PolicyLossConfig(temperature=1.0, policy_loss="clipped", clip_low=0.2, clip_high=0.2, clip_ratio_c=3.0,
                            kl_loss_coef=0.1, kl_loss_estimator="k3_st", entropy_coef=0.0,
                            loss_agg="seq_mean_token_mean", horizon=None, tis_cap=None)
SPEC = LoraSpec(rank=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])


def _minibatch(model_dir):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 98, (int(n),), generator=gen).tolist() for n in torch.randint(3, 7, (MINI,), generator=gen)]
    responses = [torch.randint(3, 98, (int(n),), generator=gen).tolist() for n in torch.randint(1, 6, (MINI,), generator=gen)]
    batch = collate_sequences(prompts, responses, [[0.0] * len(r) for r in responses], pad_id=0)
    with torch.no_grad():
        logprobs, _ = response_logprobs(load_causal_lm(str(model_dir)), batch["input_ids"],
                                        batch["attention_mask"], batch.prompt_width)
    mask = batch["response_mask"]
    batch["rollout_logprobs"] = logprobs * mask
    batch["ref_logprobs"] = (logprobs + 0.3 * torch.randn(logprobs.shape, generator=gen)) * mask
    batch["advantages"] = torch.randn(MINI, generator=gen)[:, None] * mask
    return batch, logprobs * mask


def _torch_lora_step(model_dir, batch):
    """Plain torch + peft, one process: the same adapters (same seed), the unsplit loss, AdamW
    over the adapters. Returns the model after the step."""
    model = disable_dropout(load_causal_lm(str(model_dir)))
    torch.manual_seed(SEED)
    model = add_adapters(model, SPEC)
    logprobs, _ = response_logprobs(model, batch["input_ids"], batch["attention_mask"], batch.prompt_width)
    loss, _, _ = policy_objective(logprobs, batch["rollout_logprobs"], batch["advantages"], batch["response_mask"],
                                  ref_logprobs=batch["ref_logprobs"], **LOSS_CFG.objective_kwargs())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, eps=EPS, weight_decay=0.0)
    loss.backward()
    optimizer.step()
    return model


def _ds_lora_step(model_dir, batch, zero_stage, checkpointing=False):
    ranks, micro = 2, 2
    group = ActorGroup("learner", LearnerActor, ranks, 0.4, 0.0, 60,
                       [dict(rank=r, world_size=ranks, model_path=str(model_dir), lora=SPEC) for r in range(ranks)])
    addr, port = group.run("address", timeout_s=60)[0]
    info = group.wait(group.call("init", addr, port, "gloo", zero_stage, micro, MINI // ranks // micro, OPTIM, 1,
                                 False, checkpointing, 300, SEED), "init", 600)
    num_tokens, num_seqs = count_normalizers(batch["response_mask"])
    metrics = group.wait(group.call_each("train_step", [
        ([(shard, float(num_tokens), float(num_seqs))], LOSS_CFG, 1) for shard in batch.chunk(ranks)]), "train_step", 300)
    return group, info, metrics


@pytest.mark.parametrize("zero_stage,checkpointing", [(1, True), (2, False), (3, False)])
def test_lora_step_under_zero_equals_torch_and_reference_is_the_base(local_ray, tiny_model_dir, zero_stage,
                                                                     checkpointing):
    """ZeRO-1 runs with gradient checkpointing (model.gradient_checkpointing): the frozen
    embeddings' output must then carry a gradient for the adapters to get one."""
    batch, base_logprobs = _minibatch(tiny_model_dir)
    expected = _torch_lora_step(tiny_model_dir, batch)
    group, info, metrics = _ds_lora_step(tiny_model_dir, batch, zero_stage, checkpointing)
    try:
        trainable = sum(p.numel() for p in expected.parameters() if p.requires_grad)
        assert all(i["trainable_params"] == trainable < i["num_params"] // 10 for i in info), info
        assert all(m["optim/grad_norm"] > 0 for m in metrics)
        # every rank's parameters (peft names) equal torch's: adapters moved, base weights did not
        initial = dict(load_causal_lm(str(tiny_model_dir)).named_parameters())
        want = {n: p.detach() for n, p in expected.named_parameters()}
        for rank_weights in group.run("get_weights", timeout_s=60):
            assert set(rank_weights) == set(want)
            for name, tensor in want.items():
                torch.testing.assert_close(rank_weights[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
        for name, param in base_params(expected).items():
            assert torch.equal(param.detach(), initial[name].detach()), f"frozen {name} moved"
        # what the engines get: W + s * B @ A under the HF names, every tensor of the model
        layers = lora_layers(expected)
        with torch.no_grad():
            merged = {n: merged_weight(p, layers.get(n)) for n, p in base_params(expected).items()}
        published = group.run("published_weights", timeout_s=60)[0]
        assert set(published) == set(merged)
        moved = 0
        for name, tensor in merged.items():
            torch.testing.assert_close(published[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
            moved += not torch.equal(published[name], initial[name].detach())
        assert moved == 2 * len(SPEC.target_modules)  # each adapted weight of the 2 layers, nothing else
        # the reference: the same ranks with adapters off give the base model's logprobs, while
        # the adapted policy now differs from it
        shards = batch.chunk(2)
        ref = group.wait(group.call_each("compute_ref_logprobs", [(s, 1.0, 2) for s in shards]), "ref", 120)
        policy = group.wait(group.call_each("compute_logprobs", [(s, 1.0, 2) for s in shards]), "logprobs", 120)
        width = batch["response_mask"].shape[1]
        pad = lambda parts: torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])  # noqa: E731
        mask = batch["response_mask"]
        torch.testing.assert_close(pad(ref) * mask, base_logprobs, rtol=0, atol=1e-6)
        assert ((pad(policy) - base_logprobs).abs() * mask).max() > 1e-4
    finally:
        group.kill()
