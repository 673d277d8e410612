"""Multi-turn episodes on the real actors (vLLM engine, two DeepSpeed ranks, reference, reward):
an environment written from the README's contract alone, two training steps on it, the loss
masks, and the engine's logprobs against the learner's weights on multi-turn sequences."""

import pytest
import ray
import torch

from helpers import start_trainer

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Written from README.md ("Multi-turn, tool-using rollouts") and nothing else.
USER_ENV = '''
from rlhf_dist.envs.base import EnvStep


class Echo:
    def __init__(self, record: dict):
        self.prompt = record["prompt"]

    def step(self, conversation: list[dict]) -> EnvStep:
        turn = conversation[-1]["content"]
        if len(conversation) == 2:  # the policy's first turn: a tool answers, half a point for it
            return EnvStep(observation="seen " + turn[:3] + ";", reward=0.5, tool_calls=1)
        return EnvStep(done=True)
'''


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, tmp_path_factory):
    env_file = tmp_path_factory.mktemp("env") / "user_env.py"
    env_file.write_text(USER_ENV)
    trainer = start_trainer(tmp_path_factory.mktemp("run"), tiny_model_dir, [
        f"rollout.env={env_file}:Echo", "rollout.max_turns=3", "rollout.max_new_tokens=6",
        "rollout.max_episode_tokens=24"])
    yield trainer
    trainer.shutdown()
    ray.shutdown()


def test_two_training_steps_on_a_two_turn_environment(trainer):
    """The batch each step trains on: observation tokens out of the response mask and with no
    advantage, the environment's turn reward on the first turn's last token."""
    trained = []
    original = trainer.train_or_skip

    def spy(batch, step, staleness=0):
        trained.append(batch)
        return original(batch, step, staleness)

    trainer.train_or_skip = spy
    try:
        steps = [trainer.step(step) for step in (1, 2)]
    finally:
        del trainer.train_or_skip
    for batch in trained:
        mask, attention = batch["response_mask"], batch["attention_mask"][:, batch.prompt_width:]
        observation = (attention == 1) & (mask == 0)  # in the context, out of the loss
        assert observation.any(-1).all(), "every episode has observation tokens"
        assert batch["advantages"][observation].abs().sum().item() == 0.0
        turn = batch["turn_rewards"]
        assert (turn == 0.5).sum(-1).tolist() == [1] * len(batch)  # one turn reward per episode
        first_obs = observation.float().argmax(-1)  # the observation starts right after turn 1's last token
        assert turn[torch.arange(len(batch)), first_obs - 1].tolist() == [0.5] * len(batch)
    for metrics in steps:
        assert metrics["episode/turns_mean"] == 2.0  # the environment ends every episode after two
        assert metrics["episode/tool_calls_mean"] == 1.0
        assert metrics["episode/turn_reward_sum_mean"] == 0.5
        assert metrics["episode/tool_errors_mean"] == metrics["episode/env_errors_mean"] == 0.0
        assert metrics["episode/observation_tokens_mean"] >= 6  # "seen ;" and up to 3 characters
        assert torch.isfinite(torch.tensor(metrics["loss/policy"]))
        assert metrics["sync/verified_tensors"] > 0


def test_masks_ids_and_engine_logprobs_on_multi_turn_sequences(trainer, tiny_model_dir):
    """The batch holds the engine's ids (eos inside the episode included), observation tokens in
    the context with mask 0, and the learner's weights give the engine's logprobs on every policy
    token of every turn (fp32)."""
    from rlhf_dist.data.batch import samples_batch
    from rlhf_dist.models.hf import load_causal_lm, response_logprobs

    tokenizer = trainer.tokenizer
    samples, _ = trainer.generate(trainer.eval_records[:4], 2, 1.0, step=7)
    assert len(samples) == 8
    for sample in samples:
        observation = sample.episode["conversation"][1]["content"]
        obs_ids = tokenizer(observation, add_special_tokens=False)["input_ids"]
        start = sample.loss_mask.index(0)
        assert sample.token_ids[start:start + len(obs_ids)] == obs_ids  # tokenised once, on its own
        assert sample.loss_mask == [1] * start + [0] * len(obs_ids) + [1] * (len(sample.token_ids) - start - len(obs_ids))
        assert sample.logprobs[start:start + len(obs_ids)] == [0.0] * len(obs_ids)
    # a first turn that ended with the end-of-sequence token keeps it in the episode's ids (what
    # re-encoding the episode's text would lose)
    assert any(s.token_ids[s.loss_mask.index(0) - 1] == tokenizer.eos_token_id for s in samples)
    batch = samples_batch(samples, tokenizer.pad_token_id)
    for row, sample in enumerate(samples):
        width = len(sample.token_ids)
        assert batch["input_ids"][row, batch.prompt_width:batch.prompt_width + width].tolist() == sample.token_ids
        assert batch["response_mask"][row, :width].tolist() == [float(m) for m in sample.loss_mask]
    model = load_causal_lm(str(tiny_model_dir)).eval()
    model.load_state_dict(trainer.learners.run("get_weights", timeout_s=60)[0], strict=False)
    model.tie_weights()
    with torch.no_grad():
        logprobs, _ = response_logprobs(model, batch["input_ids"], batch["attention_mask"], batch.prompt_width)
    gap = ((logprobs - batch["rollout_logprobs"]).abs() * batch["response_mask"]).max().item()
    assert gap < 1e-3, f"engine logprobs differ from the learner's weights by {gap} on multi-turn sequences"
    second_turn = [row for row, s in enumerate(samples) if s.loss_mask[-1] == 1 and 0 in s.loss_mask]
    assert len(second_turn) == len(samples)  # the gap covered tokens after an observation


def test_a_batch_larger_than_the_engines_step_budget_samples_with_seeds(trainer):
    """vLLM's CPU default schedules 4096 tokens per engine step and used to split a prompt that did
    not fit (chunked prefill), then rewind that request's seeded generator, which a CPU generator
    cannot do ("CPU Generator does not use offset"). The second turns of a multi-turn batch, or
    long prompts, reach that budget; 80 episodes of ~110-token prompts are 8800 tokens."""
    records = [{"prompt": "rev " + "abcdefghij" * 11 + "=" + str(i)} for i in range(40)]
    samples, _ = trainer.generate(records, 2, 1.0, step=9)
    assert len(samples) == 80 and all(s.episode["turns"] >= 1 for s in samples)
