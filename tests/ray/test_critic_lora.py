"""LoRA on the PPO critic (critic.lora, ZeRO-3) on real Ray, vLLM and DeepSpeed: the critic trains its
adapters and its value head only, its frozen body does not move, the values follow the returns,
and a checkpoint holds the critic's adapter and resumes it exactly.
"""

import json

import pytest
import ray
import torch

from helpers import assert_resume_repeats_the_step, start_trainer

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, tmp_path_factory):
    trainer = start_trainer(tmp_path_factory.mktemp("run"), tiny_model_dir, [
        "algo=ppo", "critic.lora.rank=4", "critic.lora.alpha=8", "critic.optim.lr=1e-2", "critic.zero_stage=3"])
    yield trainer
    trainer.shutdown()
    ray.shutdown()


def test_critic_trains_adapters_and_value_head_only(trainer, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from rlhf_dist.models.value import load_value_model

    reference = get_peft_model(load_value_model(str(tiny_model_dir)), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"], task_type="TOKEN_CLS"))
    before = trainer.critics.run("get_weights", timeout_s=60)[0]
    steps = [trainer.step(step) for step in (1, 2, 3, 4)]
    losses = [m["critic/value_loss"] for m in steps]
    after = trainer.critics.run("get_weights", timeout_s=60)[0]
    trainable = {n for n, p in reference.named_parameters() if p.requires_grad}
    assert set(after) == {n for n, _ in reference.named_parameters()}
    moved = {n for n in after if not torch.equal(after[n], before[n])}
    # every adapter's B and the value head's trained copy moved; nothing of the frozen body did
    assert moved <= trainable and {n for n in trainable if "lora_B" in n or "modules_to_save" in n} <= moved
    # the values follow the returns: measured 0.0295 -> 0.0149 over these 4 steps
    assert losses[-1] < 0.75 * losses[0], losses


def test_critic_checkpoint_holds_its_adapter_and_resumes_exactly(trainer, tmp_path):
    path = trainer.save_checkpoint(4, str(tmp_path / "ck"))
    manifest = json.loads((tmp_path / "ck" / "step_00000004" / "COMPLETE.json").read_text())
    assert manifest["critic_lora"]["rank"] == 4 and manifest["lora"] == {"rank": 0}
    step_dir = tmp_path / "ck" / "step_00000004"
    # the critic's weights are a PEFT adapter (with its value head), and its optimizer state is
    # that of the adapters and the head only, a fraction of the fully trained policy's
    assert (step_dir / "critic" / "adapter_model.safetensors").is_file()
    assert not (step_dir / "critic" / "model.safetensors").exists()
    optim_bytes = {role: sum(p.stat().st_size for p in (step_dir / f"{role}_ds").rglob("*optim_states.pt"))
                   for role in ("critic", "policy")}
    assert optim_bytes["critic"] < 0.2 * optim_bytes["policy"], optim_bytes
    assert_resume_repeats_the_step(trainer, path, 4, ("critic/value_loss", "critic/values_mean", "loss/policy",
                                                      "reward/mean"),
                                   lambda: trainer.critics.run("get_weights", timeout_s=60)[0])
