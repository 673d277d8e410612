"""The interface every weight transport implements, and the registry that picks one by name
(the package docstring says how the sides fit together)."""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

from rlhf_dist.errors import ConfigError, WeightSyncError


class Transport:
    """One way of moving the weights; a subclass per module, one instance registered by name."""

    name: str = ""  # set by @register_transport
    engine_options: Mapping[str, Any] = {}  # extra vllm.LLM(...) arguments an engine needs for it
    learner_verbs: Mapping[str, Callable] = {}  # verb -> fn(publisher, *args)
    engine_verbs: Mapping[str, Callable] = {}  # verb -> fn(rollout actor, *args)
    worker_verbs: Mapping[str, Callable] = {}  # verb -> fn(vLLM worker, *args)

    def check_config(self, device: str, tensor_parallel_size: int, num_engines: int,
                     learner_ranks: int = 1, zero_stage: int = 0) -> None:
        """Raise ConfigError (what was given, why it cannot work, the fix) for a layout it cannot serve."""

    def connect(self, sync: Any) -> None:
        """Links between learners and engines, built after the bucket plan and rebuilt after a
        failed sync (a process group). Default: none needed."""

    def start(self, sync: Any, verify: bool) -> tuple[list, list]:
        """Start one sync of `sync.plan`. Returns (one ref per learner rank of `sync.ranks`, whose
        first resolves to rank 0's summary {"bytes", "buckets", "publish_s"}; one ref per engine,
        each to its load result {"load_s", ...} carrying "checksums" when `verify`)."""
        raise NotImplementedError


TRANSPORTS: dict[str, Transport] = {}


def register_transport(name: str) -> Callable[[type[Transport]], type[Transport]]:
    """Class decorator: register one instance of a `Transport` subclass under `name`."""

    def decorator(cls: type[Transport]) -> type[Transport]:
        if name in TRANSPORTS:
            raise ValueError(f"weight transport {name!r} is already registered (by "
                             f"{type(TRANSPORTS[name]).__qualname__}); pick another name.")
        cls.name = name
        TRANSPORTS[name] = cls()
        return cls

    return decorator


def get_transport(name: str) -> Transport:
    if name not in TRANSPORTS:
        raise ConfigError(f"Unknown weight transport {name!r}. Valid choices: {', '.join(TRANSPORTS)}. "
                          "Fix: rollout.sync_transport=<one of those>.")
    return TRANSPORTS[name]


def transport_names() -> tuple[str, ...]:
    """Every registered transport, in registration order."""
    return tuple(TRANSPORTS)


def call_verb(transport: str, side: str, verb: str, target: Any, *args: Any) -> Any:
    """Run `transport`'s `side` ("learner", "engine" or "worker") function `verb` on `target`."""
    verbs = getattr(get_transport(transport), f"{side}_verbs")
    if verb not in verbs:
        raise WeightSyncError(f"weight transport {transport!r} has no {side}-side verb {verb!r}; "
                              f"it has {sorted(verbs)}")
    return verbs[verb](target, *args)


def with_checksums(engine: Any, result: dict[str, Any], verify: bool) -> dict[str, Any]:
    """An engine's load `result`, plus (when `verify`) its checksums, one dict per tensor-parallel
    worker, and the seconds they took."""
    if verify:
        start = time.perf_counter()
        result["checksums"] = engine.weight_checksums()
        result["verify_s"] = time.perf_counter() - start
    return result
