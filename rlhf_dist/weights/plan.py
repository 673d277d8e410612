"""Bucket plans, and the learner side that every weight transport shares.

Weights travel in buckets of whole decoder layers, so the tensors vLLM fuses (q/k/v -> qkv_proj,
gate/up -> gate_up_proj) always arrive together. The learner plans them once (`WeightPublisher.plan`):
a plan is a list of buckets of [name, shape], from which every receiver allocates and cuts what it
receives. Each sync the publisher yields the buckets, gathered under ZeRO-3 and cast to the engine
dtype, to the transport that sends them (rlhf_dist.weights.transports) and to the checksums.

Under ZeRO-3 every rank must walk the buckets together (the per-bucket gathers are collective);
below ZeRO-3 rank 0 holds full weights and is called alone. Only rank 0 sends.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterator

import torch

from rlhf_dist.weights.checksum import Piece, expected_checksums, fuse_like_engine

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

BucketPlan = list[list[list]]  # buckets of [name, shape]: what every receiver allocates

_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


def layer_key(name: str) -> str:
    """The decoder layer a parameter belongs to ('model.layers.3'), or the name itself."""
    match = _LAYER.match(name)
    return match.group(1) if match else name


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


def gathered(params: list, zero_stage: int):
    """Context in which ZeRO-3 partitioned `params` hold their full data (a no-op below ZeRO-3)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, enabled=zero_stage == 3)


def full_shape(param: torch.nn.Parameter) -> list[int]:
    """The parameter's shape, also when ZeRO-3 has partitioned it away (`ds_shape`)."""
    return list(getattr(param, "ds_shape", param.shape))


class WeightPublisher:
    """One learner rank's weights as the transports and the checksums see them."""

    def __init__(self, module: torch.nn.Module, rank: int, zero_stage: int) -> None:
        self.module, self.rank, self.zero_stage = module, rank, zero_stage
        self.params = dict(module.named_parameters())
        # what a transport keeps on this rank between syncs (a process group, vLLM's IPC sender)
        self.transport_state: dict[str, Any] = {}

    def plan(self, bucket_mb: float, dtype: str) -> BucketPlan:
        """Buckets of [name, shape] of at most `bucket_mb` (plus one layer), in module order."""
        groups: dict[str, list[tuple[str, list[int]]]] = {}
        for name, param in self.params.items():
            groups.setdefault(layer_key(name), []).append((name, full_shape(param)))
        return plan_buckets(list(groups.values()), bucket_mb, DTYPES[dtype].itemsize)

    def buckets(self, plan: BucketPlan, dtype: str | None = None):
        """Yield each bucket's [(name, tensor)], gathered for the duration of the yield under ZeRO-3.

        Without `dtype`: the parameters themselves, on every rank. With `dtype`: detached copies
        in the engine's dtype on rank 0 (the sender), and an empty list on the other ranks, which
        only join the gathers.
        """
        for bucket in plan:
            params = [(name, self.params[name]) for name, _ in bucket]
            with gathered([p for _, p in params], self.zero_stage):
                if dtype is None:
                    yield params
                else:
                    yield [(n, p.detach().to(DTYPES[dtype])) for n, p in params] if self.rank == 0 else []

    def engine_lora_config(self) -> dict[str, Any] | None:
        """The PEFT config engines serve a LoRA adapter with, when this publisher sends one (adapter
        sync, rlhf_dist.weights.adapter); None: the engines take model weights."""
        return None

    def checksums(self, plan: BucketPlan, dtype: str, packed_modules: dict[str, list[str]],
                  layouts: list[dict[str, list[Piece]]]) -> list[dict[str, list[int]]] | None:
        """What each engine worker (one layout per tensor-parallel rank) must hold (rank 0)."""
        sums: list[dict[str, list[int]]] = [{} for _ in layouts]
        for bucket in self.buckets(plan, dtype):
            fused = fuse_like_engine(dict(bucket), packed_modules)
            for rank_sums, layout in zip(sums, layouts):
                rank_sums.update(expected_checksums(fused, layout))
        return sums if self.rank == 0 else None
