"""Reward actor: scores (prompt, completion) pairs.

Today's scorer is a user/verifier function named in config (`reward.fn`). A learned
Bradley-Terry reward model is a second scorer with the same `score` method, so the controller
does not change when it arrives.
"""

from __future__ import annotations

from typing import Any

from rlhf_dist.data.reward_fn import check_reward_fn, load_reward_fn


class FunctionScorer:
    """`fn(prompts, completions, **fields) -> list[float]`, validated on every call."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.fn = load_reward_fn(spec)

    def score(self, records: list[dict[str, Any]], completions: list[str]) -> list[float]:
        return check_reward_fn(self.fn, self.spec, records, completions)


class RewardActor:
    def __init__(self, fn_spec: str) -> None:
        self.scorer = FunctionScorer(fn_spec)

    def ready(self) -> bool:
        return True

    def score(self, records: list[dict[str, Any]], completions: list[str]) -> list[float]:
        """One float per completion; `records[i]` is the prompt record completion i answers."""
        return self.scorer.score(records, completions)
