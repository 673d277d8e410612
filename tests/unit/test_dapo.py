"""DAPO's pieces without Ray: the overlong ramp by hand, which groups carry signal, the round
logic of dynamic sampling (scores given as plain lists), its config errors, the seeds of extra
rounds, and the chain task's strict checker with its reported reward terms."""

import pytest
import torch

from helpers import compose_config

from rlhf_dist.actors.reward import RewardActor
from rlhf_dist.algo import groups_with_signal, overlong_penalty
from rlhf_dist.data.messages import Sample, Scores
from rlhf_dist.data.tasks import chain_parts, chain_reward, get_task
from rlhf_dist.errors import ConfigError
from rlhf_dist.rl.dynamic_sampling import FillCounts, fill_groups
from rlhf_dist.rl.generation import GenerationBatch
from rlhf_dist.seeding import sample_seeds
from rlhf_dist.validation import validate


# --------------------------------------------------------------------------- overlong ramp


def test_overlong_penalty_by_hand():
    # max_new_tokens 20, buffer 4: 0 up to 16 tokens, then -1/4 per token, -1 at 20 (and beyond)
    lengths = torch.tensor([0, 10, 16, 17, 18, 19, 20, 25])
    assert overlong_penalty(lengths, 20, 4).tolist() == [0, 0, 0, -0.25, -0.5, -0.75, -1.0, -1.0]
    assert overlong_penalty(lengths, 20, 4, penalty=0.5).tolist() == [0, 0, 0, -0.125, -0.25, -0.375, -0.5, -0.5]
    assert overlong_penalty(lengths, 20, 0).tolist() == [0.0] * 8  # buffer 0: off
    assert overlong_penalty(torch.tensor([9, 10]), 10, 1).tolist() == [0.0, -1.0]  # a one-token ramp
    with pytest.raises(ValueError, match="buffer=20"):
        overlong_penalty(lengths, 20, 20)


def test_groups_with_signal():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.1, 0.1 + 1e-9, 0.1, 0.0, 0.0, 0.0])
    assert groups_with_signal(rewards, 3).tolist() == [False, True, False, False]
    assert groups_with_signal(rewards, 2).tolist() == [False, True, True, False, True, False]


# --------------------------------------------------------------------------- dynamic sampling rounds

G = 2


def _round(records: list[str], version: int = 0, first_prompt: int = 0) -> GenerationBatch:
    """A generated round: G samples per prompt, whose text is the prompt (the test's scorer reads it)."""
    samples = [Sample([1], [0.0], r, "stop") for r in records for _ in range(G)]
    return GenerationBatch(1, [{"prompt": r} for r in records], {"epoch": 0}, version, None, samples,
                           [{"prompt": r} for r in records for _ in range(G)], 1.0, first_prompt)


def _score(rollout: GenerationBatch) -> Scores:
    """Prompts named "s..." get rewards 0 and 1 (signal); the others 1 and 1 (none)."""
    reward = [float(k % 2) if s.text.startswith("s") else 1.0 for k, s in enumerate(rollout.samples)]
    return Scores(reward=reward, rule=reward, model=None, metrics={"reward/correct_mean": sum(reward) / len(reward),
                                                                  "reward/failed_samples": 1.0})


def test_fill_keeps_only_groups_with_signal_and_refills_from_new_prompts():
    rounds = iter([["s3", "x4", "s5"], ["s6", "s7", "s8"]])
    asked = []

    def next_round(first_prompt):
        asked.append(first_prompt)
        return _round(next(rounds), version=1, first_prompt=first_prompt)

    filled = fill_groups(_round(["x0", "s1", "x2"]), _score, next_round, G, target=4, max_rounds=3)
    kept = [s.text for s in filled.rollout.samples]
    assert kept == ["s1", "s1", "s3", "s3", "s5", "s5", "s6", "s6"]  # in order, at most target groups
    assert asked == [3, 6]  # each round's prompts numbered after the step's earlier ones (seeds)
    assert filled.rounds == 3 and filled.generated == 18
    assert [r["prompt"] for r in filled.rollout.records][:4] == ["x0", "s1", "x2", "s3"]  # every prompt drawn
    assert filled.rollout.version == 0  # the oldest round's weights
    assert filled.scores.reward == [0.0, 1.0] * 4 and filled.scores.rule == [0.0, 1.0] * 4
    metrics = filled.metrics(G)
    assert metrics["dynamic/kept_groups"] == 4 and metrics["dynamic/rounds"] == 3
    assert metrics["dynamic/samples_per_trained"] == 18 / 8
    # a mean over every generated sample, a count summed over the rounds
    assert filled.scores.metrics["reward/correct_mean"] == pytest.approx(filled.generated_reward_sum / 18)
    assert filled.scores.metrics["reward/failed_samples"] == 3.0


