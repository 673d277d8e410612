"""Weight transports: how a learner's weights reach the rollout engines. One module each, picked by
name (`rollout.sync_transport`).

A transport keeps all of its sides in its own module, behind the `Transport` interface:

- controller (`connect`, `start`): runs in the driver inside `WeightSync` (rlhf_dist.weights.sync);
  it starts the learners' send and the engines' receive and returns their refs, never weight data;
- learner (`learner_verbs`): functions of one learner rank's `WeightPublisher`, reached through
  `LearnerActor.weights_call(transport, verb, *args)`;
- engine (`engine_verbs`): functions of one `RolloutActor`, reached through
  `RolloutActor.weights_call(transport, verb, *args)`;
- worker (`worker_verbs`): functions of one vLLM worker (one per tensor-parallel shard, maybe in its
  own process), reached through `llm.collective_rpc("rlhf_weights_call", args=(transport, verb, ...))`
  (rlhf_dist.weights.vllm_worker.WorkerExtension).

Adding a transport: a module here whose `Transport` subclass is decorated
`@register_transport("<name>")`, and its import at the bottom of this file. Config validation
accepts every registered name.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Mapping

from rlhf_dist.errors import ConfigError, WeightSyncError

if TYPE_CHECKING:
    from rlhf_dist.weights.sync import WeightSync


class Transport:
    """One way of moving the weights; a subclass per module, one instance registered by name."""

    name: str = ""  # set by @register_transport
    engine_options: Mapping[str, Any] = {}  # extra vllm.LLM(...) arguments an engine needs for it
    learner_verbs: Mapping[str, Callable] = {}  # verb -> fn(publisher, *args)
    engine_verbs: Mapping[str, Callable] = {}  # verb -> fn(rollout actor, *args)
    worker_verbs: Mapping[str, Callable] = {}  # verb -> fn(vLLM worker, *args)

    def check_config(self, device: str, tensor_parallel_size: int, num_engines: int) -> None:
        """Raise ConfigError (what was given, why it cannot work, the fix) for a layout it cannot serve."""

    def connect(self, sync: "WeightSync") -> None:
        """Links between learners and engines, built after the bucket plan and rebuilt after a
        failed sync (a process group). Default: none needed."""

    def start(self, sync: "WeightSync", verify: bool) -> tuple[list, list]:
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


# registration (this order is the order of the names in messages)
from rlhf_dist.weights.transports import object_store, collective, ipc  # noqa: E402,F401,I001
