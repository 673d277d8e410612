"""Adapter-only weight sync (model.lora.sync=adapter) on real Ray, vLLM and DeepSpeed (ZeRO-3: the
adapters gathered per bucket): after each update only the adapter moves, the engine's adapter
slots hold the learner's tensors bit for bit, its base weights stay the base model's, it samples
from base + adapter (logprob gap against the adapted policy < 1e-3, against the base far larger),
and a resumed run puts the checkpoint's adapter back into the engine.
"""

import pytest
import ray
import torch

from helpers import start_trainer

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, tmp_path_factory):
    trainer = start_trainer(tmp_path_factory.mktemp("run"), tiny_model_dir, [
        "model.lora.rank=4", "model.lora.alpha=12", "model.lora.sync=adapter", "learner.optim.lr=2e-2",
        "learner.zero_stage=3",
        "rollout.sync_transport=object_store"])
    yield trainer
    trainer.shutdown()
    ray.shutdown()


def test_only_the_adapter_moves_and_the_engine_slots_hold_it_bit_for_bit(trainer, tiny_model_dir):
    from rlhf_dist.models.hf import load_causal_lm

    assert trainer.lora_sync == "adapter"
    base = dict(load_causal_lm(str(tiny_model_dir)).named_parameters())
    model_mb = sum(t.numel() * 4 for t in base.values()) / 2**20
    for step in (1, 2, 3):
        metrics = trainer.step(step)
    sent = trainer.learners.run("published_weights", timeout_s=60)[0]
    # 7 projections x 2 layers, an A and a B each; a few % of the model's bytes
    assert len(sent) == 28 and metrics["sync/verified_tensors"] == 28
    assert metrics["sync/mb"] < 0.2 * model_mb
    held = trainer.engines.run("get_adapter", timeout_s=60)[0]
    assert set(held) == set(sent)
    for name, tensor in sent.items():
        assert torch.equal(held[name], tensor), name
    assert any(t.abs().sum() > 0 for n, t in sent.items() if "lora_B" in n)  # trained: B moved from 0
    # the engine's base weights are the base model's: the update reached it as the adapter only
    # (vLLM wraps each adapted layer: its weight is then '<module>.base_layer.weight')
    engine_weights = trainer.engines.run("get_weights", timeout_s=60)[0]
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(engine_weights[name.replace(".weight", ".base_layer.weight")], base[name])


def test_the_engine_samples_from_base_plus_adapter(trainer, tiny_model_dir):
    from rlhf_dist.models.hf import load_causal_lm

    metrics = trainer.step(4)
    # step 4 sampled with the adapter synced after step 3, which the learner held when it scored them
    assert metrics["sync/rollout_logprob_gap_max"] < 1e-3
    sent = trainer.learners.run("published_weights", timeout_s=60)[0]
    policy, base = load_causal_lm(str(tiny_model_dir)), load_causal_lm(str(tiny_model_dir))
    with torch.no_grad():  # W + B' A by hand (B' = (alpha / rank) B, as sent)
        params = dict(policy.named_parameters())
        for name, a in sent.items():
            if ".lora_A." in name:
                module = name.removeprefix(PREFIX).removesuffix(".lora_A.weight")
                params[f"{module}.weight"] += sent[name.replace("lora_A", "lora_B")] @ a
    prompt = [1, 5, 9, 12, 7]
    samples = ray.get(trainer.engines.actors[0].generate.remote([prompt], 8, 1.0, 1.0, 12, [list(range(8))]))
    gap_policy = gap_base = 0.0
    for sample in samples:
        ids = torch.tensor([prompt + sample.token_ids])
        for model, which in ((policy, "policy"), (base, "base")):
            with torch.no_grad():
                logprobs = torch.log_softmax(model(ids).logits[0, len(prompt) - 1:-1].float(), -1)
            token_lp = logprobs.gather(-1, torch.tensor(sample.token_ids)[:, None])[:, 0]
            gap = (token_lp - torch.tensor(sample.logprobs)).abs().max().item()
            if which == "policy":
                gap_policy = max(gap_policy, gap)
            else:
                gap_base = max(gap_base, gap)
    assert gap_policy < 1e-3 and gap_base > 100 * gap_policy, (gap_policy, gap_base)


def test_resume_puts_the_checkpoints_adapter_back_into_the_engine(trainer, tmp_path):
    path = trainer.save_checkpoint(4, str(tmp_path / "ck"))
    saved = trainer.engines.run("get_adapter", timeout_s=60)[0]
    after = trainer.step(5)
    assert any(not torch.equal(t, saved[n]) for n, t in trainer.engines.run("get_adapter", timeout_s=60)[0].items())
    assert trainer.load_checkpoint(path) == 4  # the engines get the restored adapter by a verified sync
    for name, tensor in trainer.engines.run("get_adapter", timeout_s=60)[0].items():
        assert torch.equal(tensor, saved[name]), name
    again = trainer.step(5)
    for key in ("reward/mean", "loss/policy", "kl/mean", "optim/grad_norm"):
        assert again[key] == after[key], key
