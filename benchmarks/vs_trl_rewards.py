"""Reward functions of benchmarks/vs_trl.py, with the signature both systems call:
`fn(prompts, completions, **fields) -> list[float]` (rlhf_dist's reward.fn and TRL's reward_funcs).

    brevity   1 - characters / 64: responses shorten over the run (natural, varying lengths)
    letter_a  share of the letter "a" in the response: a signal that fixed-length responses can learn
"""

from __future__ import annotations

MAX_CHARS = 64


def _text(completion) -> str:
    # TRL passes a conversational completion as [{"role": ..., "content": ...}]; ours a string
    return completion if isinstance(completion, str) else completion[0]["content"]


def brevity(prompts: list, completions: list, **fields) -> list[float]:
    return [max(0.0, 1.0 - len(_text(c)) / MAX_CHARS) for c in completions]


def letter_a(prompts: list, completions: list, **fields) -> list[float]:
    texts = [_text(c) for c in completions]
    return [t.count("a") / max(1, len(t)) for t in texts]
