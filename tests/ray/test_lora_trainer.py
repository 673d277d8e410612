"""A LoRA run's trainer on real Ray, vLLM and DeepSpeed (ZeRO-3 over 2 gloo ranks, the collective
transport): no reference actor, the engines get the merged weights bit for bit and sample from
them, checkpoints hold the adapter and resume exactly, the final export is a PEFT adapter plus a
merged model that loads as model.path.
"""

import json

import pytest
import ray
import torch

from rlhf_dist.weights.checksum import fuse_like_engine, narrow_to

from helpers import assert_resume_repeats_the_step, start_trainer

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, tmp_path_factory):
    trainer = start_trainer(tmp_path_factory.mktemp("run"), tiny_model_dir, [
        "model.lora.rank=8", "model.lora.alpha=16", "learner.zero_stage=3", "learner.optim.lr=1e-2",
        "rollout.sync_transport=collective", "trainer.save_final=true", "model.lora.export_merged=true"])
    yield trainer
    trainer.shutdown()
    ray.shutdown()


def test_no_reference_actor_and_the_kl_comes_from_the_base(trainer):
    assert trainer.use_reference and trainer.reference is None
    metrics = trainer.step(1)
    assert "kl/mean" in metrics and metrics["kl/mean"] == 0.0  # B = 0: policy = base before the first update
    metrics = trainer.step(2)
    assert metrics["kl/mean"] > 0  # the adapter has moved the policy away from the base


def test_engines_hold_the_merged_weights_bit_for_bit_and_sample_from_them(trainer):
    before = trainer.engines.run("get_weights", timeout_s=60)[0]
    metrics = trainer.step(3)
    assert metrics["sync/verified_tensors"] > 0 and metrics["sync/buckets"] > 1
    # step 3 trained on samples of the weights synced after step 2: same weights, kernel numerics only
    assert metrics["sync/rollout_logprob_gap_max"] < 1e-3
    expected = fuse_like_engine(trainer.learners.run("published_weights", timeout_s=60)[0],
                                trainer.weights.packed_modules)
    held = trainer.engines.run("get_weights", timeout_s=60)[0]
    assert set(held) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(narrow_to(held[name], tensor.shape), tensor), name
    moved = [n for n, t in expected.items() if not torch.equal(narrow_to(before[n], t.shape), t)]
    assert moved and all("layers" in n and "norm" not in n for n in moved)  # only adapted projections


def test_checkpoint_holds_the_adapter_and_resumes_exactly(trainer, tmp_path):
    path = trainer.save_checkpoint(3, str(tmp_path / "ck"))
    files = {p.name for p in (tmp_path / "ck").rglob("*") if p.is_file()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    assert json.loads((tmp_path / "ck" / "step_00000003" / "COMPLETE.json").read_text())["lora_rank"] == 8
    assert_resume_repeats_the_step(trainer, path, 3, ("reward/mean", "loss/policy", "kl/mean", "optim/grad_norm"),
                                   lambda: trainer.learners.run("published_weights", timeout_s=60)[0])


def test_final_export_is_an_adapter_and_a_merged_model(trainer, tmp_path):
    from peft import PeftModel

    from rlhf_dist.models.hf import load_causal_lm
    from rlhf_dist.stages.rl import save_policy

    final = tmp_path / "final"
    save_policy(trainer, final, trainer.cfg)
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 8
    published = trainer.learners.run("published_weights", timeout_s=60)[0]
    merged = dict(load_causal_lm(str(final / "merged")).named_parameters())
    for name, tensor in published.items():
        assert torch.equal(merged[name].detach(), tensor), name
    base = load_causal_lm(trainer.model_path)
    ids = torch.randint(3, 90, (2, 9))
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(base, str(final))(ids).logits
        torch.testing.assert_close(load_causal_lm(str(final / "merged"))(ids).logits, adapted, rtol=1e-5, atol=1e-5)
