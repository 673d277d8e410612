"""A named group of identical Ray actors placed with one placement group.

The controller talks to actors only through `ActorGroup.run(...)`, which waits on every call
with a deadline and turns a dead actor or a timeout into a user-facing error that names it.
"""

from __future__ import annotations

from typing import Any, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_dist.runtime.files import ModelDir, ship_to
from rlhf_dist.errors import ActorDiedError, ClusterResourceError, RlhfDistError


def wait_all(refs: Sequence[ray.ObjectRef], names: Sequence[str], what: str, timeout_s: float) -> list:
    """`ray.get` with a deadline; errors name the actor and the phase."""
    try:
        return ray.get(list(refs), timeout=timeout_s)
    except GetTimeoutError:
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        stuck = [name for ref, name in zip(refs, names) if ref not in ready]
        raise RlhfDistError(
            f"{what} did not finish within {timeout_s:.0f} s; still waiting on: {', '.join(stuck)}. "
            "The actor may be stuck or far slower than expected; its log is in the Ray session "
            "directory (/tmp/ray/session_latest/logs). Raise the matching *_timeout_s if it is just slow."
        ) from None
    except RayActorError as err:
        name = _failed_name(refs, names)
        raise ActorDiedError(
            f"{name} died during {what}: {_short(err)}. The run cannot continue without it. "
            "Look for an out-of-memory kill or a crash in the Ray logs "
            "(/tmp/ray/session_latest/logs)."
        ) from None
    except RayTaskError as err:
        cause = err.cause if isinstance(err.cause, Exception) else None
        if isinstance(cause, RlhfDistError):
            raise type(cause)(f"{_failed_name(refs, names)}: {cause}") from None
        raise RlhfDistError(
            f"{_failed_name(refs, names)} raised during {what}:\n{err}"
        ) from None


def _failed_name(refs: Sequence[ray.ObjectRef], names: Sequence[str]) -> str:
    for ref, name in zip(refs, names):
        try:
            ray.get(ref, timeout=0)
        except GetTimeoutError:
            continue
        except Exception:  # noqa: BLE001 - we only look for the ref that failed
            return name
    return names[0] if len(names) == 1 else "one of " + ", ".join(names)


def bundle_node_ids(group, num: int) -> list[str]:
    """The node id of each bundle of a ready placement group."""
    from ray.util.placement_group import placement_group_table

    nodes = placement_group_table(group)["bundles_to_node_id"]
    return [nodes[i] for i in range(num)]


def placement_shortfall(num: int, bundle: dict[str, float]) -> str:
    """Per resource of the bundle: how much the group needs, the cluster has and has free."""
    total, free = ray.cluster_resources(), ray.available_resources()
    lines = [f"{key}: needs {num} x {amount:g} = {num * amount:g}, the cluster has "
             f"{total.get(key, 0.0):g} ({free.get(key, 0.0):g} free)"
             for key, amount in bundle.items() if amount]
    largest = max((_node_share(node, bundle) for node in ray.nodes() if node.get("Alive")), default=0)
    return (f"Per resource: {'; '.join(lines)}. Each actor needs {bundle} on one node; the "
            f"largest node holds {largest} such actor(s) when empty.")


