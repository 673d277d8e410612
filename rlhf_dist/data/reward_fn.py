"""Load a user reward function from a spec string and call it with checked inputs and outputs.

A reward function has the signature

    def score(prompts: list[str], completions: list[str], **fields) -> list[float]

where `fields` holds, for every record key other than "prompt", the list of that key's values
(e.g. `target=[...]`). It returns one finite real number per completion.

Specs:
    "path/to/file.py:score"      a Python file, relative to the current directory or absolute
    "package.module:score"       an importable module
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from rlhf_dist.errors import RewardFnError

SPEC_FORMAT = "'path/to/file.py:fn_name' or 'package.module:fn_name'"


def _is_file_spec(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _import_file(target: str, spec: str, option: str = "reward.fn", error: type = RewardFnError) -> ModuleType:
    path = Path(target).expanduser().absolute()
    if not path.is_file():
        raise error(
            f"{option}={spec!r}: file not found: {path} (cwd is {Path.cwd()}). Expected a "
            f"Python file defining it. Fix: give a path relative to the "
            f"directory you run from, or an absolute path."
        )
    module_name = f"rlhf_dist_user_{option.replace('.', '_')}_{path.stem}"
    import_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(import_spec)
    # Registered only while it runs (dataclasses and `from x import y` of siblings need that),
    # then removed: functions of a module missing from sys.modules pickle by value, so they
    # can be shipped to other Ray workers, which cannot import this synthetic name.
    sys.modules[module_name] = module
    sys.path.insert(0, str(path.parent))
    try:
        import_spec.loader.exec_module(module)
    except Exception as exc:
        raise error(
            f"{option}={spec!r}: importing {path} failed with {type(exc).__name__}: {exc}"
            f"{_where(exc)}. Fix: run `python {path}` to see the full error."
        ) from exc
    finally:
        sys.modules.pop(module_name, None)
        sys.path.remove(str(path.parent))
    return module


def _import_module(target: str, spec: str, option: str = "reward.fn", error: type = RewardFnError) -> ModuleType:
    try:
        return importlib.import_module(target)
    except Exception as exc:
        raise error(
            f"{option}={spec!r}: importing module {target!r} failed with "
            f"{type(exc).__name__}: {exc}{_where(exc)}. Expected an importable module "
            f"(or a path ending in .py). Fix: check the name, install the package, or run "
            f"from the directory that contains it."
        ) from exc


def _public_callables(module: ModuleType) -> list[str]:
    """Public callables defined in `module` itself (not imported into it), else all public ones."""
    public = {name: value for name, value in vars(module).items()
              if callable(value) and not name.startswith("_")}
    own = [name for name, value in public.items()
           if getattr(value, "__module__", None) == module.__name__]
    return sorted(own or public)


def load_named(spec: str, option: str, error: type, example: str, noun: str = "fn_name") -> tuple[Any, str]:
    """The object `spec` names ('file.py:name' or 'package.module:name'), and where it was found;
    `error` naming `option` when the spec is malformed, does not import or lacks the name."""
    target, sep, name = str(spec).rpartition(":")
    if not sep or not target or not name:
        raise error(
            f"{option}={spec!r} is not a valid spec. Expected {SPEC_FORMAT.replace('fn_name', noun)}. "
            f"Fix: add ':' and the name, e.g. {option}={example}."
        )
    if _is_file_spec(target):
        module = _import_file(target, spec, option, error)
        where = f"file {Path(target).expanduser().absolute()}"
    else:
        module = _import_module(target, spec, option, error)
        where = f"module {target!r}"
    if not hasattr(module, name):
        defined = _public_callables(module)
        raise error(
            f"{option}={spec!r}: {where} has no attribute {name!r}. It defines these "
            f"callables: {defined or 'none'}. Fix: use one of those after the ':'."
        )
    return getattr(module, name), where


def load_reward_fn(spec: str, option: str = "reward.fn") -> Callable:
    """Import the reward function named by `spec` (see module docstring for the format);
    `option` is the config key that gave it, for the error messages."""
    fn, where = load_named(spec, option, RewardFnError, "examples/my_rewards.py:score")
    fn_name = str(spec).rpartition(":")[2]
    if not callable(fn):
        raise RewardFnError(
            f"{option}={spec!r}: {fn_name!r} in {where} is a {type(fn).__name__}, not a "
            f"function. Expected a callable score(prompts, completions, **fields)."
        )
    return fn


def _where(exc: BaseException) -> str:
    """' (at file:line)' for the innermost frame of `exc`, or '' when there is none."""
    frames = traceback.extract_tb(exc.__traceback__)
    if isinstance(exc, SyntaxError) or not frames:
        return ""
    return f" (at {frames[-1].filename}:{frames[-1].lineno})"


def _short(value, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _call(fn: Callable, spec: str, records: list[dict], completions: list[str]) -> list[float]:
    """`fn(prompts, completions, **fields)` with its output checked; what fn raises propagates.

    `fields` maps every record key other than "prompt" to its per-record values (None where a
    record lacks the key).
    """
    if len(records) != len(completions):
        raise ValueError(f"{len(records)} records but {len(completions)} completions")
    prompts = [record["prompt"] for record in records]
    keys = dict.fromkeys(key for record in records for key in record if key != "prompt")
    fields = {key: [record.get(key) for record in records] for key in keys}
    return _validate_rewards(fn(prompts, completions, **fields), spec, len(completions))


def reward_part_means(fn: Callable, spec: str, records: list[dict], completions: list[str]) -> dict[str, float]:
    """{"reward/<name>_mean": ...} for a reward function that reports its terms: one with a
    `parts` attribute, parts(prompts, completions, **fields) -> {name: one float per completion}
    (e.g. rlhf_dist.data.tasks.chain_reward's correct and format terms); {} for any other."""
    parts_fn = getattr(fn, "parts", None)
    if parts_fn is None or not completions:
        return {}
    prompts = [record["prompt"] for record in records]
    keys = dict.fromkeys(key for record in records for key in record if key != "prompt")
    parts = parts_fn(prompts, completions, **{key: [r.get(key) for r in records] for key in keys})
    if not isinstance(parts, dict) or any(len(values) != len(completions) for values in parts.values()):
        raise RewardFnError(f"reward.fn={spec!r}: its parts() returned {_short(parts)}; expected a dict "
                            f"of {len(completions)} floats per name, e.g. {{'correct': [...], 'format': [...]}}.")
    return {f"reward/{name}_mean": sum(values) / len(values) for name, values in parts.items()}


def check_reward_fn(fn: Callable, spec: str, records: list[dict],
                    completions: list[str]) -> list[float]:
    """Call `fn(prompts, completions, **fields)` and return its rewards as a list of floats.

    Raises RewardFnError if `fn` raises or returns anything but len(completions) finite real
    numbers. Used on every batch, so it only does O(B) work.
    """
    try:
        return _call(fn, spec, records, completions)
    except RewardFnError:
        raise
    except Exception as exc:
        fields = sorted({key for record in records for key in record if key != "prompt"})
        sample = (f" First sample: prompt={_short(records[0]['prompt'])}, "
                  f"completion={_short(completions[0])}." if records else "")
        raise RewardFnError(
            f"reward.fn={spec!r} raised {_first_line(exc)}.{sample} "
            f"It was called as fn(prompts, completions, **fields) with fields "
            f"{fields}. Fix the function so it handles these inputs."
        ) from exc


def score_samples(fn: Callable, spec: str, records: list[dict],
                  completions: list[str]) -> tuple[list[float | None], list[dict[str, Any]]]:
    """`check_reward_fn` that survives samples on which `fn` raises.

    The whole batch in one call first; if that raises, one sample per call, to find the ones
    that raise (an unparsable answer, a judge that timed out) so that they alone lose their
    score. Returns (rewards with None where fn raised, one failure per such sample:
    {"index", "prompt", "completion", "error"}, texts truncated). A wrong return value is a
    RewardFnError as in check_reward_fn, and so is fn raising on every sample: that is a bug in
    fn, not in the data.
    """
    try:
        return _call(fn, spec, records, completions), []
    except RewardFnError:
        raise
    except Exception:  # noqa: BLE001 - any error of the user's function: look per sample
        pass
    rewards: list[float | None] = []
    failures = []
    for index, (record, completion) in enumerate(zip(records, completions)):
        try:
            rewards += _call(fn, spec, [record], [completion])
        except RewardFnError:
            raise
        except Exception as exc:  # noqa: BLE001
            rewards.append(None)
            failures.append({"index": index, "prompt": _short(record["prompt"], 160),
                             "completion": _short(completion, 160), "error": _first_line(exc)})
    if failures and len(failures) == len(completions):
        first = failures[0]
        raise RewardFnError(
            f"reward.fn={spec!r} raised on every one of the {len(completions)} samples of a batch, "
            f"also when called on one sample at a time, so it cannot score anything: a bug in the "
            f"function. First: {first['error']}; prompt={first['prompt']}, completion="
            f"{first['completion']}. Fix: call the function on that prompt and completion to see "
            f"the full traceback.")
    return rewards, failures


def format_failures(failures: list[dict[str, Any]], spec: str, total: int,
                    fallback: float | None, limit: int = 10) -> str:
    """The console report of the samples reward.fn raised on (one line each, at most `limit`)."""
    then = (f"they get reward.fallback_score={fallback:g}" if fallback is not None
            else "reward.fallback_score=null: the step is skipped")
    lines = [f"[reward] reward.fn={spec!r} raised on {len(failures)} of {total} samples; {then}:"]
    lines += [f"  sample {f['index']}: {f['error']} | prompt {f['prompt']} | completion {f['completion']}"
              for f in failures[:limit]]
    if len(failures) > limit:
        lines.append(f"  ... and {len(failures) - limit} more")
    return "\n".join(lines)


def _first_line(exc: BaseException) -> str:
    """'ValueError: its message\'s first line (at file:line)'."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}{_where(exc)}"


def _validate_rewards(rewards, spec: str, num: int) -> list[float]:
    expected = f"Expected a list of {num} finite real numbers, one per completion."
    if hasattr(rewards, "tolist") and not isinstance(rewards, (list, tuple)):
        rewards = rewards.tolist()  # numpy arrays and torch tensors
    if not isinstance(rewards, (list, tuple)):
        raise RewardFnError(
            f"reward.fn={spec!r} returned a {type(rewards).__name__}: {_short(rewards)}. "
            f"{expected}"
        )
    if len(rewards) != num:
        raise RewardFnError(
            f"reward.fn={spec!r} returned {len(rewards)} values for {num} completions: "
            f"{_short(rewards)}. {expected}"
        )
    for index, value in enumerate(rewards):
        if not isinstance(value, numbers.Real) or not math.isfinite(value):  # bools pass as 0/1
            raise RewardFnError(
                f"reward.fn={spec!r} returned {_short(value)} ({type(value).__name__}) at "
                f"index {index}. {expected}"
            )
    return [float(value) for value in rewards]
