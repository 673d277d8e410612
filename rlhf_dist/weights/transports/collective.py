"""The collective transport: one process group spanning the learner and every engine worker.

Rank 0 is the learner's rank 0 (the sender); engine e's tensor-parallel worker t is rank
1 + e * tp + t. The group is its own torch process group, built from a TCPStore that the sender
hosts, independent of the learner's DeepSpeed group and of vLLM's own groups: gloo on CPU, NCCL on
GPU. Each bucket (rlhf_dist.weights.plan) travels as one flat tensor in the sync dtype; every
engine worker receives the full tensors straight into its own process, and vLLM's weight loaders
cut its own shard out of them. Works with any tensor_parallel_size.

Deadlines: every broadcast and the closing barrier carry `timeout`, so a participant that stalls
or dies makes every other participant fail within it, with the phase in the message, instead of
leaving a rank waiting in a collective. gloo enforces it in `wait`; on NCCL each collective is
polled on the host and the communicator aborted at the deadline (`wait_with_deadline`), its
communicator is created when the group opens (not inside the first broadcast, where NCCL would block
outside any deadline), and the group is built with TORCH_NCCL_ASYNC_ERROR_HANDLING=2, so torch's
watchdog cleans up instead of killing the process.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from typing import Any

import torch

from rlhf_dist.distributed.process_group import free_port, node_ip
from rlhf_dist.errors import WeightSyncError
from rlhf_dist.weights.plan import DTYPES, BucketPlan, WeightPublisher, unflatten_bucket
from rlhf_dist.weights.transports.base import Transport, register_transport, with_checksums

NAME = "collective"
ASYNC_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"


class WeightGroup:
    """This transport's own process group (see the module doc), with a deadline on every call."""

    def __init__(self, pg, rank: int, world_size: int, backend: str, device: torch.device, store) -> None:
        self.pg, self.rank, self.world_size = pg, rank, world_size
        self.backend, self.device, self._store = backend, device, store

    @classmethod
    def open(cls, host: str, port: int, rank: int, world_size: int, backend: str,
             timeout_s: float) -> "WeightGroup":
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - the store's own errors name neither side
            raise WeightSyncError(
                f"weight group rank {rank}/{world_size} could not reach the sender's store at "
                f"{host}:{port} within {timeout_s:.0f} s ({exc}). Every engine worker must reach "
                "the learner's rank 0 over TCP; check firewalls between nodes.") from exc
        if backend == "gloo":
            pg, device = dist.ProcessGroupGloo(store, rank, world_size, timeout), torch.device("cpu")
        elif backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            device = torch.device("cuda", torch.cuda.current_device())
            # read when the group is built: at a timeout, abort this group's communicator and keep
            # the process (the sync raises; connect() builds a new group) instead of torch's
            # default of tearing the process down. DeepSpeed's and vLLM's own groups keep theirs.
            saved = os.environ.get(ASYNC_ERROR_HANDLING)
            os.environ[ASYNC_ERROR_HANDLING] = "2"
            try:
                pg = dist.ProcessGroupNCCL(store, rank, world_size, options)
            finally:
                if saved is None:
                    os.environ.pop(ASYNC_ERROR_HANDLING, None)
                else:
                    os.environ[ASYNC_ERROR_HANDLING] = saved
        else:
            raise WeightSyncError(f"weight group backend {backend!r}: expected 'gloo' or 'nccl'")
        group = cls(pg, rank, world_size, backend, device, store)
        if backend == "nccl":
            # NCCL creates its communicator at the first collective and blocks there until every
            # member arrives, outside any deadline: create it now, while all members open the
            # group together (connect), with the deadline kept on the host
            pg.eager_connect_single_device(device)
            group.barrier("opening the weight group", timeout_s)
        return group

    def broadcast(self, tensor: torch.Tensor, phase: str, timeout_s: float) -> None:
        """Rank 0's `tensor` into every rank's `tensor`, in place, or WeightSyncError at the deadline."""
        try:
            self._finish(self.pg.broadcast(tensor, 0, datetime.timedelta(seconds=timeout_s)), timeout_s)
        except RuntimeError as exc:
            raise self._failed(phase, timeout_s, exc) from exc

    def barrier(self, phase: str, timeout_s: float) -> None:
        """Every rank confirms it got through the whole sync (an all-reduce of one element)."""
        flag = torch.ones(1, device=self.device)
        try:
            self._finish(self.pg.allreduce([flag]), timeout_s)
        except RuntimeError as exc:
            raise self._failed(phase, timeout_s, exc) from exc

    def _finish(self, work, timeout_s: float) -> None:
        """Wait for one collective, at most `timeout_s`. gloo's wait takes the deadline itself. On
        NCCL the deadline is kept here, on the host: poll until done, and past it abort the
        communicator (its kernels would hang the next use) and raise. Each bucket is thereby
        waited for before the next is queued: the deadline is per bucket, not per sync (the
        sender no longer queues buckets ahead)."""
        wait_with_deadline(work, timeout_s, self.backend == "nccl", self._abort)

    def _abort(self) -> None:
        try:
            self.pg.abort()
        except Exception:  # noqa: BLE001 - aborting a broken communicator is best effort
            pass

    def _failed(self, phase: str, timeout_s: float, exc: Exception) -> WeightSyncError:
        who = "the sender (learner rank 0)" if self.rank == 0 else f"engine worker rank {self.rank}"
        return WeightSyncError(
            f"collective weight sync failed on {who} while {phase} (deadline {timeout_s:.0f} s, "
            f"{self.world_size} ranks): {str(exc).splitlines()[0][:200]}. A participant stalled or "
            "died; every rank stops at the deadline (rollout.sync_timeout_s).")

    def close(self) -> None:
        self.pg = self._store = None


