"""Name -> function registries shared by the algo modules.

Each algo module keeps its own plain dict (`ADVANTAGE_ESTIMATORS`, `POLICY_LOSSES`, ...) so the
variants are visible where they are defined; this file only holds the two helpers that register a
function under a name and look one up with an error a user can act on.
"""

from __future__ import annotations

from typing import Callable

from rlhf_dist.errors import ConfigError


def make_register(registry: dict[str, Callable], kind: str) -> Callable[[str], Callable]:
    """Return a decorator `@register(name)` that adds a function to `registry`.

    Registering the same name twice is a programming error (two variants silently shadowing each
    other), so it raises instead of overwriting.
    """

    def register(name: str) -> Callable[[Callable], Callable]:
        def decorator(fn: Callable) -> Callable:
            if name in registry:
                raise ValueError(
                    f"{kind} {name!r} is already registered (by {registry[name].__qualname__}); "
                    "pick another name."
                )
            registry[name] = fn
            return fn

        return decorator

    return register


def lookup(registry: dict[str, Callable], name: str, kind: str) -> Callable:
    """Return `registry[name]`, or raise ConfigError listing the valid names."""
    if name not in registry:
        choices = ", ".join(sorted(registry))
        raise ConfigError(
            f"Unknown {kind} {name!r}. Valid choices: {choices}. "
            "To add one, register a function with the matching decorator in rlhf_dist/algo/."
        )
    return registry[name]
