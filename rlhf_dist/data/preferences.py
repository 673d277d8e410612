"""Preference pairs (reward-model data) and demonstrations (SFT data), read and validated.

Preference records, one per line/row, in either shape:

    {"prompt": "rev abc=", "chosen": "cba", "rejected": "cbx", "margin": 1.0}   margin optional
    {"prompt": "rev abc=", "ranking": ["cba", "cbx", "xyz"], "margin_per_rank": 0.5}

A ranking lists completions best first and stands for all its ordered pairs (T-REX, Brown et
al. 2019): ranking[i] is preferred to ranking[j] for every i < j, with margin
margin_per_rank * (j - i) when given (else 0).

SFT records: {"prompt": ..., "completion": "cba"}, or {"messages": [...]} whose last message is
the assistant's answer (the prompt is the messages before it).

A prompt is a string or a list of chat messages (see `records.render_prompt`). A field that is
null counts as absent, so Parquet/CSV files can mix both shapes in one table. Files are read by
`records.read_records` (.jsonl, .json, .parquet, .csv, ...).

A bad record raises DatasetError with its "FILE:LINE" under on_bad="error"; under on_bad="skip"
it is counted in the stats and left out. A file without one usable record always raises.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

from rlhf_dist.data.records import check_messages, read_records
from rlhf_dist.errors import ConfigError, DatasetError

ON_BAD = ("error", "skip")
PAIR_EXAMPLE = '{"prompt": "rev abc=", "chosen": "cba", "rejected": "cbx"}'
RANKING_EXAMPLE = '{"prompt": "rev abc=", "ranking": ["cba", "cbx", "xyz"]}'
SFT_EXAMPLE = '{"prompt": "rev abc=", "completion": "cba"}'
MESSAGES_EXAMPLE = ('{"messages": [{"role": "user", "content": "rev abc="}, '
                    '{"role": "assistant", "content": "cba"}]}')
NUM_SKIPPED_EXAMPLES = 3


@dataclass
class PreferencePair:
    """One comparison: `chosen` is preferred to `rejected` as an answer to `prompt`."""

    prompt: str | list  # a string, or chat messages [{"role", "content"}]
    chosen: str
    rejected: str
    margin: float = 0.0  # asked-for reward gap (see algo.preference.bradley_terry_loss)
    source: str = ""  # "FILE:LINE" of the record it came from


class _BadRecord(Exception):
    """What is wrong with one record; the loader turns it into an error or a skip."""


def ranking_to_pairs(
    prompt: str | list, ranking: list[str], margin_per_rank: float | None = None,
    source: str = "",
) -> list[PreferencePair]:
    """All ordered pairs of a best-first ranking: len(ranking) * (len(ranking) - 1) / 2 pairs.

    ranking[i] beats ranking[j] for i < j, with margin margin_per_rank * (j - i) (0 if None).
    """
    pairs = []
    for better in range(len(ranking)):
        for worse in range(better + 1, len(ranking)):
            margin = 0.0 if margin_per_rank is None else margin_per_rank * (worse - better)
            pairs.append(PreferencePair(prompt, ranking[better], ranking[worse], margin, source))
    return pairs


def load_preference_pairs(
    path: str | os.PathLike, on_bad: str = "error"
) -> tuple[list[PreferencePair], dict]:
    """Pairs from a file of pair and/or ranking records (see the module docstring).

    Returns (pairs, stats) with stats {"records", "pairs", "skipped", "skipped_examples"}:
    records read, pairs made, bad records skipped and the first few skip messages.
    """
    expected = f"{PAIR_EXAMPLE} or {RANKING_EXAMPLE}"
    return _load_checked(path, on_bad, _parse_preference, expected, "pairs")


def load_sft_records(path: str | os.PathLike, on_bad: str = "error") -> tuple[list[dict], dict]:
    """Demonstrations {"prompt": str | messages, "completion": str, "source": "FILE:LINE"}.

    Returns (records, stats) with stats {"records", "examples", "skipped", "skipped_examples"}.
    """
    expected = f"{SFT_EXAMPLE} or {MESSAGES_EXAMPLE}"
    return _load_checked(path, on_bad, _parse_sft, expected, "examples")


def _load_checked(
    path: str | os.PathLike, on_bad: str, parse: Callable[[dict, str], list],
    expected: str, made: str,
) -> tuple[list, dict]:
    """Read `path`, `parse` every record, and raise or skip the bad ones as `on_bad` says."""
    if on_bad not in ON_BAD:
        raise ConfigError(f"on_bad={on_bad!r}; expected one of {list(ON_BAD)}. Fix: 'error' "
                          f"stops at the first bad record, 'skip' counts and leaves them out.")
    faults: list[str] = []  # "FILE:LINE: what is wrong"
    rows = read_records(path, skipped=faults)  # unparsable lines land in faults
    num_records = len(rows) + len(faults)
    items = []
    for record, location in rows:
        try:
            items.extend(parse(record, location))
        except _BadRecord as exc:
            faults.append(f"{location}: {exc}")
    if faults and on_bad == "error":
        raise DatasetError(f"{faults[0]}; expected {expected}; fix: correct or remove that "
                           f"record, or set on_bad=skip to leave bad records out.")
    if not items:
        first = f" First problem: {faults[0]}." if faults else ""
        raise DatasetError(
            f"{os.fspath(path)}: no usable records ({num_records} read, {len(faults)} skipped "
            f"as bad).{first} Expected records like {expected}. Fix: check the file's content."
        )
    stats = {"records": num_records, made: len(items), "skipped": len(faults),
             "skipped_examples": faults[:NUM_SKIPPED_EXAMPLES]}
    return items, stats


# --------------------------------------------------------------------------- record checks


def _present(record: dict, key: str) -> bool:
    return record.get(key) is not None


def _prompt(record: dict) -> str | list:
    prompt = record.get("prompt")
    if prompt is None:
        raise _BadRecord(f"no 'prompt' field (keys: {sorted(record)})")
    if isinstance(prompt, str):
        if not prompt:
            raise _BadRecord("'prompt' is an empty string")
        return prompt
    fault = check_messages(prompt)
    if fault is not None:
        raise _BadRecord(f"'prompt' is neither a string nor chat messages ({fault})")
    return prompt


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        given = "missing" if value is None else f"a {type(value).__name__}"
        raise _BadRecord(f"'{key}' is {given}; it must be a string")
    return value


def _number(record: dict, key: str) -> float | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _BadRecord(f"'{key}' is {value!r}; it must be a finite number")
    return float(value)


def _ranking(record: dict) -> list[str]:
    ranking = record["ranking"]
    if not isinstance(ranking, list) or not all(isinstance(text, str) for text in ranking):
        raise _BadRecord(f"'ranking' must be a list of strings, got {str(ranking)[:120]!r}")
    if len(ranking) < 2:
        raise _BadRecord(f"'ranking' has {len(ranking)} item(s); a ranking needs at least 2")
    if len(set(ranking)) != len(ranking):
        repeated = sorted({text for text in ranking if ranking.count(text) > 1})
        raise _BadRecord(f"'ranking' repeats {repeated[:3]}; every item must be different")
    return ranking


def _parse_preference(record: dict, location: str) -> list[PreferencePair]:
    prompt = _prompt(record)
    has_pair = _present(record, "chosen") or _present(record, "rejected")
    if _present(record, "ranking"):
        if has_pair:
            raise _BadRecord("has both 'ranking' and 'chosen'/'rejected'; use one shape")
        margin_per_rank = _number(record, "margin_per_rank")
        return ranking_to_pairs(prompt, _ranking(record), margin_per_rank, location)
    if not has_pair:
        raise _BadRecord(f"no 'chosen'/'rejected' or 'ranking' field (keys: {sorted(record)})")
    chosen, rejected = _text(record, "chosen"), _text(record, "rejected")
    if chosen == rejected:
        raise _BadRecord(f"'chosen' and 'rejected' are the same text {chosen[:120]!r}")
    margin = _number(record, "margin")
    return [PreferencePair(prompt, chosen, rejected, margin or 0.0, location)]


def _parse_sft(record: dict, location: str) -> list[dict]:
    if not _present(record, "messages"):
        return [{"prompt": _prompt(record), "completion": _text(record, "completion"),
                 "source": location}]
    if _present(record, "prompt") or _present(record, "completion"):
        raise _BadRecord("has both 'messages' and 'prompt'/'completion'; use one shape")
    messages = record["messages"]
    fault = check_messages(messages)
    if fault is not None:
        raise _BadRecord(f"'messages' is not a chat ({fault})")
    if messages[-1]["role"] != "assistant":
        raise _BadRecord(f"the last message is from {messages[-1]['role']!r}; it must be the "
                         f"'assistant' answer to learn")
    if len(messages) < 2:
        raise _BadRecord("'messages' holds only the assistant answer; a prompt must precede it")
    return [{"prompt": messages[:-1], "completion": messages[-1]["content"], "source": location}]
