"""The environment contract of multi-turn rollouts (`rollout.env=my_env.py:MyEnv`).

An environment is a plain Python class; one instance runs one episode:

    class MyEnv:
        def __init__(self, record: dict):
            # record: the prompt record of this episode ({"prompt": ..., and any other fields of the
            # prompt file or the built-in task, e.g. "target"})
        def step(self, conversation: list[dict]) -> EnvStep | tuple:
            # conversation: [{"role": "user", "content": prompt},
            #                {"role": "assistant", "content": the policy's first turn},
            #                {"role": "tool", "content": your first observation}, ...,
            #                {"role": "assistant", "content": the policy's latest turn}]
            # return EnvStep(observation=..., reward=..., done=...), or the tuple
            # (observation, reward, done); observation is a str (None or "" when done)

The rollout loop (rlhf_dist.rl.episodes) calls `step` after every policy turn, with the turn's
text as decoded from the tokens the engine sampled. The observation is tokenised once and
appended to the context; the policy then writes its next turn. A turn ends where the policy
writes its end-of-sequence token (or after rollout.max_new_tokens tokens). The episode ends when
`step` says done, after rollout.max_turns policy turns, or when the next turn would not fit in
rollout.max_episode_tokens.

Rewards: `reward` is a per-turn reward, placed on the last token of the turn it answers. The
task's reward (reward.fn / reward model, as for single-turn prompts) scores the whole episode
text at the end and is added as the outcome reward. Either may be zero.

Tools: an environment runs its tools itself, inside `step`. `step` runs under
rollout.tool_timeout_s; if it raises or runs past it, the policy gets an error observation
("error: ...") and the episode goes on; both are counted (`episode/tool_errors`). Count tool calls
by returning EnvStep(tool_calls=n).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from rlhf_dist.errors import ConfigError


@dataclass
class EnvStep:
    """What an environment returns after a policy turn."""

    observation: str | None = None  # the next input to the policy (a tool's output, a user's reply)
    reward: float = 0.0  # this turn's reward
    done: bool = False  # the episode is over
    tool_calls: int = 0  # tools this turn called (metrics)
    info: dict[str, Any] = field(default_factory=dict)


def as_env_step(result: Any, env_name: str) -> EnvStep:
    """An EnvStep from what `step` returned (an EnvStep or (observation, reward, done)); ValueError
    naming the environment when it is neither, or the observation is not a string."""
    if isinstance(result, tuple) and len(result) == 3:
        result = EnvStep(observation=result[0], reward=result[1], done=bool(result[2]))
    if not isinstance(result, EnvStep):
        raise ValueError(f"{env_name}.step returned {type(result).__name__}; expected an EnvStep or "
                         "a tuple (observation, reward, done)")
    if result.observation is not None and not isinstance(result.observation, str):
        raise ValueError(f"{env_name}.step returned an observation of type "
                         f"{type(result.observation).__name__}; expected str (or None when done)")
    try:
        result.reward = float(result.reward)
    except (TypeError, ValueError):
        raise ValueError(f"{env_name}.step returned reward {result.reward!r}; expected a number") from None
    if not result.done and not result.observation:
        raise ValueError(f"{env_name}.step returned no observation for an episode that is not done")
    return result


def load_env(spec: str) -> type:
    """The environment class named by `spec`: "path/to/file.py:Class" or "package.module:Class".
    ConfigError saying what was given and expected when it does not import or lacks `step`."""
    from rlhf_dist.data.reward_fn import load_named

    cls, where = load_named(spec, "rollout.env", ConfigError, "rlhf_dist.envs.calculator:Calculator",
                            noun="ClassName")
    if not inspect.isclass(cls):
        raise ConfigError(f"rollout.env={spec!r}: {spec.rpartition(':')[2]!r} in {where} is a "
                          f"{type(cls).__name__}, not a class. Expected a class with step(conversation).")
    if not callable(getattr(cls, "step", None)):
        raise ConfigError(f"rollout.env={spec!r}: {cls.__name__} has no step(conversation) method; "
                          "the contract is in rlhf_dist/envs/base.py and the README (multi-turn rollouts).")
    return cls
