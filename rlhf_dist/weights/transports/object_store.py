"""The object-store transport: buckets through Ray's object store (CPU and GPU; tensor_parallel_size 1).

Learner rank 0 `ray.put`s each bucket as soon as it is gathered and returns a manifest of refs.
The controller hands every engine the manifest's ref before the publish finishes, so an engine
starts fetching (each bucket with its own deadline) and streaming into vLLM's in-place loader
while later buckets are still being gathered: no controller round trip between. The engine's one
worker must live in the actor's process: generators and object refs do not reach worker processes.
"""

from __future__ import annotations

import time
from typing import Any

from rlhf_dist.errors import ConfigError, WeightSyncError
from rlhf_dist.weights.plan import BucketPlan, WeightPublisher
from rlhf_dist.weights.transports.base import Transport, register_transport, with_checksums


# ---------------------------------------------------------------------- learner side
def publish(publisher: WeightPublisher, plan: BucketPlan, dtype: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Put the current weights into the object store, one object per bucket.

    Called with num_returns=2. Rank 0 returns (manifest for the engines: {"first_bucket": [(name,
    tensor), ...], "refs": [ObjectRef of each further bucket]}, summary for the controller:
    {"bytes", "buckets", "publish_s"}); other ranks (None, None). The controller only ever
    fetches the summary.
    """
    import ray

    start, refs, first, total = time.perf_counter(), [], None, 0
    for bucket in publisher.buckets(plan, dtype):
        if publisher.rank != 0:
            continue
        # clone: ZeRO flattens params into one buffer, and pickling a view would ship the
        # whole buffer once per tensor (measured: 3x slower sync)
        bucket = [(name, tensor.cpu().clone()) for name, tensor in bucket]
        total += sum(t.numel() * t.element_size() for _, t in bucket)
        if first is None:
            first = bucket  # travels inside the manifest: one fetch fewer
        else:
            refs.append(ray.put(bucket))  # ray.put copies: the bucket is a snapshot
    if publisher.rank != 0:
        return None, None
    summary = {"bytes": total, "buckets": len(plan), "publish_s": time.perf_counter() - start}
    return {"first_bucket": first or [], "refs": refs}, summary


# ---------------------------------------------------------------------- engine side
def receive(engine, manifest_ref: list, timeout_s: float, verify: bool) -> dict[str, Any]:
    """`load` from a learner's `publish` manifest, given as [ObjectRef] (so Ray does not resolve it
    on call: the engine waits for it here, under the deadline)."""
    import ray

    try:
        manifest = ray.get(manifest_ref[0], timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise WeightSyncError(f"the learner did not publish weights within {timeout_s:.0f} s "
                              "(rollout.sync_timeout_s)") from None
    return load(engine, manifest["refs"], timeout_s, verify, manifest["first_bucket"])


def load(engine, bucket_refs: list, timeout_s: float, verify: bool = False,
         first_bucket: list | None = None) -> dict[str, Any]:
    """Stream weight buckets from the object store into the live engine, in place.

    `bucket_refs` is a list (so Ray does not resolve it on call): each bucket is fetched with its
    own deadline while vLLM consumes the previous one. With `verify` the result carries the
    engine's checksums.
    """
    import ray

    from rlhf_dist.weights.engine_weights import apply_weights

    if engine.tensor_parallel_size > 1:
        raise WeightSyncError("the object-store transport feeds one in-process worker; with "
                              "rollout.tensor_parallel_size > 1 use rollout.sync_transport=collective")
    start = time.perf_counter()
    received = {"buckets": 0, "tensors": 0, "bytes": 0}

    def buckets():
        if first_bucket:
            yield first_bucket
        for index, ref in enumerate(bucket_refs):
            try:
                yield ray.get(ref, timeout=timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise WeightSyncError(
                    f"weight bucket {index + 1}/{len(bucket_refs)} did not arrive within "
                    f"{timeout_s:.0f} s (rollout.sync_timeout_s)") from None

    def stream():
        for bucket in buckets():
            received["buckets"] += 1
            for name, tensor in bucket:
                received["tensors"] += 1
                received["bytes"] += tensor.numel() * tensor.element_size()
                yield name, tensor

    # tensor_parallel_size 1: the worker is in this process, so the generator passes by reference
    received["refresh_s"] = engine.llm.collective_rpc(apply_weights, args=(stream(),))[0]
    return with_checksums(engine, {"load_s": time.perf_counter() - start, **received}, verify)


# ---------------------------------------------------------------------- controller side
@register_transport("object_store")
class ObjectStore(Transport):
    learner_verbs = {"send": publish}
    engine_verbs = {"receive": receive, "load": load}

    def check_config(self, device: str, tensor_parallel_size: int, num_engines: int,
                     learner_ranks: int = 1, zero_stage: int = 0) -> None:
        if tensor_parallel_size > 1:
            raise ConfigError(
                f"rollout.sync_transport=object_store with rollout.tensor_parallel_size={tensor_parallel_size}: "
                "the object store feeds one in-process engine worker, and a tensor-parallel engine "
                "has one process per shard. Fix: add rollout.sync_transport=collective (every shard "
                "receives the broadcast).")

    def start(self, sync, verify: bool) -> tuple[list, list]:
        ro = sync.cfg
        pairs = [rank.weights_call.options(num_returns=2).remote(self.name, "send", sync.plan, ro.dtype)
                 for rank in sync.ranks]
        sends = [summary for _, summary in pairs]
        # engines get the manifest ref itself (in a list, so Ray does not resolve it here) and
        # start loading as soon as it resolves
        loads = sync.engines.call("weights_call", self.name, "receive", [pairs[0][0]], ro.sync_timeout_s, verify)
        return sends, loads
