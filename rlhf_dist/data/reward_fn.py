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
from typing import Callable

from rlhf_dist.errors import RewardFnError

SPEC_FORMAT = "'path/to/file.py:fn_name' or 'package.module:fn_name'"


def _is_file_spec(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _import_file(target: str, spec: str) -> ModuleType:
    path = Path(target).expanduser().absolute()
    if not path.is_file():
        raise RewardFnError(
            f"reward.fn={spec!r}: file not found: {path} (cwd is {Path.cwd()}). Expected a "
            f"Python file defining the reward function. Fix: give a path relative to the "
            f"directory you run from, or an absolute path."
        )
    module_name = f"rlhf_dist_user_reward_{path.stem}"
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
        raise RewardFnError(
            f"reward.fn={spec!r}: importing {path} failed with {type(exc).__name__}: {exc}"
            f"{_where(exc)}. Fix: run `python {path}` to see the full error."
        ) from exc
    finally:
        sys.modules.pop(module_name, None)
        sys.path.remove(str(path.parent))
    return module


def _import_module(target: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(target)
    except Exception as exc:
        raise RewardFnError(
            f"reward.fn={spec!r}: importing module {target!r} failed with "
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


def load_reward_fn(spec: str) -> Callable:
    """Import the reward function named by `spec` (see module docstring for the format)."""
    target, sep, fn_name = str(spec).rpartition(":")
    if not sep or not target or not fn_name:
        raise RewardFnError(
            f"reward.fn={spec!r} is not a valid spec. Expected {SPEC_FORMAT}. "
            f"Fix: add ':' and the function name, e.g. reward.fn=examples/my_rewards.py:score."
        )
    if _is_file_spec(target):
        module = _import_file(target, spec)
        where = f"file {Path(target).expanduser().absolute()}"
    else:
        module = _import_module(target, spec)
        where = f"module {target!r}"
    if not hasattr(module, fn_name):
        defined = _public_callables(module)
        raise RewardFnError(
            f"reward.fn={spec!r}: {where} has no attribute {fn_name!r}. It defines these "
            f"callables: {defined or 'none'}. Fix: use one of those after the ':'."
        )
    fn = getattr(module, fn_name)
    if not callable(fn):
        raise RewardFnError(
            f"reward.fn={spec!r}: {fn_name!r} in {where} is a {type(fn).__name__}, not a "
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


def check_reward_fn(fn: Callable, spec: str, records: list[dict],
                    completions: list[str]) -> list[float]:
    """Call `fn(prompts, completions, **fields)` and return its rewards as a list of floats.

    `fields` maps every record key other than "prompt" to its per-record values (None where a
    record lacks the key). Raises RewardFnError if `fn` raises or returns anything but
    len(completions) finite real numbers. Used on every batch, so it only does O(B) work.
    """
    if len(records) != len(completions):
        raise ValueError(f"{len(records)} records but {len(completions)} completions")
    prompts = [record["prompt"] for record in records]
    keys = dict.fromkeys(key for record in records for key in record if key != "prompt")
    fields = {key: [record.get(key) for record in records] for key in keys}
    try:
        rewards = fn(prompts, completions, **fields)
    except Exception as exc:
        sample = (f" First sample: prompt={_short(prompts[0])}, "
                  f"completion={_short(completions[0])}." if prompts else "")
        raise RewardFnError(
            f"reward.fn={spec!r} raised {type(exc).__name__}: {exc}{_where(exc)}.{sample} "
            f"It was called as fn(prompts, completions, **fields) with fields "
            f"{sorted(fields)}. Fix the function so it handles these inputs."
        ) from exc
    return _validate_rewards(rewards, spec, len(completions))


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
