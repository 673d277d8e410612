"""Multi-turn episodes without Ray: the turn loop's bookkeeping (rlhf_dist.rl.episodes) with a
scripted stand-in for the engines' turn sampler, the loss masks and turn rewards as the learner and
the estimators see them, and the environment contract's checks. The real engines run the same loop
in tests/ray/test_multiturn_actors.py."""

import time

import pytest
import torch

from rlhf_dist.algo.advantages import compute_advantages
from rlhf_dist.algo.objective import policy_objective
from rlhf_dist.data.batch import collate_sequences, demonstration_batch, samples_batch
from rlhf_dist.data.messages import Sample
from rlhf_dist.envs.base import EnvStep, as_env_step, load_env
from rlhf_dist.envs.calculator import Calculator, calculator
from rlhf_dist.errors import ConfigError
from rlhf_dist.rl.episodes import EnvironmentFailedError, EpisodeLimits, run_episodes
from rlhf_dist.seeding import sample_seed


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from rlhf_dist.models.hf import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def scripted_turns(tokenizer, script):
    """A stand-in for the engines: turn k of every episode is `script(k, context_text)`, each
    token with logprob -0.5, ended by eos; records what it was asked."""
    asked = []

    def generate_turn(contexts, seeds, limits):
        asked.append((contexts, seeds, limits))
        out = []
        for context, limit in zip(contexts, limits):
            text = script(len(asked) - 1, tokenizer.decode(context))
            full = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = full[:limit]
            out.append(Sample(ids, [-0.5] * len(ids), text, "stop" if len(full) <= limit else "length"))
        return out

    return generate_turn, asked


def run(tokenizer, env_cls, script, records, limits=None, seeds=None):
    generate_turn, asked = scripted_turns(tokenizer, script)
    limits = limits or EpisodeLimits(max_turns=3, max_new_tokens=16, max_episode_tokens=64, tool_timeout_s=2.0)
    prompt_ids = [tokenizer(r["prompt"])["input_ids"] for r in records]
    samples = run_episodes(env_cls, records, prompt_ids, seeds or list(range(len(records))),
                           lambda k, turn: 1000 * k + turn, generate_turn, tokenizer, limits)
    return samples, asked


class Rewarding:
    """Two policy turns: the first is answered "obs!" with reward 0.25, the second ends it with 1.0."""

    def __init__(self, record):
        self.record = record

    def step(self, conversation):
        if len(conversation) == 2:
            return EnvStep(observation="obs!", reward=0.25, tool_calls=1)
        return "", 1.0, True  # the tuple form


def test_episode_tokens_masks_and_turn_rewards(tokenizer):
    records = [{"prompt": "rev abc="}, {"prompt": "rev xy="}]
    samples, asked = run(tokenizer, Rewarding, lambda k, _: ["first", "second"][k], records)
    eos = tokenizer.eos_token_id
    policy_1 = tokenizer("first", add_special_tokens=False)["input_ids"] + [eos]
    observation = tokenizer("obs!", add_special_tokens=False)["input_ids"]
    policy_2 = tokenizer("second", add_special_tokens=False)["input_ids"] + [eos]
    for sample, record in zip(samples, records):
        assert sample.token_ids == policy_1 + observation + policy_2
        assert sample.loss_mask == [1] * len(policy_1) + [0] * len(observation) + [1] * len(policy_2)
        assert sample.logprobs == [-0.5] * len(policy_1) + [0.0] * len(observation) + [-0.5] * len(policy_2)
        # each turn's reward on its own last token
        assert sample.turn_rewards == {len(policy_1) - 1: 0.25, len(sample.token_ids) - 1: 1.0}
        assert sample.text == "first\nobs!\nsecond"
        assert sample.prompt_ids == tokenizer(record["prompt"])["input_ids"]
        assert sample.episode["conversation"] == [{"role": "assistant", "content": "first"},
                                           {"role": "tool", "content": "obs!"},
                                           {"role": "assistant", "content": "second"}]
        assert (sample.episode["tool_calls"], sample.episode["policy_tokens"],
                sample.episode["observation_tokens"]) == (1, len(policy_1) + len(policy_2), len(observation))
    # the second turn was asked with the whole context so far, the very ids (no re-tokenisation)
    second_contexts = asked[1][0]
    assert second_contexts[0] == tokenizer("rev abc=")["input_ids"] + policy_1 + observation
    # turn 0 uses the episode's seed, later turns seed_of(k, turn)
    assert asked[0][1] == [0, 1] and asked[1][1] == [1, 1001]


