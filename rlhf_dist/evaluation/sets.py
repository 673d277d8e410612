"""The eval sets of a run: `eval.sets={name: {file, reward_fn, n, temperature, solved_threshold}}`.

The task's own held-out split is always the set `held_out` (task.eval_file, or the built-in task's
eval split), scored with the run's reward; its greedy pass is what eval/reward_mean and
eval/solved_frac report. `eval.sets` adds sets (a prompt file each, optionally a reward function of
their own) or tunes held_out (`eval.sets={held_out: {n: 16}}`). Fields a set leaves out come from
eval.n, eval.temperature (null = rollout.temperature) and eval.solved_threshold.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from rlhf_dist.errors import ConfigError

DEFAULT_SET = "held_out"
SET_KEYS = ("file", "reward_fn", "n", "temperature", "solved_threshold")
_RESERVED = ("episode",)  # eval/episode/... are the multi-turn counters


@dataclass(frozen=True)
class EvalSetSpec:
    """One set as configured, every field resolved."""

    name: str
    file: str | None  # prompt records; None = the task's held-out split (held_out only)
    reward_fn: str | None  # "file.py:fn" / "module:fn"; None = the run's reward (reward.fn and/or model)
    n: int  # sampled responses per prompt for mean@n and pass@k; 0 = greedy only
    temperature: float  # of the sampled pass
    solved_threshold: float  # a response is solved when its rule (gold) score is >= this


@dataclass
class EvalSet:
    """A set with its prompt records loaded (session.prepare)."""

    spec: EvalSetSpec
    records: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def stream(self) -> str:
        """Its own family of random streams (rlhf_dist.seeding)."""
        return f"eval:{self.spec.name}"


def eval_set_specs(eval_cfg: Any, rollout_temperature: float) -> list[EvalSetSpec]:
    """held_out first, then the configured sets in their order; ConfigError naming the set for a
    malformed entry (values are range-checked in rlhf_dist.validation)."""
    sets = eval_cfg.sets if eval_cfg.sets is not None else {}
    if not isinstance(sets, Mapping):
        raise ConfigError(f"eval.sets={sets!r} is a {type(sets).__name__}; expected a mapping "
                          "{name: {file, reward_fn, n, temperature, solved_threshold}}. Fix: e.g. "
                          "eval.sets={math: {file: math_eval.jsonl, reward_fn: rewards.py:exact}}.")
    entries = {DEFAULT_SET: {}, **{str(name): entry for name, entry in sets.items()}}
    return [_spec(name, entry, eval_cfg, rollout_temperature) for name, entry in entries.items()]


def _spec(name: str, entry: Any, eval_cfg: Any, rollout_temperature: float) -> EvalSetSpec:
    where = f"eval.sets.{name}"
    if not name or "/" in name or ":" in name or name in _RESERVED:
        raise ConfigError(f"eval set name {name!r}: names become metric keys (eval/<set>/pass@k), so "
                          f"they must be non-empty, without '/' or ':', and not {list(_RESERVED)}. "
                          "Fix: rename the set.")
    entry = {} if entry is None else entry
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}={entry!r}: expected a mapping with keys {list(SET_KEYS)}, "
                          f"e.g. eval.sets={{{name}: {{file: prompts.jsonl}}}}.")
    for key in entry:
        if key not in SET_KEYS:
            close = difflib.get_close_matches(str(key), SET_KEYS, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}.{key}: unknown key.{hint} An eval set has the keys {list(SET_KEYS)}.")
    file = entry.get("file")
    if name == DEFAULT_SET and file is not None:
        raise ConfigError(f"{where}.file={file!r}: the set {DEFAULT_SET} is the task's held-out split. "
                          f"Fix: task.eval_file={file} to change its prompts, or give this set another name.")
    if name != DEFAULT_SET and not file:
        raise ConfigError(f"{where} has no file: an added eval set needs prompt records. Fix: "
                          f"eval.sets={{{name}: {{file: path/to/prompts.jsonl}}}}.")
    temperature = entry.get("temperature", eval_cfg.temperature)
    return EvalSetSpec(
        name=name, file=None if file is None else str(file), reward_fn=entry.get("reward_fn"),
        n=_number(entry.get("n", eval_cfg.n), f"{where}.n", int),
        temperature=_number(rollout_temperature if temperature is None else temperature,
                            f"{where}.temperature", float),
        solved_threshold=_number(entry.get("solved_threshold", eval_cfg.solved_threshold),
                                 f"{where}.solved_threshold", float))


def _number(value: Any, key: str, kind: type) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (kind is int and value != int(value)):
        raise ConfigError(f"{key}={value!r}: expected a finite {'whole ' if kind is int else ''}number.")
    return kind(value)
