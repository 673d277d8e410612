"""Reading record files (JSONL, JSON, Parquet, CSV, ...), rendering prompts, fitting prompt length.

Every record comes with a location string for error messages: "FILE:LINE" for line-based JSON
(JSONL, or a .json file holding JSON lines) and "FILE:row N" (1-based, header excluded) for the
others. FILE is the path as the caller gave it.

A prompt is either a string, used as is, or a chat-style list of messages
`[{"role": "user", "content": "..."}]`, rendered by the tokenizer's chat template when it has
one (see `render_prompt`).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from rlhf_dist.errors import ConfigError, DatasetError

EXAMPLE_LINE = '{"prompt": "rev abc=", "target": "cba"}'
LENGTH_POLICIES = ["truncate", "drop"]
# file suffix -> `datasets.load_dataset` builder, for the formats not read directly
DATASETS_BUILDERS = {".csv": "csv", ".tsv": "csv", ".arrow": "arrow", ".txt": "text"}
DIRECT_FORMATS = (".jsonl", ".json", ".parquet")


# --------------------------------------------------------------------------- reading


def read_records(
    path: str | os.PathLike, skipped: list[str] | None = None
) -> list[tuple[dict, str]]:
    """All records of `path`, each with its location string ("FILE:LINE" or "FILE:row N").

    Blank lines are skipped. An invalid JSON line or a row that is not an object raises
    DatasetError naming file and line; when a `skipped` list is given, its message is appended
    there instead and reading goes on (how the loaders' on_bad=skip skips unparsable lines).
    """
    file = Path(path).expanduser()
    name = os.fspath(path)
    suffix = file.suffix.lower()
    if not file.is_file():
        raise DatasetError(
            f"record file {name!r} not found (looked at {file.absolute()}). Expected a "
            f"{'/'.join(DIRECT_FORMATS + tuple(DATASETS_BUILDERS))} file, e.g. JSONL lines like "
            f"{EXAMPLE_LINE}. Fix: check the path."
        )
    if suffix == ".jsonl":
        rows = _read_json_lines(file, name)
    elif suffix == ".json":
        rows = _read_json_file(file, name)
    elif suffix == ".parquet":
        rows = _read_parquet(file, name)
    elif suffix in DATASETS_BUILDERS:
        rows = _read_with_datasets(file, name, DATASETS_BUILDERS[suffix])
    else:
        raise DatasetError(
            f"record file {name!r} has suffix {suffix or '(none)'!r}; expected one of "
            f"{list(DIRECT_FORMATS) + sorted(DATASETS_BUILDERS)}. Fix: rename the file to its "
            f"format's suffix, or convert it to JSONL."
        )
    return _keep_objects(rows, skipped)


def _keep_objects(rows: list[tuple[object, str]], skipped: list[str] | None):
    """Rows that are objects; the others raise, or go to `skipped` when it is a list.

    A message in `skipped` is "LOCATION: what is wrong", for the caller to add what it expects.
    """
    records = []
    for row, location in rows:
        if isinstance(row, _InvalidLine):
            _reject(f"{location}: {row.message}", skipped)
        elif not isinstance(row, dict):
            _reject(f"{location}: a {type(row).__name__} ({_short(row)}), not a JSON object",
                    skipped)
        else:
            records.append((row, location))
    return records


def _reject(fault: str, skipped: list[str] | None) -> None:
    if skipped is None:
        raise DatasetError(f"{fault}; expected one JSON object per record, e.g. {EXAMPLE_LINE}. "
                           f"Fix: correct or remove that record.")
    skipped.append(fault)


class _InvalidLine:
    """Placeholder row for a line that is not valid JSON."""

    def __init__(self, message: str):
        self.message = message


def _short(value: object, limit: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def _read_json_lines(file: Path, name: str) -> list[tuple[object, str]]:
    rows = []
    with file.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rows.append((json.loads(line.rstrip("\r\n")), f"{name}:{line_number}"))
            except json.JSONDecodeError as exc:
                message = f"invalid JSON ({exc.msg} at column {exc.colno}): {_short(line.strip())}"
                rows.append((_InvalidLine(message), f"{name}:{line_number}"))
    return rows


def _read_json_file(file: Path, name: str) -> list[tuple[object, str]]:
    """A .json file holds either one list of objects or JSON lines."""
    text = file.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        return _read_json_lines(file, name)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several top-level values: JSON lines that start with "["
            return _read_json_lines(file, name)
        raise DatasetError(
            f"{name}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno}); expected a "
            f"list of objects [{EXAMPLE_LINE}, ...] or one object per line. Fix: repair the file."
        ) from exc
    return [(row, f"{name}:row {index}") for index, row in enumerate(rows, start=1)]


def _read_parquet(file: Path, name: str) -> list[tuple[object, str]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(file).to_pylist()
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a broken file
        raise DatasetError(
            f"{name}: cannot read as Parquet ({type(exc).__name__}: {exc}). Expected a Parquet "
            f"file with one row per record. Fix: check the file, or convert it to JSONL."
        ) from exc
    return [(row, f"{name}:row {index}") for index, row in enumerate(rows, start=1)]


def _read_with_datasets(file: Path, name: str, builder: str) -> list[tuple[object, str]]:
    import datasets  # imported here: slow, and needed only for these formats

    options = {"delimiter": "\t"} if file.suffix.lower() == ".tsv" else {}
    try:
        dataset = datasets.load_dataset(builder, data_files=str(file), split="train", **options)
    except Exception as exc:  # datasets wraps parser errors in several exception types
        raise DatasetError(
            f"{name}: datasets.load_dataset({builder!r}) cannot read it ({type(exc).__name__}: "
            f"{exc}). Expected a {builder} file with one row per record. Fix: check the file, "
            f"or convert it to JSONL."
        ) from exc
    return [(row, f"{name}:row {index}") for index, row in enumerate(dataset.to_list(), start=1)]


# --------------------------------------------------------------------------- prompts


def check_messages(messages: object) -> str | None:
    """None if `messages` is a non-empty list of {"role": str, "content": str}, else the fault."""
    if not isinstance(messages, list) or not messages:
        return f"messages must be a non-empty list, got {_short(messages)}"
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"message {index} is a {type(message).__name__}, not an object"
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                return f"message {index} has no string {key!r}: {_short(message)}"
    return None


def render_prompt(prompt: str | list[dict], tokenizer=None) -> str:
    """The prompt text the policy sees.

    A string is returned as is. A list of messages goes through the tokenizer's chat template
    (with the generation prompt) when it has one; otherwise each message becomes a
    "role: content" line, followed by "assistant: " for the model to continue.
    """
    if isinstance(prompt, str):
        return prompt
    fault = check_messages(prompt)
    if fault is not None:
        raise DatasetError(
            f"prompt {_short(prompt)} is neither a string nor chat messages ({fault}). Expected "
            f'"rev abc=" or [{{"role": "user", "content": "rev abc="}}]. Fix: the prompt field.'
        )
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    lines = "".join(f"{message['role']}: {message['content']}\n" for message in prompt)
    return lines + "assistant: "


_CONTENT = "\x00rlhf-dist-turn\x00"  # stands for an assistant turn's content while a template is read
_warned: set[str] = set()


def render_observation(observation: str, tokenizer=None, turn_ended_with_eos: bool = True) -> str:
    """The text appended to a multi-turn episode after a policy turn (rlhf_dist.rl.episodes).

    Without a chat template: the observation as is. With one: what the template writes after an
    assistant turn's content, then around a "tool" message (a "user" one if the template refuses
    that role), up to the next assistant turn. A policy turn that ended with the end-of-sequence
    token (`turn_ended_with_eos`) already holds that token: where the template writes it after the
    content, only what follows it is added (Qwen's "<|im_end|>" + newline: the newline); a turn
    cut at rollout.max_new_tokens gets the template's whole end of turn.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return observation
    turns = [{"role": "user", "content": "u"}, {"role": "assistant", "content": _CONTENT}]
    for role in ("tool", "user"):
        try:
            before = tokenizer.apply_chat_template(turns, tokenize=False)
            after = tokenizer.apply_chat_template(turns + [{"role": role, "content": observation}],
                                                  tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a template that refuses the role: try the next
            continue
        if not after.startswith(before) or _CONTENT not in before:
            continue
        tail = before[before.rindex(_CONTENT) + len(_CONTENT):]  # the template's end of an assistant turn
        eos = tokenizer.eos_token or ""
        if turn_ended_with_eos and eos and eos in tail:
            tail = tail[tail.index(eos) + len(eos):]
        return tail + after[len(before):]
    if template not in _warned:
        _warned.add(template)
        warnings.warn("the chat template renders neither a 'tool' nor a 'user' message after an assistant "
                      "turn as an extension of the conversation; observations go in as plain text")
    return observation


def fit_prompt_length(
    records: list[dict], tokenizer, max_prompt_len: int | None, policy: str = "truncate"
) -> tuple[list[dict], int, int]:
    """Make every record's rendered prompt at most `max_prompt_len` tokens long.

    policy "truncate" keeps the last `max_prompt_len` tokens (the end of a prompt is what the
    model continues) and stores them, decoded, as the string "prompt" of a copy of the record;
    "drop" leaves such records out. Special tokens the tokenizer adds on encode (e.g. a BOS,
    `num_special_tokens_to_add`) count against the limit. `max_prompt_len=None` changes nothing.

    Returns (kept_records, num_dropped, num_truncated); the input records are not modified.
    """
    if max_prompt_len is None:
        return list(records), 0, 0
    if policy not in LENGTH_POLICIES:
        raise ConfigError(
            f"prompt length policy={policy!r}; expected one of {LENGTH_POLICIES}. Fix: "
            f"'truncate' keeps the end of long prompts, 'drop' leaves them out."
        )
    if not isinstance(max_prompt_len, int) or max_prompt_len < 1:
        raise ConfigError(
            f"max_prompt_len={max_prompt_len!r}; expected a positive integer, or None for no limit."
        )
    if tokenizer is None:
        raise ConfigError("fit_prompt_length got max_prompt_len but no tokenizer to count tokens.")
    budget = max_prompt_len - getattr(tokenizer, "num_special_tokens_to_add", lambda: 0)()
    if budget < 1:
        raise ConfigError(
            f"max_prompt_len={max_prompt_len} leaves no room for text after the tokenizer's "
            f"special tokens. Fix: raise max_prompt_len."
        )
    kept, num_dropped, num_truncated = [], 0, 0
    for record in records:
        text = render_prompt(record["prompt"], tokenizer)
        token_ids = tokenizer.encode(text, add_special_tokens=False)
        if len(token_ids) <= budget:
            kept.append(record)
        elif policy == "drop":
            num_dropped += 1
        else:
            kept.append({**record, "prompt": _keep_last_tokens(token_ids, tokenizer, budget)})
            num_truncated += 1
    return kept, num_dropped, num_truncated


def _keep_last_tokens(token_ids: list[int], tokenizer, budget: int) -> str:
    """Text of the last `budget` tokens, shortened until it re-encodes to at most `budget`."""
    keep = budget
    while True:
        text = tokenizer.decode(token_ids[len(token_ids) - keep:], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
        if keep <= 1 or len(tokenizer.encode(text, add_special_tokens=False)) <= budget:
            return text
        keep -= 1  # decoding then re-encoding merged differently at the cut: cut one more
