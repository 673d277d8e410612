"""The critic's value model: built from the policy checkpoint, aligned with the logprobs, no dropout."""

import torch

from rlhf_dist.data.batch import collate_sequences
from rlhf_dist.models.hf import disable_dropout, load_causal_lm
from rlhf_dist.models.value import load_value_model, response_values


def test_value_model_reuses_the_policy_body_and_adds_a_scalar_head(tiny_model_dir, tmp_path):
    policy = load_causal_lm(str(tiny_model_dir))
    critic = load_value_model(str(tiny_model_dir))
    body = dict(critic.named_parameters())
    for name, param in policy.model.named_parameters():
        assert torch.equal(body[f"model.{name}"], param), name
    assert body["score.weight"].shape == (1, policy.config.hidden_size)
    from transformers import AutoTokenizer

    critic.save_pretrained(tmp_path / "critic")  # HF token-classification format, loadable again
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(tmp_path / "critic")
    again = load_value_model(str(tmp_path / "critic"))
    assert torch.equal(dict(again.named_parameters())["score.weight"], body["score.weight"])


def test_values_line_up_with_response_tokens_and_ignore_padding(tiny_model_dir):
    """V for response token t is read where the logits predicting token t are: position P-1+t."""
    critic = disable_dropout(load_value_model(str(tiny_model_dir))).eval()
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]
    batch = collate_sequences(prompts, responses, [[0.0] * 2, [0.0] * 3], pad_id=0)
    with torch.no_grad():
        values = response_values(critic, batch["input_ids"], batch["attention_mask"], batch.prompt_width)
        alone = response_values(critic, torch.tensor([[8, 9, 12, 13, 14]]), torch.ones(1, 5, dtype=torch.long), 2)
    assert values.shape == (2, 3)
    # row 1 is left-padded by one column; its values equal the unpadded sequence's
    torch.testing.assert_close(values[1], alone[0], rtol=1e-5, atol=1e-5)


def test_dropout_is_off_even_in_train_mode(tiny_model_dir):
    critic = load_value_model(str(tiny_model_dir))  # the token-classification head has dropout 0.1
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in critic.modules())
    critic = disable_dropout(critic).train()
    ids = torch.randint(3, 98, (2, 8))
    first, second = critic(input_ids=ids).logits, critic(input_ids=ids).logits
    assert torch.equal(first, second)


def test_critic_starts_from_a_reward_model_with_its_head(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from rlhf_dist.models.scalar_reward import load_reward_model

    reward_model = load_reward_model(str(tiny_model_dir))
    reward_model.save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(tmp_path / "rm")
    critic = dict(load_value_model(str(tmp_path / "rm")).named_parameters())
    for name, param in reward_model.named_parameters():
        assert torch.equal(critic[name], param), name  # body and `score.weight` both carried over
