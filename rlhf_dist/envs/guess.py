"""The built-in environment of `experiment=agentic`: a guessing game for the `guess` task.

The prompt is "guess 0-9:". Each policy turn is a guess, one number; the environment answers
"higher;" or "lower;" and the policy guesses again, until it names the secret (the episode ends,
the task's reward, data.tasks:guess_reward, gives 1) or rollout.max_turns guesses are spent (0).
A turn that is not a number is answered "number?;" and costs its guess.
"""

from __future__ import annotations

import re

from rlhf_dist.envs.base import EnvStep


def answer(guess: str, secret: str) -> str | None:
    """The game's answer to `guess`: None when it is the secret, else "higher;", "lower;" or
    "number?;" for a turn that is not a number."""
    guess = guess.strip()
    if not re.fullmatch(r"[0-9]+", guess):
        return "number?;"
    if int(guess) == int(secret):
        return None
    return "higher;" if int(secret) > int(guess) else "lower;"


class GuessNumber:
    """One game: the record's "target" is the secret."""

    def __init__(self, record: dict) -> None:
        self.secret = record["target"]

    def step(self, conversation: list[dict]) -> EnvStep:
        reply = answer(conversation[-1]["content"], self.secret)
        if reply is None:
            return EnvStep(done=True, tool_calls=1)
        return EnvStep(observation=reply, tool_calls=int(reply != "number?;"))


class GuessBlind(GuessNumber):
    """The control of the game: the same episodes with the answers hidden ("again;" after every
    wrong guess), so RL can only learn the guesses' marginal distribution. Its success stays at or
    below the 40% that GuessNumber's learning must beat (benchmarks/agentic.py --blind)."""

    def step(self, conversation: list[dict]) -> EnvStep:
        result = super().step(conversation)
        if result.observation in ("higher;", "lower;"):
            result.observation = "again;"
        return result
