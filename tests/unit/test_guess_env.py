"""The guessing game of `experiment=agentic` (rlhf_dist/envs/guess.py, data.tasks.GuessTask): its
answers, its reward, and the claim its learning figures rest on: a policy that ignores the answers
finds the secret in at most 40% of games (4 guesses of 0..9), while one that uses them finds all."""

import itertools

from rlhf_dist.data.tasks import episode_text, get_task, guess_reward
from rlhf_dist.envs.guess import GuessNumber, answer


def _play(secret: int, strategy, max_guesses: int = 4) -> bool:
    """One game through the environment class: `strategy(conversation)` -> the next guess."""
    env = GuessNumber({"prompt": "guess 0-9:", "target": str(secret)})
    conversation = [{"role": "user", "content": "guess 0-9:"}]
    for _ in range(max_guesses):
        conversation.append({"role": "assistant", "content": strategy(conversation)})
        step = env.step(conversation)
        if step.done:
            return guess_reward(["guess 0-9:"], [episode_text([m["content"] for m in conversation[1:]])],
                                target=[str(secret)]) == [1.0]
        conversation.append({"role": "tool", "content": step.observation})
    return False


def test_answers_and_reward_by_hand():
    assert [answer(g, "6") for g in ("2", "9", "6", " 6\n", "06", "six", "")] == \
        ["higher;", "lower;", None, None, None, "number?;", "number?;"]
    env = GuessNumber({"target": "3"})
    assert env.step([{"content": "5"}]).observation == "lower;"
    assert env.step([{"content": "5"}]).tool_calls == 1
    assert env.step([{"content": "x"}]).tool_calls == 0  # a turn that is no guess is no call
    assert env.step([{"content": "3"}]).done
    assert guess_reward([""] * 5, ["3", "5\nlower;\n3", "3\nhigher;", "5\nlower;\n4", "three"], target=["3"] * 5) \
        == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_ignoring_the_answers_finds_at_most_40_percent_and_halving_finds_all():
    # every fixed sequence of 4 guesses (what a policy that does not read the answers commits to):
    best_blind = max(sum(_play(secret, lambda conv, seq=seq: str(seq[len(conv) // 2])) for secret in range(10))
                     for seq in itertools.product(range(10), repeat=4))
    assert best_blind == 4  # of 10 secrets

    def halving(conversation):
        low, high = 0, 9
        for guess, reply in zip(conversation[1::2], conversation[2::2]):
            if reply["content"] == "higher;":
                low = int(guess["content"]) + 1
            else:
                high = int(guess["content"]) - 1
        return str((low + high) // 2)

    assert all(_play(secret, halving) for secret in range(10))


def test_demonstrations_guess_without_reading_the_answers():
    task = get_task("guess")
    records = task.make_records("train", 200, seed=0)
    for record in records:
        demo = task.demonstration(record)
        guesses, replies = demo[0::2], demo[1::2]
        assert guesses[-1] == record["target"] and len(set(guesses)) == len(guesses)
        assert replies == [answer(g, record["target"]) for g in guesses[:-1]]
        # the same game with another secret: the same guesses in the same order, up to the shorter
        other = task.demonstration({**record, "target": str((int(record["target"]) + 5) % 10)})[0::2]
        shorter = min(len(other), len(guesses))
        assert other[:shorter] == guesses[:shorter]
    first_guesses = [task.demonstration(r)[0] for r in records]
    assert len(set(first_guesses)) == 10  # no favourite opening: the warm-up shows no strategy
    lengths = [len(task.demonstration(r)[0::2]) for r in records]
    assert 4.5 < sum(lengths) / len(lengths) < 6.5  # 5.5 on average for a random order


def test_secrets_are_balanced_and_games_split_train_from_eval():
    task = get_task("guess")
    train, evals = task.make_records("train", 2000, seed=0), task.make_records("eval", 100, seed=0)
    for records in (train, evals):  # every secret equally often: the 40% bound holds on these games
        counts = [sum(r["target"] == str(v) for r in records) for v in range(10)]
        assert counts == [len(records) // 10] * 10
    assert {r["prompt"] for r in train} == {"guess 0-9:"}
    assert not {r["game"] for r in train} & {r["game"] for r in evals}


def test_the_bound_follows_the_experiment_config():
    """The 40% of docs/agentic.md and the e2e test is max_turns / (max_value + 1) of the composed
    `experiment=agentic`: if either changes, this says so."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rlhf_dist.session import conf_dir

    with initialize_config_dir(conf_dir(), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=["experiment=agentic", "trainer.run_dir=unused"]))
    task = get_task(cfg.task.name, **cfg.task.options)
    assert cfg.rollout.env == "rlhf_dist.envs.guess:GuessNumber"
    assert cfg.rollout.max_turns / (task.max_value + 1) == 0.4
    assert cfg.task.num_eval % (task.max_value + 1) == 0


def test_the_reward_pays_only_what_the_environment_calls_right():
    # a last turn "7\n5" is not a guess (the environment answers "number?;"), though its last line is
    assert guess_reward([""] * 4, ["7\n5", "3\nhigher;\n7\n5", "\u00b2", "3\nlower;\n05"], target=["5"] * 4) == \
        [0.0, 0.0, 0.0, 1.0]
    assert answer("\u00b2", "2") == "number?;"  # a digit to str.isdigit, not a number
