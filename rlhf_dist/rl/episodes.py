"""Multi-turn episodes (`rollout.env`): the policy and an environment take turns until it is done.

Every episode of a batch advances together, one turn at a time:

    contexts = the prompts' token ids
    repeat up to rollout.max_turns:
        the engines sample the next policy turn of every live episode at once (one request each,
        its own seed per turn: rlhf_dist.seeding)
        each live episode's environment answers (`step`, under rollout.tool_timeout_s, in threads)
        the observation's tokens are appended; finished episodes drop out

Token in, token out: the response of an episode is the policy's tokens exactly as the engine
sampled them (with their logprobs), interleaved with each observation tokenised once, on its own,
and never re-tokenised with its neighbours (with a chat template, the observation goes in as the
template writes a tool message: data.records.render_observation). So the learner scores exactly the ids the engine
sampled. `loss_mask` is 1 on the policy's tokens and 0 on the observations'; a turn's reward sits
on its last token (`turn_rewards`). The episode's text (what the reward function and the samples
table see) is its turns joined by newlines.

Faults: a step that raises or runs past rollout.tool_timeout_s (a tool failing on a bad call)
gives the policy an "error: ..." observation and the episode goes on (`tool_errors`); an
environment that cannot be built for an episode, or answers with something that is not an
observation, ends that episode (`env_errors`). An environment that fails so on every episode of a
batch is broken, and stops the run (EnvironmentFailedError, naming it and the first failure).
"""

from __future__ import annotations

import concurrent.futures as futures
from dataclasses import dataclass, field
from typing import Callable

from rlhf_dist.data.messages import Sample
from rlhf_dist.data.records import render_observation
from rlhf_dist.envs.base import EnvStep, as_env_step
from rlhf_dist.errors import RlhfDistError


class EnvironmentFailedError(RlhfDistError):
    """The environment failed on every episode of a batch: a broken environment, not one episode."""


@dataclass
class EpisodeLimits:
    max_turns: int  # policy turns per episode
    max_new_tokens: int  # tokens per policy turn
    max_episode_tokens: int  # policy + observation tokens per episode
    tool_timeout_s: float  # one environment step


@dataclass
class _Episode:
    index: int  # in the batch
    record: dict
    prompt_ids: list[int]
    seed: int  # of its first turn; later turns: seed_of(turn)
    env: object | None
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    rewards: dict[int, float] = field(default_factory=dict)
    conversation: list[dict] = field(default_factory=list)
    counts: dict[str, float] = field(default_factory=lambda: {
        "turns": 0, "tool_calls": 0, "tool_errors": 0, "env_errors": 0, "truncated": 0,
        "policy_tokens": 0, "observation_tokens": 0})
    errors: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    done: bool = False

    def add(self, ids: list[int], logprobs: list[float], policy: bool) -> None:
        self.ids += ids
        self.logprobs += logprobs
        self.mask += [int(policy)] * len(ids)
        self.counts["policy_tokens" if policy else "observation_tokens"] += len(ids)

    def sample(self) -> Sample:
        text = "\n".join(turn["content"] for turn in self.conversation[1:])
        return Sample(self.ids, self.logprobs, text, self.finish_reason, list(self.prompt_ids),
                      loss_mask=self.mask, turn_rewards=dict(self.rewards),
                      episode={"conversation": self.conversation[1:], **self.counts,
                               "turn_reward_sum": sum(self.rewards.values()), "errors": self.errors[:3]})


def run_episodes(env_cls: type, records: list[dict], prompt_ids: list[list[int]], seeds: list[int],
                 seed_of: Callable[[int, int], int],
                 generate_turn: Callable[[list[list[int]], list[int], list[int]], list[Sample]],
                 tokenizer, limits: EpisodeLimits, pool: futures.ThreadPoolExecutor) -> list[Sample]:
    """One episode per record (records repeat for several samples per prompt).

    `seeds[k]`: the seed of episode k's first turn; `seed_of(k, turn)` that of a later turn.
    `generate_turn(contexts, seeds, max_tokens)`: one sampled turn per context, in order.
    """
    name = getattr(env_cls, "__name__", str(env_cls))
    episodes = []
    for index, (record, ids, seed) in enumerate(zip(records, prompt_ids, seeds)):
        env, error = _make_env(env_cls, record)
        episode = _Episode(index, record, list(ids), seed, env)
        episode.conversation.append({"role": "user", "content": record["prompt"]})
        if error:
            episode.counts["env_errors"] += 1
            episode.errors.append(f"{name}(record) for prompt {record['prompt'][:60]!r} raised {error}")
        episodes.append(episode)
    broken = [e for e in episodes if e.env is None]
    if episodes and len(broken) == len(episodes):
        raise EnvironmentFailedError(f"rollout.env {name}: constructing it failed for every episode of the "
                                     f"batch; the first: {broken[0].errors[0]}")
    for turn in range(limits.max_turns):
        live = [e for e in episodes if not e.done]
        if not live:
            break
        budgets = [min(limits.max_new_tokens, limits.max_episode_tokens - len(e.ids)) for e in live]
        for episode, budget in zip(live, budgets):
            if budget <= 0:
                episode.done, episode.counts["truncated"] = True, 1
        live = [e for e, budget in zip(live, budgets) if budget > 0]
        if not live:
            break
        outputs = generate_turn([e.prompt_ids + e.ids for e in live],
                                [e.seed if turn == 0 else seed_of(e.index, turn) for e in live],
                                [min(limits.max_new_tokens, limits.max_episode_tokens - len(e.ids)) for e in live])
        for episode, output in zip(live, outputs):
            episode.add(list(output.token_ids), list(output.logprobs), policy=True)
            episode.counts["turns"] += 1
            episode.finish_reason = output.finish_reason
            episode.conversation.append({"role": "assistant", "content": output.text})
        _answer(live, name, pool, limits, tokenizer, last_turn=turn == limits.max_turns - 1)
    stepped = [e for e in episodes if e.env is not None and e.counts["turns"] > 0]
    if stepped and all(e.counts["env_errors"] for e in stepped):
        raise EnvironmentFailedError(f"rollout.env {name}: step returned no valid answer on any episode of "
                                     f"the batch; the first: {stepped[0].errors[0]}")
    return [episode.sample() for episode in episodes]