def test_fill_stops_after_max_rounds_with_what_it_has_or_nothing():
    def next_round(first_prompt):
        return _round(["x9", "x10", "x11"], first_prompt=first_prompt)

    short = fill_groups(_round(["s0", "x1", "x2"]), _score, next_round, G, target=3, max_rounds=2)
    assert short.rounds == 3 and [s.text for s in short.rollout.samples] == ["s0", "s0"]
    empty = fill_groups(_round(["x0", "x1", "x2"]), _score, next_round, G, target=3, max_rounds=1)
    assert empty.rounds == 2 and empty.rollout.samples == [] and empty.scores.reward == []
    assert "dynamic/samples_per_trained" not in empty.metrics(G)
    assert empty.metrics(G)["dynamic/kept_groups"] == 0
    first_only = fill_groups(_round(["x0", "s1"]), _score, next_round, G, target=2, max_rounds=0)
    assert first_only.rounds == 1 and len(first_only.rollout.samples) == G
    counts, said = FillCounts(), []
    assert counts.count(7, short, G, 3, said.append)["dynamic/short_steps"] == 1
    metrics = counts.count(8, empty, G, 3, said.append)
    assert (metrics["dynamic/short_steps"], metrics["dynamic/empty_steps"]) == (2, 1)
    assert said == ["[dynamic] step 7: 1/3 groups with signal after 3 rounds (18 samples); training on those 1",
                    "[dynamic] step 8: 0/3 groups with signal after 2 rounds (12 samples); no update"]


def test_extra_rounds_have_their_own_seeds():
    first, second = sample_seeds(0, "train", 5, 4, 8), sample_seeds(0, "train", 5, 4, 8, first_prompt=4)
    assert second == sample_seeds(0, "train", 5, 8, 8)[4:]  # prompt k of the step, whatever the round
    seeds = [s for row in first + second + sample_seeds(0, "train", 6, 8, 8) for s in row]
    assert len(set(seeds)) == len(seeds)  # no seed of another round or step reused


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides,match", [
    (["algo=reinforce_pp", "algo.dynamic_sampling=true"], "does not compare samples within a group"),
    (["algo.dynamic_sampling=true", "rollout.n_samples_per_prompt=1"], "compares samples within a group"),
    (["algo.max_resample_rounds=-1"], "must be >= 0"),
    (["algo.overlong_buffer=16"], r"must be in \[0, rollout.max_new_tokens=16\)"),
    (["algo.overlong_buffer=-1"], "must be in"),
    (["algo.overlong_penalty=-0.5"], "finite number >= 0"),
    (["experiment=agentic", "algo.mask_truncated=true"], "not on multi-turn episodes"),
    (["experiment=agentic", "algo.overlong_buffer=1"], "not on multi-turn episodes"),
    (["algo.mask_truncated=true", "rollout.ignore_eos=true"], "every one would be masked"),
])
def test_dapo_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose_config(overrides))


def test_reasoning_experiment_turns_dapo_on():
    cfg = compose_config(["experiment=reasoning"])
    validate(cfg)
    assert cfg.task.name == "chain" and cfg.algo.dynamic_sampling and cfg.algo.overlong_buffer > 0


# --------------------------------------------------------------------------- the chain task


def test_chain_checker_by_hand():
    prompts, targets = ["3+4,*2?"] * 6, ["14"] * 6
    completions = ["7,14#=14", "7,14#=15", "14", "7,14,3#=14", "#=14", "7,14#=14\njunk"]
    parts = chain_parts(prompts, completions, target=targets)
    assert parts == {"correct": [1, 0, 0, 1, 1, 1], "format": [1, 1, 0, 0, 0, 1]}
    assert chain_reward(prompts, completions, target=targets) == pytest.approx([1.0, 0.1, 0.0, 0.9, 0.9, 1.0])


def test_chain_task_prompts_and_demonstrations():
    task = get_task("chain")
    records = task.make_records("train", 500, seed=0)
    assert {len(r["prompt"].split(",")) for r in records} == {2, 3}  # 2 and 3 operations
    assert task.demonstration({"prompt": "3+4,*2,-1?", "target": "13"}) == "7,14,13#=13"
    demos = [task.demonstration(r) for r in records]
    assert chain_reward([r["prompt"] for r in records], demos, target=[r["target"] for r in records]) == [1.0] * 500
    assert max(map(len, demos)) <= 15  # inside experiment=reasoning's 16 tokens before the overlong ramp


def test_reward_actor_reports_the_terms_of_a_reward_fn_with_parts():
    actor = RewardActor("rlhf_dist.data.tasks:chain_reward")
    records = [{"prompt": "3+4,*2?", "target": "14"}] * 4
    scores = actor.score(records, ["7,14#=14", "7,14#=15", "14", "#=14"])
    assert scores.metrics["reward/correct_mean"] == 0.5 and scores.metrics["reward/format_mean"] == 0.5
    plain = RewardActor("rlhf_dist.data.tasks:add_reward").score([{"prompt": "add 1+2=", "target": "3"}], ["3"])
    assert set(plain.metrics) == {"reward/failed_samples"}