def test_batch_and_estimators_see_turn_rewards_and_masks(tokenizer):
    samples, _ = run(tokenizer, Rewarding, lambda k, _: ["first", "second"][k],
                     [{"prompt": "rev abc="}, {"prompt": "rev xy="}])
    batch = samples_batch(samples, tokenizer.pad_token_id)
    mask = batch["response_mask"]
    assert mask.tolist()[0][: len(samples[0].loss_mask)] == [float(m) for m in samples[0].loss_mask]
    assert batch["attention_mask"].sum().item() == sum(len(s.prompt_ids) + len(s.token_ids) for s in samples)
    turn = batch["turn_rewards"]
    assert turn.sum().item() == pytest.approx(2 * 1.25)
    scores, zero = torch.tensor([0.5, -0.5]), torch.zeros_like(mask)
    # sequence estimators: the episode return score + sum of turn rewards
    adv, _ = compute_advantages("rloo", scores=scores, kl_penalty=zero, response_mask=mask,
                                group_size=2, turn_rewards=turn)
    ref, _ = compute_advantages("rloo", scores=scores + 1.25, kl_penalty=zero, response_mask=mask, group_size=2)
    torch.testing.assert_close(adv, ref)
    # GAE (gamma = lam = 1, V = 0): a token's advantage is the reward still to come; the first
    # turn's reward counts for the first turn's tokens only, observation tokens get nothing
    values = torch.zeros_like(mask)
    adv, _ = compute_advantages("gae", scores=scores, kl_penalty=zero, response_mask=mask, values=values,
                                turn_rewards=turn)
    first = samples[0].loss_mask.index(0)  # the first observation token
    assert adv[0, :first].tolist() == pytest.approx([0.25 + 1.0 + 0.5] * first)
    assert adv[0, first:first + 4].abs().sum().item() == 0.0  # "obs!": 4 observation tokens
    last = len(samples[0].token_ids)
    assert adv[0, first + 4:last].tolist() == pytest.approx([1.0 + 0.5] * (last - first - 4))


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean",
                                      "seq_mean_token_sum_norm"])
