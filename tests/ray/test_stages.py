"""The SFT and reward-model stages on real DeepSpeed ranks (gloo, 2 ranks), and the served RM.

- SFT lowers the held-out loss on the built-in task's demonstrations.
- The reward model learns a synthetic preference from pairs and rankings: held-out pairwise
  accuracy well above chance (>= 0.85; chance is 0.5).
- The reward actor serving that model gives the same scores as an offline forward.
"""

import random

import pytest
import ray
import torch

from rlhf_dist.runtime.ds_group import DSGroupSpec
from rlhf_dist.data.preferences import PreferencePair, ranking_to_pairs
from rlhf_dist.data.tasks import get_task
from rlhf_dist.models.hf import load_causal_lm

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _spec(mini, micro, lr, steps):
    optim = dict(lr=lr, weight_decay=0.0, betas=[0.9, 0.999], eps=1e-8, grad_clip=1.0,
                 scheduler="constant", warmup_steps=0, min_lr_ratio=1.0)
    return DSGroupSpec(2, 2, micro, mini, optim, steps, 0.4, 0.0)


def test_sft_lowers_held_out_loss_on_two_ranks(local_ray, tiny_model_dir, tmp_path):
    from rlhf_dist.stages.sft import run_sft

    task = get_task("reverse")
    demos = lambda split, n: [(r["prompt"], task.demonstration(r)) for r in task.make_records(split, n, 0)]  # noqa: E731
    history = run_sft(str(tiny_model_dir), str(tmp_path / "sft"), demos("train", 256), demos("eval", 32),
                      _spec(32, 16, 3e-3, 40), steps=40, eval_every=20)
    assert history["sft/eval_loss_end"] < history["sft/eval_loss_start"] - 1.0, history
    load_causal_lm(str(tmp_path / "sft"))  # HF format that model.path accepts


def _synthetic_pairs(num, seed):
    """Prefer completions written in the first half of the alphabet (a learnable, noiseless rule)."""
    rng = random.Random(seed)
    word = lambda letters: "".join(rng.choice(letters) for _ in range(4))  # noqa: E731
    pairs = []
    for _ in range(num):
        prompt = f"rev {word('abcdefghijklmnopqrstuvwxyz')}="
        if rng.random() < 0.5:
            pairs.append(PreferencePair(prompt, word("abcdefghijklm"), word("nopqrstuvwxyz")))
        else:  # a ranking: all first-half > mixed > all second-half (T-REX ordered pairs)
            mixed = word("abcdefghijklm")[:2] + word("nopqrstuvwxyz")[:2]
            pairs += ranking_to_pairs(prompt, [word("abcdefghijklm"), mixed, word("nopqrstuvwxyz")])
    return pairs


def test_reward_model_learns_a_preference_and_is_served_with_the_same_scores(local_ray, tiny_model_dir, tmp_path):
    from rlhf_dist.actors.reward import RewardActor
    from rlhf_dist.models.hf import load_tokenizer
    from rlhf_dist.models.scalar_reward import load_reward_model, reward_model_inputs, sequence_rewards
    from rlhf_dist.stages.reward_model import run_reward_model

    out = tmp_path / "rm"
    history = run_reward_model(str(tiny_model_dir), str(out), _synthetic_pairs(600, 0), _synthetic_pairs(64, 1),
                               _spec(32, 16, 1e-3, 60), steps=60, eval_every=30)
    assert history["rm/eval_accuracy_start"] < 0.75
    assert history["rm/eval_accuracy_end"] >= 0.85, history
    assert history["rm/eval_margin_end"] > history["rm/eval_margin_start"]

    records = [{"prompt": "rev abcd="}, {"prompt": "rev wxyz="}, {"prompt": "rev hello="}]
    completions = ["abca", "zzyx", "olleh"]
    actor = ray.remote(RewardActor).remote(None, model_path=str(out), fn_weight=0.0, batch_size=2)
    served = ray.get(actor.score.remote(records, completions))
    model, tokenizer = load_reward_model(str(out)).eval(), load_tokenizer(str(out))
    with torch.no_grad():
        offline = sequence_rewards(model, *reward_model_inputs(tokenizer, [r["prompt"] for r in records], completions))
    torch.testing.assert_close(torch.tensor(served.model), offline, rtol=1e-5, atol=1e-5)
    assert served.reward == served.model and served.rule is None
    assert served.model[0] > served.model[1]  # the learned preference, served
