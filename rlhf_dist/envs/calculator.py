"""The built-in environment of `experiment=agentic`: a calculator tool for the `calc` task.

A policy turn that starts with "call " is a tool call: the rest is an expression of two integers
and one of + - * ("call 347+589"), the tool answers "got 936;" and the policy writes its next
turn. Any other turn is the answer, and ends the episode; the task's reward (data.tasks:
calc_reward) scores it. A malformed call raises inside the tool: the policy sees "error: ..." and
goes on (rlhf_dist.rl.episodes counts it).
"""

from __future__ import annotations

import operator
import re

from rlhf_dist.envs.base import EnvStep

_CALL = re.compile(r"^\s*(-?\d{1,12})\s*([+*-])\s*(-?\d{1,12})\s*$")
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def calculator(expression: str) -> int:
    """The tool: "A op B" with integers A, B and op in + - *; ValueError otherwise."""
    match = _CALL.match(expression)
    if match is None:
        raise ValueError(f"cannot compute {expression!r}: expected 'A+B', 'A-B' or 'A*B'")
    left, op, right = match.groups()
    return _OPS[op](int(left), int(right))


class Calculator:
    """One episode of the calc task: tool calls answered until the policy answers."""

    def __init__(self, record: dict) -> None:
        self.record = record

    def step(self, conversation: list[dict]) -> EnvStep:
        turn = conversation[-1]["content"].strip()
        if not turn.startswith("call "):
            return EnvStep(done=True)  # the answer: scored by the task's reward
        return EnvStep(observation=f"got {calculator(turn[len('call '):])};", tool_calls=1)