def wait_with_deadline(work, timeout_s: float, poll: bool, abort, interval_s: float = 0.002) -> None:
    """`work.wait(timeout)` where the backend honours it (gloo); else poll `is_completed` until
    `timeout_s` and then call `abort()` and raise RuntimeError (NCCL)."""
    if not poll:
        work.wait(datetime.timedelta(seconds=timeout_s))
        return
    deadline = time.monotonic() + timeout_s
    while not work.is_completed():
        if time.monotonic() > deadline:
            abort()
            raise RuntimeError(f"collective not completed within {timeout_s:.0f} s; communicator aborted")
        time.sleep(interval_s)
    work.wait()  # raises what the collective itself raised


def _replace_group(holder: dict[str, Any], group: WeightGroup) -> None:
    """Keep `group` as the one weight group of `holder`, closing the one it replaces."""
    old = holder.get(NAME)
    if old is not None:
        old.close()
    holder[NAME] = group


# ---------------------------------------------------------------------- learner side
def address(publisher: WeightPublisher) -> tuple[str, int]:
    """Where rank 0 will host the group's store."""
    return node_ip(), free_port()


def open_sender(publisher: WeightPublisher, host: str, port: int, world_size: int, backend: str,
                timeout_s: float) -> None:
    """Rank 0 joins (and hosts) the weight group as its rank 0."""
    _replace_group(publisher.transport_state, WeightGroup.open(host, port, 0, world_size, backend, timeout_s))


def broadcast(publisher: WeightPublisher, plan: BucketPlan, dtype: str, timeout_s: float) -> dict[str, Any] | None:
    """Broadcast every bucket over the weight group (rank 0), then wait for every engine's ack.

    Every rank is called under ZeRO-3. If a broadcast fails, rank 0 stops sending but still joins
    the remaining gathers, so the other learner ranks are not left waiting in a collective; it
    raises at the end.
    """
    group = publisher.transport_state.get(NAME)
    if publisher.rank == 0 and group is None:
        raise WeightSyncError("learner rank 0 never opened the weight group (collective transport)")
    start, total, failure = time.perf_counter(), 0, None
    for index, bucket in enumerate(publisher.buckets(plan, dtype)):
        if publisher.rank != 0 or failure is not None:
            continue
        flat = torch.cat([tensor.reshape(-1).to(device=group.device) for _, tensor in bucket])
        try:
            group.broadcast(flat, f"sending bucket {index + 1}/{len(plan)}", timeout_s)
        except WeightSyncError as exc:
            failure = exc
        total += flat.numel() * flat.element_size()
    if publisher.rank != 0:
        return None
    if failure is not None:
        raise failure
    group.barrier("waiting for every engine to acknowledge the new weights", timeout_s)
    return {"bytes": total, "buckets": len(plan), "publish_s": time.perf_counter() - start}


# ---------------------------------------------------------------------- engine side
def open_engine(engine, host: str, port: int, first_rank: int, world_size: int, backend: str,
                timeout_s: float) -> list[int]:
    """Every worker of this engine joins the weight group (ranks first_rank + tp rank)."""
    return engine.llm.collective_rpc("rlhf_weights_call", args=(
        NAME, "open", host, port, first_rank, world_size, backend, timeout_s))


