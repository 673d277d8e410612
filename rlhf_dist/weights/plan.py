"""Weight publishing: a DeepSpeed rank's weights -> every rollout engine, and their checksums.

Any actor that trains a model the engines serve uses this (today the policy learner). Weights
travel in buckets of whole decoder layers (so the tensors vLLM fuses, q/k/v -> qkv_proj and
gate/up -> gate_up_proj, always arrive together), planned once (`plan`) and sent each sync by one
of two transports:

- object store (`publish`): each bucket is `ray.put`; engines fetch and load them while later
  buckets are still being gathered. Works anywhere Ray does, tensor-parallel engines excepted.
- collective (`broadcast`): each bucket is broadcast over a process group spanning the sender and
  every engine worker (rlhf_dist.weights.transports.collective): gloo on CPU, NCCL on GPU.

Under ZeRO-3 every rank must call `publish`, `broadcast` and `checksums` (the per-bucket gathers
are collective); below ZeRO-3 rank 0 holds full weights and is called alone. Only rank 0 sends.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from rlhf_dist.weights.checksum import Piece, expected_checksums, fuse_like_engine, layer_key
from rlhf_dist.weights.transports.collective import BucketPlan, WeightGroup, plan_buckets
from rlhf_dist.errors import WeightSyncError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def gathered(params: list, zero_stage: int):
    """Context in which ZeRO-3 partitioned `params` hold their full data (a no-op below ZeRO-3)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, enabled=zero_stage == 3)


def full_shape(param: torch.nn.Parameter) -> list[int]:
    """The parameter's shape, also when ZeRO-3 has partitioned it away (`ds_shape`)."""
    return list(getattr(param, "ds_shape", param.shape))