def _node_share(node: dict, bundle: dict[str, float]) -> int:
    have = node.get("Resources", {})
    fits = [int(have.get(key, 0.0) // amount) for key, amount in bundle.items() if amount]
    return min(fits) if fits else 0


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


class ActorGroup:
    """`num` actors of `actor_cls`, one placement-group bundle each."""

    def __init__(
        self,
        name: str,
        actor_cls: type,
        num: int,
        num_cpus: float,
        num_gpus: float,
        placement_timeout_s: float,
        actor_kwargs: list[dict[str, Any]],
        pack: str = "PACK",
        resources: dict[str, float] | None = None,
    ) -> None:
        """`resources`: custom Ray resources per actor (cluster.*_resources), e.g. {"node_b": 1}
        to pin the group to nodes started with `--resources='{"node_b": 8}'`."""
        self.name = name
        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {}), **(resources or {})}
        self.placement_group = placement_group([dict(bundle) for _ in range(num)], strategy=pack)
        try:
            ray.get(self.placement_group.ready(), timeout=placement_timeout_s)
        except GetTimeoutError:
            remove_placement_group(self.placement_group)
            raise ClusterResourceError(
                f"The Ray cluster cannot place {num} x {name} within {placement_timeout_s:.0f} s "
                f"(cluster.placement_timeout_s). {placement_shortfall(num, bundle)} Fix: fewer "
                "actors, smaller cluster.*_per_* values, other cluster.*_resources, or a bigger "
                "cluster."
            ) from None
        self.names = [f"{name}[{i}]" for i in range(num)]
        # the node of each bundle, hence of each actor: model dirs are shipped where needed
        self.node_ids = bundle_node_ids(self.placement_group, num)
        actor_kwargs = [ship_to(kwargs, node) for kwargs, node in zip(actor_kwargs, self.node_ids)]
        self.model_copied = [any(isinstance(v, ModelDir) and v.files for v in kwargs.values())
                             for kwargs in actor_kwargs]
        self._remote_cls, self._resources = ray.remote(actor_cls), (num_cpus, num_gpus)
        self._kwargs = actor_kwargs
        self.actors = [self._create(i) for i in range(num)]
        self.restarts = 0

    def _create(self, i: int):
        num_cpus, num_gpus = self._resources
        return self._remote_cls.options(
            num_cpus=num_cpus, num_gpus=num_gpus, name=None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.placement_group, placement_group_bundle_index=i),
        ).remote(**self._kwargs[i])

    def dead(self, timeout_s: float = 30.0) -> list[int]:
        """Indices of actors that no longer answer (their process died)."""
        refs = [actor.__ray_call__.remote(lambda self: True) for actor in self.actors]
        found = []
        for i, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=timeout_s)
            except (RayActorError, GetTimeoutError):
                found.append(i)
        return found

    def restart(self, i: int) -> None:
        """Replace actor i by a new one, same arguments, same placement bundle (same node)."""
        try:
            ray.kill(self.actors[i], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.actors[i] = self._create(i)
        self.restarts += 1

    def __len__(self) -> int:
        return len(self.actors)

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """The same call on every actor (returns refs; pair with `wait`)."""
        return [getattr(actor, method).remote(*args, **kwargs) for actor in self.actors]

    def call_each(self, method: str, per_actor_args: Sequence[tuple], **kwargs: Any) -> list[ray.ObjectRef]:
        """Actor i gets `per_actor_args[i]`."""
        return [
            getattr(actor, method).remote(*args, **kwargs)
            for actor, args in zip(self.actors, per_actor_args)
        ]

    def call_on_shards(self, method: str, batch, *args: Any) -> list[ray.ObjectRef]:
        """Actor i gets the i-th contiguous shard of `batch` (a Batch), then `args`."""
        from rlhf_dist.data.batch import split_evenly

        shards = split_evenly(list(range(len(batch))), len(self.actors))
        return self.call_each(method, [(batch.select(rows), *args) for rows in shards])

    def wait(self, refs: Sequence[ray.ObjectRef], what: str, timeout_s: float) -> list:
        return wait_all(refs, self.names[: len(refs)], what, timeout_s)

    def run(self, method: str, *args: Any, timeout_s: float, **kwargs: Any) -> list:
        return self.wait(self.call(method, *args, **kwargs), f"{self.name}.{method}", timeout_s)

    def placement(self) -> list[dict[str, Any]]:
        """Where each actor runs, and whether its model dir was shipped to it through Ray:
        [{"name": "rollout[0]", "node_id": ..., "node_ip": ..., "model_copied": True}, ...]."""
        ips = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
        return [{"name": name, "node_id": node, "node_ip": ips.get(node, "?"), "model_copied": copied}
                for name, node, copied in zip(self.names, self.node_ids, self.model_copied)]

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.placement_group)


def actors_rss_mb(groups: Sequence[ActorGroup]) -> dict[str, float]:
    """Resident memory of every actor of `groups`, in MB, by actor name."""
    refs = [a.__ray_call__.remote(_rss_mb) for g in groups for a in g.actors]
    names = [n for g in groups for n in g.names]
    return dict(zip(names, wait_all(refs, names, "memory probe", 60)))


def _rss_mb(actor) -> float:
    """Run inside an actor (`__ray_call__`): its process's resident memory, children included
    (a tensor-parallel engine's worker processes)."""
    import psutil

    proc = psutil.Process()
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20
