"""What the actors send back to the controller, typed: a sampled response (`Sample`, from a
rollout engine) and the scores of a batch (`Scores`, from the reward actor). Plain dataclasses:
Ray pickles them, readers and IDEs see the fields."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Sample:
    """One sampled response of a rollout engine (rlhf_dist.actors.rollout)."""

    token_ids: list[int]  # (T_i,) the response tokens
    logprobs: list[float]  # (T_i,) log-probability of each under the engine's sampling distribution
    text: str
    finish_reason: str | None  # "stop" (EOS or a stop string) | "length" (max_new_tokens)
    prompt_ids: list[int] = field(default_factory=list)  # (P_i,) set by the controller on arrival
    # multi-turn episodes (rollout.env, rlhf_dist.rl.episodes): token_ids hold every policy turn and
    # every observation in order, as the engine and the tokenizer produced them
    loss_mask: list[int] | None = None  # (T_i,) 1 on policy tokens, 0 on observation tokens
    turn_rewards: dict[int, float] | None = None  # {token index: reward} on a turn's last token
    episode: dict | None = None  # its conversation ([{"role", "content"}]) and counters (turns, tool calls, ...)


@dataclass
class Scores:
    """The reward actor's verdict on a batch of completions (rlhf_dist.actors.reward)."""

    reward: list[float]  # the training reward of each completion
    rule: list[float] | None  # reward.fn's score (None without a rule)
    model: list[float] | None  # the reward model's raw score (None without a model)
    failures: list = field(default_factory=list)  # samples reward.fn raised on
    report: str = ""  # their console lines ("" when none)
    metrics: dict[str, float] = field(default_factory=dict)  # {"reward/failed_samples": n}
    state: dict | None = None  # the actor's state after scoring (its normaliser), to restore a replacement