class WeightPublisher:
    def __init__(self, module: torch.nn.Module, rank: int, zero_stage: int) -> None:
        self.module, self.rank, self.zero_stage = module, rank, zero_stage
        self.params = dict(module.named_parameters())

    def plan(self, bucket_mb: float, dtype: str) -> BucketPlan:
        """Buckets of [name, shape] of at most `bucket_mb` (plus one layer), in module order."""
        groups: dict[str, list[tuple[str, list[int]]]] = {}
        for name, param in self.params.items():
            groups.setdefault(layer_key(name), []).append((name, full_shape(param)))
        return plan_buckets(list(groups.values()), bucket_mb, DTYPES[dtype].itemsize)

    def _buckets(self, plan: BucketPlan):
        """Yield each bucket's parameters, gathered for the duration of the yield under ZeRO-3."""
        for bucket in plan:
            params = [(name, self.params[name]) for name, _ in bucket]
            with gathered([p for _, p in params], self.zero_stage):
                yield params

    def publish(self, plan: BucketPlan, dtype: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """Put the current weights into the object store, one object per bucket.

        Rank 0 returns (manifest for the engines: {"first_bucket": [(name, tensor), ...], "refs":
        [ObjectRef of each further bucket]}, summary for the controller: {"bytes", "buckets",
        "publish_s"}); other ranks (None, None). The controller only ever fetches the summary.
        """
        import ray

        start, refs, first, total = time.perf_counter(), [], None, 0
        for params in self._buckets(plan):
            if self.rank != 0:
                continue
            # clone: ZeRO flattens params into one buffer, and pickling a view would ship the
            # whole buffer once per tensor (measured: 3x slower sync)
            bucket = [(name, p.detach().to(DTYPES[dtype]).cpu().clone()) for name, p in params]
            total += sum(t.numel() * t.element_size() for _, t in bucket)
            if first is None:
                first = bucket  # travels inside the manifest: one fetch fewer
            else:
                refs.append(ray.put(bucket))  # ray.put copies: the bucket is a snapshot
        if self.rank != 0:
            return None, None
        summary = {"bytes": total, "buckets": len(plan), "publish_s": time.perf_counter() - start}
        return {"first_bucket": first or [], "refs": refs}, summary

    def broadcast(self, group: WeightGroup | None, plan: BucketPlan, dtype: str, timeout_s: float) -> dict[str, Any] | None:
        """Broadcast every bucket over the weight group (rank 0), then wait for every engine's ack.

        If a broadcast fails, rank 0 stops sending but still joins the remaining ZeRO-3 gathers,
        so the other learner ranks are not left waiting in a collective; it raises at the end.
        """
        start, total, failure = time.perf_counter(), 0, None
        for index, params in enumerate(self._buckets(plan)):
            if self.rank != 0 or failure is not None:
                continue
            flat = torch.cat([p.detach().reshape(-1).to(device=group.device, dtype=DTYPES[dtype])
                              for _, p in params])
            try:
                group.broadcast(flat, f"sending bucket {index + 1}/{len(plan)}", timeout_s)
            except WeightSyncError as exc:
                failure = exc
            total += flat.numel() * flat.element_size()
        if self.rank != 0:
            return None
        if failure is not None:
            raise failure
        group.barrier("waiting for every engine to acknowledge the new weights", timeout_s)
        return {"bytes": total, "buckets": len(plan), "publish_s": time.perf_counter() - start}

    def send_ipc(self, engine_handles: list, plan: BucketPlan, dtype: str, buffer_mb: float) -> dict[str, Any]:
        """CUDA IPC transport (GPU; engines on this rank's GPU): vLLM's own IPC sender and receiver.

        vLLM's `IPCTrainerWeightTransferEngine` packs the tensors this source yields into a
        GPU buffer of `buffer_mb` (rollout.sync_bucket_mb), shares it by IPC handle and drives the engines' start / update /
        finish calls through `RayVLLMWeightSyncClient`; no byte passes through the CPU.
        """
        from vllm.distributed.weight_transfer.clients import RayVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo, IPCTrainerWeightTransferEngine

        start = time.perf_counter()
        if getattr(self, "_ipc", None) is None:
            self._ipc = IPCTrainerWeightTransferEngine.trainer_init(
                IPCTrainerInitInfo(rank=self.rank, packed=True, packed_buffer_size_bytes=int(buffer_mb * 2**20)),
                client=RayVLLMWeightSyncClient(list(engine_handles)), source=plan_source(self, plan, dtype))
        self._ipc.source.plan = plan
        self._ipc.send_weights()
        total = sum(math.prod(shape) for bucket in plan for _, shape in bucket) * DTYPES[dtype].itemsize
        return {"bytes": total, "buckets": len(plan), "publish_s": time.perf_counter() - start}

    def checksums(self, plan: BucketPlan, dtype: str, packed_modules: dict[str, list[str]],
                  layouts: list[dict[str, list[Piece]]]) -> list[dict[str, list[int]]] | None:
        """What each engine worker (one layout per tensor-parallel rank) must hold (rank 0)."""
        sums: list[dict[str, list[int]]] = [{} for _ in layouts]
        for params in self._buckets(plan):
            if self.rank != 0:
                continue
            named = {n: p.detach().to(DTYPES[dtype]) for n, p in params}
            fused = fuse_like_engine(named, packed_modules)
            for rank_sums, layout in zip(sums, layouts):
                rank_sums.update(expected_checksums(fused, layout))
        return sums if self.rank == 0 else None



def plan_source(publisher: WeightPublisher, plan: BucketPlan, dtype: str):
    """A vLLM `WeightSource` over the publisher's buckets (gathered per bucket under ZeRO-3)."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class PlanSource(WeightSource):
        def __init__(self) -> None:
            self.plan = plan

        def metadata(self) -> list:
            return [ParamMeta(name, DTYPES[dtype], tuple(shape)) for bucket in self.plan for name, shape in bucket]

        def __iter__(self):
            for params in publisher._buckets(self.plan):
                for name, param in params:
                    yield name, param.detach().to(DTYPES[dtype])

    return PlanSource()