def test_observation_tokens_get_no_gradient(loss_agg):
    """d loss / d logprob is exactly zero on observation tokens (mask 0), for the policy term, the KL
    term and the entropy term, while policy tokens get one; garbage there changes nothing."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 0, 0, 0, 1, 1, 0], [1, 0, 0, 1, 1, 1, 0, 0]], dtype=torch.float32)
    logprobs = (-torch.rand(2, 8, generator=gen)).requires_grad_()
    old = logprobs.detach() + 0.1 * torch.randn(2, 8, generator=gen)
    old[mask == 0] = 30.0  # what an observation position may hold: nothing meaningful
    advantages = torch.randn(2, 8, generator=gen) * 5
    ref = logprobs.detach() - 0.2
    entropy = torch.rand(2, 8, generator=gen).requires_grad_()
    loss, _, _ = policy_objective(logprobs, old, advantages, mask, ref, entropy, kl_loss_coef=0.5,
                                  entropy_coef=0.1, loss_agg=loss_agg, horizon=8.0)
    grad_lp, grad_ent = torch.autograd.grad(loss, [logprobs, entropy])
    assert grad_lp[mask == 0].abs().max().item() == 0.0
    assert grad_ent[mask == 0].abs().max().item() == 0.0
    assert grad_lp[mask == 1].abs().min().item() > 0.0


def test_demonstration_episodes_train_policy_turns_only(tokenizer):
    batch = demonstration_batch(tokenizer, ["calc 1+2="], [["call 1+2", "got 3;", "3"]])
    eos = tokenizer.eos_token_id
    expected = (tokenizer("call 1+2", add_special_tokens=False)["input_ids"] + [eos]
                + tokenizer("got 3;", add_special_tokens=False)["input_ids"]
                + tokenizer("3", add_special_tokens=False)["input_ids"] + [eos])
    width = len(expected)
    assert batch["input_ids"][0, batch.prompt_width:batch.prompt_width + width].tolist() == expected
    assert batch["response_mask"][0, :width].tolist() == [1.0] * 9 + [0.0] * 6 + [1.0] * 2
    single = demonstration_batch(tokenizer, ["rev ab="], ["ba"])  # plain completions unchanged
    assert single["response_mask"][0].tolist() == [1.0, 1.0, 1.0]


def test_turn_budget_max_turns_and_truncation(tokenizer):
    class Forever:
        def __init__(self, record):
            pass

        def step(self, conversation):
            return EnvStep(observation="more")

    limits = EpisodeLimits(max_turns=5, max_new_tokens=6, max_episode_tokens=20, tool_timeout_s=2.0)
    samples, asked = run(tokenizer, Forever, lambda k, _: "abcdefgh", [{"prompt": "p"}], limits)
    # turns of 6 tokens (cut at max_new_tokens) and observations of 4: 6 + 4 + 6 = 16, then the
    # next observation would leave no room for a policy turn: truncated after 2 turns
    assert [len(ids) for ids in (s.token_ids for s in samples)] == [16]
    assert samples[0].episode["conversation"][-1]["role"] == "assistant" and samples[0].loss_mask[-1] == 1
    assert samples[0].episode["truncated"] == 1 and len(asked) == 2
    assert asked[1][2] == [6]  # the second turn's budget
    limits = EpisodeLimits(max_turns=2, max_new_tokens=4, max_episode_tokens=100, tool_timeout_s=2.0)
    samples, asked = run(tokenizer, Forever, lambda k, _: "ab", [{"prompt": "p"}], limits)
    assert len(asked) == 2 and samples[0].episode["conversation"][-1]["role"] == "assistant"


class Flaky:
    """A calculator whose tool sleeps on "call 9+9" (timeout) and raises on bad expressions."""

    def __init__(self, record):
        if record.get("broken"):
            raise RuntimeError("cannot build")

    def step(self, conversation):
        turn = conversation[-1]["content"]
        if turn == "call 9+9":
            time.sleep(1.0)
        if turn.startswith("call "):
            return EnvStep(observation=f"got {calculator(turn[5:])};", tool_calls=1)
        return EnvStep(done=True)


def test_one_deadline_per_turn_for_every_step_and_a_stuck_environment_ends_its_episode(tokenizer):
    """20 steps that never return within the timeout cost one timeout, not twenty; their episodes
    go on with an error, and end at the next turn (their environment is still busy), and the
    threads are daemons (a stuck step cannot keep the process alive)."""
    class Stuck:
        def __init__(self, record):
            self.calls = 0

        def step(self, conversation):
            self.calls += 1
            time.sleep(5.0)
            return EnvStep(done=True)

    limits = EpisodeLimits(max_turns=3, max_new_tokens=4, max_episode_tokens=64, tool_timeout_s=0.3)
    start = time.monotonic()
    samples, asked = run(tokenizer, Stuck, lambda k, _: "a", [{"prompt": f"p{i}"} for i in range(20)], limits)
    assert time.monotonic() - start < 3.0  # 20 x 0.3 s would be 6 s, 20 x 5 s 100 s
    assert len(asked) == 2  # turn 2 was sampled (after the error), turn 3 never
    for sample in samples:
        assert sample.episode["tool_errors"] == 2  # the timeout, then "its previous step never returned"
        assert sample.episode["conversation"][1]["content"].startswith("error: timed out")
    import threading

    assert all(t.daemon for t in threading.enumerate() if t.name == "env-step")


def test_tool_errors_and_timeouts_are_observations_and_counted(tokenizer):
    script = {0: {"calc a=": "call 1+", "calc b=": "call 9+9", "calc c=": "call 2+2"}, 1: None}
    records = [{"prompt": "calc a="}, {"prompt": "calc b="}, {"prompt": "calc c="}, {"prompt": "calc d=",
                                                                                     "broken": True}]

    def policy(k, context):
        return script[0].get(context.split("call")[0].strip(), "x") if k == 0 else "5"

    limits = EpisodeLimits(max_turns=3, max_new_tokens=16, max_episode_tokens=64, tool_timeout_s=0.3)
    samples, _ = run(tokenizer, Flaky, policy, records, limits)
    bad, slow, good, broken = samples
    assert bad.episode["conversation"][1]["content"].startswith("error: ValueError: cannot compute")
    assert bad.episode["tool_errors"] == 1 and bad.episode["conversation"][-1]["content"] == "5"
    assert slow.episode["conversation"][1]["content"] == "error: timed out after 0.3 s (rollout.to"
    # its step was still sleeping when the policy's next turn came: that episode ends there
    assert slow.episode["tool_errors"] == 2 and slow.episode["conversation"][-1]["role"] == "assistant"
    assert good.episode["conversation"][1]["content"] == "got 4;" and good.episode["tool_calls"] == 1
    assert good.episode["tool_errors"] == 0
    # an environment that cannot be built for one episode ends that one after its first turn
    assert broken.episode["env_errors"] == 1 and len(broken.episode["conversation"]) == 1
    assert "RuntimeError: cannot build" in broken.episode["errors"][0]


def test_an_environment_broken_for_every_episode_stops_with_its_name(tokenizer):
    class NotAString:
        def __init__(self, record):
            pass

        def step(self, conversation):
            return EnvStep(observation=42)

    with pytest.raises(EnvironmentFailedError, match="NotAString: step returned no valid answer.*type int"):
        run(tokenizer, NotAString, lambda k, _: "x", [{"prompt": "a"}, {"prompt": "b"}])

    class CannotBuild:
        def __init__(self, record):
            raise KeyError("target")

        def step(self, conversation):
            return EnvStep(done=True)

    with pytest.raises(EnvironmentFailedError, match="CannotBuild: constructing it failed.*KeyError"):
        run(tokenizer, CannotBuild, lambda k, _: "x", [{"prompt": "a"}])

    class AlwaysRaises:  # e.g. a typo in step: every call fails, whatever the policy writes
        def __init__(self, record):
            pass

        def step(self, conversation):
            return self.missing_attribute

    with pytest.raises(EnvironmentFailedError, match="AlwaysRaises: every step of every episode.*AttributeError"):
        run(tokenizer, AlwaysRaises, lambda k, _: "x", [{"prompt": "a"}, {"prompt": "b"}])


def test_env_step_results_are_checked():
    assert as_env_step(("o", 1, False), "E") == EnvStep(observation="o", reward=1.0, done=False)
    with pytest.raises(ValueError, match="E.step returned list; expected an EnvStep"):
        as_env_step(["o"], "E")
    with pytest.raises(ValueError, match="no observation for an episode that is not done"):
        as_env_step(EnvStep(), "E")
    with pytest.raises(ValueError, match="reward 'high'; expected a number"):
        as_env_step(EnvStep(observation="o", reward="high"), "E")


def test_load_env_says_what_is_wrong(tmp_path):
    assert load_env("rlhf_dist.envs.calculator:Calculator") is Calculator
    with pytest.raises(ConfigError, match="rollout.env='nope' is not a valid spec.*'path/to/file.py:ClassName'"):
        load_env("nope")
    with pytest.raises(ConfigError, match="file not found"):
        load_env(f"{tmp_path}/missing.py:Env")
    (tmp_path / "bad.py").write_text("import not_a_module_anywhere\n")
    with pytest.raises(ConfigError, match="importing .*bad.py failed with ModuleNotFoundError"):
        load_env(f"{tmp_path}/bad.py:Env")
    (tmp_path / "envs.py").write_text("class NoStep:\n    pass\n\nthing = 3\n")
    with pytest.raises(ConfigError, match="has no attribute 'Env'.*NoStep"):
        load_env(f"{tmp_path}/envs.py:Env")
    with pytest.raises(ConfigError, match="NoStep has no step\\(conversation\\) method"):
        load_env(f"{tmp_path}/envs.py:NoStep")
    with pytest.raises(ConfigError, match="'thing' .* is a int, not a class"):
        load_env(f"{tmp_path}/envs.py:thing")


def test_every_turn_of_every_episode_has_its_own_seed():
    seeds = {sample_seed(0, "train", 3, i, j, turn) for i in range(4) for j in range(4) for turn in range(3)}
    assert len(seeds) == 48
    assert sample_seed(0, "train", 3, 1, 2, 0) == sample_seed(0, "train", 3, 1, 2)  # turn 0: single-turn's


def test_collate_rejects_a_mask_of_the_wrong_length():
    with pytest.raises(ValueError, match="row 0: loss mask of 2 for 3 response tokens"):
        collate_sequences([[5]], [[6, 7, 8]], [[0.0] * 3], 0, [[1, 0]])


def test_observations_follow_the_chat_template(tokenizer):
    from rlhf_dist.data.records import render_observation
    from rlhf_dist.models.tiny import build_char_tokenizer

    assert render_observation("got 3;", tokenizer) == "got 3;"  # no template: as is
    templated = build_char_tokenizer()
    templated.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert render_observation("got 3;", templated) == "\n<tool>got 3;\n<assistant>"
    qwen_like = build_char_tokenizer()  # the end-of-turn marker is the eos the policy samples
    qwen_like.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}" + qwen_like.eos_token
                               + "\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    assert render_observation("got 3;", qwen_like) == "\n[tool]got 3;" + qwen_like.eos_token + "\n[assistant]"
    batch = demonstration_batch(templated, ["calc 1+2="], [["call 1+2", "got 3;", "3"]])
    obs = templated("\n<tool>got 3;\n<assistant>", add_special_tokens=False)["input_ids"]
    assert batch["response_mask"][0].tolist().count(0.0) == len(obs)