def receive(engine, plan: BucketPlan, dtype: str, timeout_s: float, verify: bool) -> dict[str, Any]:
    """Receive one broadcast of every bucket of `plan` into every worker (while the learner sends)."""
    results = engine.llm.collective_rpc("rlhf_weights_call", args=(NAME, "receive", plan, dtype, timeout_s))
    merged = {"load_s": max(r["load_s"] for r in results), "refresh_s": max(r["refresh_s"] for r in results),
              **{k: results[0][k] for k in ("buckets", "tensors", "bytes")}}
    return with_checksums(engine, merged, verify)


# ---------------------------------------------------------------------- worker side (each TP shard)
def open_worker(worker, host: str, port: int, first_rank: int, world_size: int, backend: str,
                timeout_s: float) -> int:
    """Join the weight group as rank first_rank + tp_rank (a group opened before is closed)."""
    from vllm.distributed import get_tensor_model_parallel_rank

    rank = first_rank + get_tensor_model_parallel_rank()
    if not hasattr(worker, "_rlhf_transport_state"):
        worker._rlhf_transport_state = {}
    _replace_group(worker._rlhf_transport_state, WeightGroup.open(host, port, rank, world_size, backend, timeout_s))
    return rank


def receive_worker(worker, plan: BucketPlan, dtype: str, timeout_s: float) -> dict[str, Any]:
    """Receive every bucket of `plan` by broadcast and stream it into the engine (`apply_weights`:
    vLLM's in-place loader, or the LoRA adapter with model.lora.sync=adapter)."""
    from rlhf_dist.weights.engine_weights import apply_weights

    group = getattr(worker, "_rlhf_transport_state", {}).get(NAME)
    if group is None:
        raise WeightSyncError("this engine never joined the weight group (collective transport)")
    start, received = time.perf_counter(), {"buckets": 0, "tensors": 0, "bytes": 0}

    def stream():
        for index, bucket in enumerate(plan):
            numel = sum(math.prod(shape) for _, shape in bucket)
            flat = torch.empty(numel, dtype=DTYPES[dtype], device=group.device)
            group.broadcast(flat, f"receiving bucket {index + 1}/{len(plan)}", timeout_s)
            received["buckets"] += 1
            received["bytes"] += flat.numel() * flat.element_size()
            for name, tensor in unflatten_bucket(flat, bucket):
                received["tensors"] += 1
                yield name, tensor

    received["refresh_s"] = apply_weights(worker, stream())
    group.barrier("acknowledging the new weights", timeout_s)
    return {"load_s": time.perf_counter() - start, **received}


# ---------------------------------------------------------------------- controller side
@register_transport(NAME)
class Collective(Transport):
    learner_verbs = {"address": address, "open": open_sender, "send": broadcast}
    engine_verbs = {"open": open_engine, "receive": receive}
    worker_verbs = {"open": open_worker, "receive": receive_worker}

    def connect(self, sync) -> None:
        """(Re)build the group: learner rank 0 + every engine worker. Also the way back after a
        failed sync, which leaves the group in an unknown state."""
        from rlhf_dist.runtime.group import wait_all  # Ray: here, since GPU tests import this without it

        ro = sync.cfg
        host, port = sync.learners.run("weights_call", NAME, "address", timeout_s=60)[0]
        tp, backend = ro.tensor_parallel_size, "gloo" if sync.device == "cpu" else "nccl"
        world = 1 + len(sync.engines) * tp
        refs = [sync.learners.actors[0].weights_call.remote(NAME, "open", host, port, world, backend,
                                                           ro.sync_timeout_s)]
        refs += sync.engines.call_each("weights_call", [
            (NAME, "open", host, port, 1 + i * tp, world, backend, ro.sync_timeout_s)
            for i in range(len(sync.engines))])
        wait_all(refs, sync.learners.names[:1] + sync.engines.names, "opening the weight group",
                 ro.sync_timeout_s + 30)

    def start(self, sync, verify: bool) -> tuple[list, list]:
        ro = sync.cfg
        sends = [rank.weights_call.remote(NAME, "send", sync.plan, ro.dtype, ro.sync_timeout_s)
                 for rank in sync.ranks]
        loads = sync.engines.call("weights_call", NAME, "receive", sync.plan, ro.dtype, ro.sync_timeout_s, verify)
        return sends, loads