def _make_env(env_cls: type, record: dict) -> tuple[object | None, str]:
    """(the episode's environment, "") or (None, the error) when constructing it raised."""
    try:
        return env_cls(record), ""
    except Exception as err:  # noqa: BLE001 - one episode's fault; counted by the caller
        return None, f"{type(err).__name__}: {err}"


def _answer(live: list[_Episode], name: str, pool: futures.ThreadPoolExecutor, limits: EpisodeLimits,
            tokenizer, last_turn: bool) -> None:
    """Every live episode's environment answers its policy's last turn, concurrently."""
    calls = {id(e): pool.submit(e.env.step, [dict(turn) for turn in e.conversation])
             for e in live if e.env is not None}
    for episode in live:
        if episode.env is None:  # its environment could not be built: one turn, then the end
            episode.done = True
            continue
        where = f"{name}.step (episode of prompt {episode.record['prompt'][:60]!r})"
        try:
            returned = calls[id(episode)].result(timeout=limits.tool_timeout_s)
        except futures.TimeoutError:
            result = _error_step(episode, f"timed out after {limits.tool_timeout_s:g} s (rollout.tool_timeout_s)",
                                 where)
        except Exception as err:  # noqa: BLE001 - a tool that raised: the policy sees the error
            result = _error_step(episode, f"{type(err).__name__}: {err}", where)
        else:
            try:
                result = as_env_step(returned, name)
            except ValueError as err:  # not an observation: this episode ends
                episode.counts["env_errors"] += 1
                episode.errors.append(f"{where}: {err}")
                episode.done = True
                continue
        episode.counts["tool_calls"] += result.tool_calls
        if result.reward:
            last = max(i for i, m in enumerate(episode.mask) if m)
            episode.rewards[last] = episode.rewards.get(last, 0.0) + result.reward
        if result.done or last_turn:
            episode.done = True
            continue
        ids = tokenizer(render_observation(result.observation, tokenizer), add_special_tokens=False)["input_ids"]
        if len(episode.ids) + len(ids) >= limits.max_episode_tokens:  # no room left for a policy turn
            episode.done, episode.counts["truncated"] = True, 1
            continue
        episode.add(ids, [0.0] * len(ids), policy=False)
        episode.conversation.append({"role": "tool", "content": result.observation})


def _error_step(episode: _Episode, message: str, where: str) -> EnvStep:
    """A step that raised or timed out: the policy sees the error (a bad tool call is its own)."""
    episode.counts["tool_errors"] += 1
    episode.errors.append(f"{where}: {message}")
    return EnvStep(observation=f"error: {message}"[:40])  # short: it spends the episode's token budget


class EpisodeRunner:
    """Runs `run_episodes` for the trainer's Generation: the loop in a thread of its own (so a
    batch of episodes can be launched and collected later, as single-turn generation is), the
    environments' steps in a pool beside it."""

    def __init__(self, env_cls: type, tokenizer, limits: EpisodeLimits, env_threads: int = 16) -> None:
        self.env_cls, self.tokenizer, self.limits = env_cls, tokenizer, limits
        self.pool = futures.ThreadPoolExecutor(max_workers=env_threads, thread_name_prefix="env-step")
        self.loop = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="episodes")

    def submit(self, records: list[dict], prompt_ids: list[list[int]], seeds: list[int],
               seed_of: Callable[[int, int], int], generate_turn: Callable) -> futures.Future:
        return self.loop.submit(run_episodes, self.env_cls, records, prompt_ids, seeds, seed_of,
                                generate_turn, self.tokenizer, self.limits, self.pool)

    def close(self) -> None:
        self.loop.shutdown(wait=False, cancel_futures=True)
        self.pool.shutdown(wait=False, cancel_futures=True)
