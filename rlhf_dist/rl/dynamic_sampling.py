"""algo.dynamic_sampling (DAPO, Yu et al. 2025, section 3.2): keep only groups with signal.

A GRPO group whose rewards are all equal (every sample right, or every one wrong) has advantage 0
on every token: it costs a forward and backward pass and moves nothing. So rewards are scored as
soon as a round of generation is back, such groups are dropped, and further rounds of fresh
prompts are generated until the step holds `target` groups with signal or `max_rounds` extra rounds
are spent. The reference logprobs, values and the update then run on the kept groups only.

Each round draws `trainer.prompts_per_step` prompts from the same sampler (a resumed run draws
the same ones) and numbers them after the step's earlier rounds, so every sample of every round
has its own random stream (rlhf_dist.seeding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rlhf_dist.algo import groups_with_signal
from rlhf_dist.data.messages import Scores
from rlhf_dist.rl.generation import GenerationBatch


@dataclass
class FillResult:
    """What the rounds left for the step: the kept samples and their (task) rewards."""

    rollout: GenerationBatch  # samples of the kept groups; records = every prompt the step drew
    scores: Scores  # the kept samples' scores, in the same order
    rounds: int  # generation rounds run (1 = the first only)
    generated: int  # samples generated over all rounds
    generated_reward_sum: float  # their rewards' sum (the kept ones are a biased selection)

    def metrics(self, group_size: int) -> dict[str, float]:
        kept = len(self.rollout.samples)
        metrics = {"dynamic/kept_groups": float(kept // group_size), "dynamic/rounds": float(self.rounds),
                   "dynamic/generated_samples": float(self.generated),
                   "dynamic/generated_reward_mean": self.generated_reward_sum / self.generated}
        if kept:
            metrics["dynamic/samples_per_trained"] = self.generated / kept
        return metrics


class FillCounts:
    """Over the run (a checkpoint keeps them): steps left short of groups with signal after the
    last round, and steps with none at all (no update)."""

    def __init__(self) -> None:
        self.short_steps = self.empty_steps = 0

    def count(self, step: int, filled: FillResult, group_size: int, target: int,
              say: Callable[[str], None]) -> dict[str, float]:
        """The step's dynamic/* metrics; a short or empty step is counted and said (`say`)."""
        kept = len(filled.rollout.samples) // group_size
        if kept < target:
            self.short_steps += 1
            self.empty_steps += kept == 0
            say(f"[dynamic] step {step}: {kept}/{target} groups with signal after {filled.rounds} rounds "
                f"({filled.generated} samples); " + (f"training on those {kept}" if kept else "no update"))
        return {**filled.metrics(group_size), "dynamic/short_steps": float(self.short_steps),
                "dynamic/empty_steps": float(self.empty_steps)}

    def state_dict(self) -> dict[str, int]:
        return {"short_steps": self.short_steps, "empty_steps": self.empty_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.short_steps, self.empty_steps = int(state.get("short_steps", 0)), int(state.get("empty_steps", 0))


def fill_groups(first: GenerationBatch, score: Callable[[GenerationBatch], Scores],
                next_round: Callable[[int], GenerationBatch], group_size: int, target: int,
                max_rounds: int) -> FillResult:
    """Score `first`, keep its groups with signal, and while fewer than `target` are kept and
    fewer than `max_rounds` extra rounds ran, generate another round (`next_round(first_prompt)`,
    numbered after the prompts drawn so far) and do the same. Keeps at most `target` groups, in
    the order they came. `score(rollout)` returns the rewards of `rollout.samples`."""
    rollout, rounds, generated, reward_sum = first, 0, 0, 0.0
    samples, sample_records, parts, drawn = [], [], [], []
    versions, engine_s = [], 0.0
    while True:
        scores = score(rollout)
        rounds, generated = rounds + 1, generated + len(rollout.samples)
        reward_sum += sum(scores.reward)
        drawn += rollout.records
        versions.append(rollout.version)
        engine_s += rollout.engine_s
        signal = groups_with_signal(torch.tensor(scores.reward), group_size)  # (prompts,)
        room = target - len(samples) // group_size
        rows = [g * group_size + j for g in signal.nonzero().flatten().tolist()[:room] for j in range(group_size)]
        samples += [rollout.samples[r] for r in rows]
        sample_records += [rollout.sample_records[r] for r in rows]
        parts.append((scores, rows))
        if len(samples) == target * group_size or rounds > max_rounds:
            break
        rollout = next_round(len(drawn))
    kept = GenerationBatch(first.step, drawn, first.sampler_state, min(versions), None, samples,
                           sample_records, engine_s)
    return FillResult(kept, concat_scores(parts), rounds, generated, reward_sum)


def concat_scores(parts: list[tuple[Scores, list[int]]]) -> Scores:
    """The rows `rows` of each round's Scores, one after the other. Metrics that are means are
    averaged over the rounds' samples, counts summed."""

    def pick(values: list | None, rows: list[int]) -> list:
        return [values[r] for r in rows] if values is not None else []

    first = parts[0][0]
    total = sum(len(s.reward) for s, _ in parts)
    metrics: dict[str, float] = {}
    for scores, _ in parts:
        for key, value in scores.metrics.items():
            weight = len(scores.reward) / total if key.endswith("_mean") else 1.0
            metrics[key] = metrics.get(key, 0.0) + weight * value
    states = [s.state for s, _ in parts if s.state is not None]
    return Scores(reward=[v for s, rows in parts for v in pick(s.reward, rows)],
                  rule=[v for s, rows in parts for v in pick(s.rule, rows)] if first.rule is not None else None,
                  model=[v for s, rows in parts for v in pick(s.model, rows)] if first.model is not None else None,
                  failures=[f for s, _ in parts for f in s.failures],
                  report="\n".join(s.report for s, _ in parts if s.report),
                  metrics=metrics, state=states[-1] if states else None)
