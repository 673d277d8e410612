"""The collective weight transport: one process group spanning the learner and every engine worker.

Rank 0 is the learner's rank 0 (the sender); engine e's tensor-parallel worker t is rank
1 + e * tp + t. The group is its own torch process group, built from a TCPStore that the sender
hosts, independent of the learner's DeepSpeed group and of vLLM's own groups: gloo on CPU, NCCL on
GPU. Each bucket (whole decoder layers, the same bucketing as the object-store transport) travels
as one flat tensor in the sync dtype; every engine worker receives the full tensors and vLLM's
weight loaders cut its own shard out of them.

Deadlines: every broadcast and the closing barrier carry `timeout`, so a participant that stalls
or dies makes every other participant fail within it, with the phase in the message, instead of
leaving a rank waiting in a collective.
"""

from __future__ import annotations

import datetime
import math
from typing import Iterator

import torch

from rlhf_dist.errors import WeightSyncError

BucketPlan = list[list[list]]  # buckets of [name, shape]: what every receiver allocates


class WeightGroup:
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
            pg, device = dist.ProcessGroupNCCL(store, rank, world_size, options), torch.device("cuda")
        else:
            raise WeightSyncError(f"weight group backend {backend!r}: expected 'gloo' or 'nccl'")
        return cls(pg, rank, world_size, backend, device, store)

    def broadcast(self, tensor: torch.Tensor, phase: str, timeout_s: float) -> None:
        """Rank 0's `tensor` into every rank's `tensor`, in place, or WeightSyncError at the deadline."""
        try:
            self.pg.broadcast(tensor, 0, datetime.timedelta(seconds=timeout_s)).wait()
        except RuntimeError as exc:
            raise self._failed(phase, timeout_s, exc) from exc

    def barrier(self, phase: str, timeout_s: float) -> None:
        """Every rank confirms it got through the whole sync (an all-reduce of one element)."""
        flag = torch.ones(1, device=self.device)
        try:
            self.pg.allreduce([flag]).wait(datetime.timedelta(seconds=timeout_s))
        except RuntimeError as exc:
            raise self._failed(phase, timeout_s, exc) from exc

    def _failed(self, phase: str, timeout_s: float, exc: Exception) -> WeightSyncError:
        who = "the sender (learner rank 0)" if self.rank == 0 else f"engine worker rank {self.rank}"
        return WeightSyncError(
            f"collective weight sync failed on {who} while {phase} (deadline {timeout_s:.0f} s, "
            f"{self.world_size} ranks): {str(exc).splitlines()[0][:200]}. A participant stalled or "
            "died; every rank stops at the deadline (rollout.sync_timeout_s).")

    def close(self) -> None:
        self.pg = self._store = None


def plan_buckets(groups: list[list[tuple[str, list[int]]]], bucket_mb: float, element_size: int) -> BucketPlan:
    """Pack layer groups of (name, shape) into buckets of at most `bucket_mb` (a layer is never split)."""
    limit, plan, pending, pending_bytes = bucket_mb * 2**20, [], [], 0
    for group in groups:
        for name, shape in group:
            pending.append([name, list(shape)])
            pending_bytes += math.prod(shape) * element_size
        if pending_bytes >= limit:
            plan.append(pending)
            pending, pending_bytes = [], 0
    if pending:
        plan.append(pending)
    return plan


def unflatten_bucket(flat: torch.Tensor, bucket: list[list]) -> Iterator[tuple[str, torch.Tensor]]:
    """The (name, tensor) views of a received flat bucket, in plan order."""
    offset = 0
    for name, shape in bucket:
        numel = math.prod(shape)
        yield name, flat[offset : offset + numel].view(shape)
        offset += numel
