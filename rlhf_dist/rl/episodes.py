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
template writes a tool message: data.records.render_observation). So the learner scores exactly
the ids the engine sampled. `loss_mask` is 1 on the policy's tokens and 0 on the observations'; a
turn's reward sits on its last token (`turn_rewards`). The episode's text (what the reward
function and the samples table see) is its turns joined by newlines.

Faults: a step that raises or is not done within rollout.tool_timeout_s (one deadline per turn for
all episodes) gives the policy an "error: ..." observation and the episode goes on
(`tool_errors`); each step runs in a daemon thread, so one that never returns holds nothing but
its own environment, whose episode ends at its next turn. An environment that cannot be built for
an episode, or answers with something that is not an observation, ends that episode
(`env_errors`). A batch in which every episode failed so, or every step raised or timed out, means
a broken environment, not one bad episode or tool call: the run stops (EnvironmentFailedError,
naming the environment and the first failure).
"""

from __future__ import annotations

import concurrent.futures as futures
import threading
import time
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
    seed: int | None  # of its first turn; later turns: seed_of(turn); None: the engine's own generator
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
    steps: int = 0  # environment steps called
    raised: int = 0  # of which raised or timed out
    pending: object | None = None  # the last step's _Call

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
                 generate_turn: Callable[[list[list[int]], list[int | None], list[int]], list[Sample]],
                 tokenizer, limits: EpisodeLimits) -> list[Sample]:
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
        budgets = {e.index: min(limits.max_new_tokens, limits.max_episode_tokens - len(e.ids)) for e in live}
        for episode in live:
            if budgets[episode.index] <= 0:
                episode.done, episode.counts["truncated"] = True, 1
        live = [e for e in live if not e.done]
        if not live:
            break
        outputs = generate_turn([e.prompt_ids + e.ids for e in live],
                                [e.seed if turn == 0 or e.seed is None else seed_of(e.index, turn) for e in live],
                                [budgets[e.index] for e in live])
        for episode, output in zip(live, outputs):
            episode.add(list(output.token_ids), list(output.logprobs), policy=True)
            episode.counts["turns"] += 1
            episode.finish_reason = output.finish_reason
            episode.conversation.append({"role": "assistant", "content": output.text})
        _answer(live, name, limits, tokenizer, last_turn=turn == limits.max_turns - 1)
    stepped = [e for e in episodes if e.steps]
    if stepped and all(e.counts["env_errors"] for e in stepped):
        raise EnvironmentFailedError(f"rollout.env {name}: step returned no valid answer on any episode of "
                                     f"the batch; the first: {stepped[0].errors[0]}")
    if stepped and all(e.raised == e.steps for e in stepped):
        raise EnvironmentFailedError(f"rollout.env {name}: every step of every episode of the batch raised or "
                                     f"timed out (a broken environment, not a bad tool call); the first: "
                                     f"{stepped[0].errors[0]}")
    return [episode.sample() for episode in episodes]


def _make_env(env_cls: type, record: dict) -> tuple[object | None, str]:
    """(the episode's environment, "") or (None, the error) when constructing it raised."""
    try:
        return env_cls(record), ""
    except Exception as err:  # noqa: BLE001 - one episode's fault; counted by the caller
        return None, f"{type(err).__name__}: {err}"


class _Call:
    """One environment step in a daemon thread of its own: a step that never returns can neither
    hold a shared worker nor keep the process from exiting."""

    def __init__(self, env, conversation: list[dict]) -> None:
        self.result, self.error, self.done = None, None, threading.Event()
        self.thread = threading.Thread(target=self._run, args=(env, conversation), daemon=True,
                                       name="env-step")
        self.thread.start()

    def _run(self, env, conversation: list[dict]) -> None:
        try:
            self.result = env.step(conversation)
        except BaseException as err:  # noqa: BLE001 - reported to the episode, never raised here
            self.error = err
        finally:
            self.done.set()


def _answer(live: list[_Episode], name: str, limits: EpisodeLimits, tokenizer, last_turn: bool) -> None:
    """Every live episode's environment answers its policy's last turn, concurrently, all within
    one rollout.tool_timeout_s from now."""
    calls = {}
    for episode in live:
        if episode.env is None:  # its environment could not be built: one turn, then the end
            episode.done = True
        elif episode.pending is not None and not episode.pending.done.is_set():
            # its last step is still running: this environment cannot take another one
            _error_step(episode, "its previous step never returned", f"{name}.step")
            episode.done = True
        else:
            calls[episode.index] = episode.pending = _Call(episode.env, [dict(t) for t in episode.conversation])
            episode.steps += 1
    deadline = time.monotonic() + limits.tool_timeout_s
    for episode in live:
        call = calls.get(episode.index)
        if call is None:
            continue
        where = f"{name}.step (episode of prompt {episode.record['prompt'][:60]!r})"
        if not call.done.wait(max(0.0, deadline - time.monotonic())):
            result = _error_step(episode, f"timed out after {limits.tool_timeout_s:g} s (rollout.tool_timeout_s)",
                                 where)
        elif call.error is not None:  # a tool that raised: the policy sees the error
            result = _error_step(episode, f"{type(call.error).__name__}: {call.error}", where)
        else:
            try:
                result = as_env_step(call.result, name)
            except ValueError as err:  # not an observation: this episode ends
                episode.counts["env_errors"] += 1
                episode.errors.append(f"{where}: {err}")
                episode.done = True
                continue
        episode.counts["tool_calls"] += result.tool_calls
        if result.reward and 1 in episode.mask:
            last = len(episode.mask) - 1 - episode.mask[::-1].index(1)  # the turn's last token
            episode.rewards[last] = episode.rewards.get(last, 0.0) + result.reward
        if result.done or last_turn:
            episode.done = True
            continue
        text = render_observation(result.observation, tokenizer, episode.finish_reason != "length")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(episode.ids) + len(ids) >= limits.max_episode_tokens:  # no room left for a policy turn
            episode.done, episode.counts["truncated"] = True, 1
            continue
        episode.add(ids, [0.0] * len(ids), policy=False)
        episode.conversation.append({"role": "tool", "content": result.observation})


def _error_step(episode: _Episode, message: str, where: str) -> EnvStep:
    """A step that raised or timed out: the policy sees the error (a bad tool call is its own)."""
    episode.counts["tool_errors"] += 1
    episode.raised += 1
    episode.errors.append(f"{where}: {message}")
    return EnvStep(observation=f"error: {message}"[:40])  # short: it spends the episode's token budget


class EpisodeRunner:
    """Runs `run_episodes` for the trainer's Generation, in a thread of its own, so that a batch of
    episodes can be launched and collected later, as single-turn generation is."""

    def __init__(self, env_cls: type, tokenizer, limits: EpisodeLimits) -> None:
        self.env_cls, self.tokenizer, self.limits = env_cls, tokenizer, limits
        self.loop = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="episodes")

    def submit(self, records: list[dict], prompt_ids: list[list[int]], seeds: list[int | None],
               seed_of: Callable[[int, int], int], generate_turn: Callable) -> futures.Future:
        """The future of (samples, seconds the episodes took)."""
        def run() -> tuple[list[Sample], float]:
            start = time.perf_counter()
            samples = run_episodes(self.env_cls, records, prompt_ids, seeds, seed_of, generate_turn,
                                   self.tokenizer, self.limits)
            return samples, time.perf_counter() - start

        return self.loop.submit(run)

    def close(self) -> None:
        self.loop.shutdown(wait=False, cancel_futures=True)
