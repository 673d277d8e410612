"""The CUDA IPC transport (GPU; one engine, one shard, on the learner's GPU): vLLM's own sender and
receiver, no byte through the CPU.

The engine is built with vLLM's IPC weight-transfer engine (`engine_options`). Each learner rank
(every rank under ZeRO-3) runs vLLM's `IPCTrainerWeightTransferEngine` over the bucket plan: it
packs the tensors into a GPU buffer of rollout.sync_bucket_mb (or the largest tensor, if larger),
shares it by IPC handle and drives
the engine's start / update / finish calls itself through `RayVLLMWeightSyncClient`, which calls
`RolloutActor.init_weight_transfer_engine`, `start_weight_update`, `update_weights` and
`finish_weight_update` by name. The engine's own verb only reports (and verifies) the result.
"""

from __future__ import annotations

import math
import time
from typing import Any

from rlhf_dist.errors import ConfigError
from rlhf_dist.weights.plan import DTYPES, BucketPlan, WeightPublisher
from rlhf_dist.weights.transports.base import Transport, register_transport, with_checksums

NAME = "ipc"


# ---------------------------------------------------------------------- learner side
def send(publisher: WeightPublisher, engine_handles: list, plan: BucketPlan, dtype: str,
         buffer_mb: float) -> dict[str, Any]:
    """Send the weights to the engines (actor handles on this rank's GPU) through vLLM's IPC
    engine, created on the first sync and kept on the publisher."""
    from vllm.distributed.weight_transfer.clients import RayVLLMWeightSyncClient
    from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo, IPCTrainerWeightTransferEngine

    start = time.perf_counter()
    handles = list(engine_handles)
    cached = publisher.transport_state.get(NAME)
    # a replaced engine (engine recovery) never saw init_weight_transfer_engine: a new sender for it
    sender = cached[1] if cached is not None and cached[0] == handles else None
    if sender is None:
        sender = IPCTrainerWeightTransferEngine.trainer_init(
            IPCTrainerInitInfo(rank=publisher.rank, packed=True,
                               packed_buffer_size_bytes=buffer_bytes(plan, dtype, buffer_mb)),
            client=RayVLLMWeightSyncClient(handles), source=plan_source(publisher, plan, dtype))
        publisher.transport_state[NAME] = (handles, sender)
    sender.source.plan = plan
    try:
        sender.send_weights()
    except BaseException:
        # vLLM starts the update before sending and does not end it on an error: the engine would
        # keep layers on the meta device and refuse to generate. End it (layers not received keep
        # their old weights; a half-received one is garbage, and the error ends the run or the
        # next sync replaces it) and start the next sync with a new sender.
        publisher.transport_state.pop(NAME, None)
        if publisher.rank == 0:
            try:
                sender.client.finish_weight_update()
            except Exception:  # noqa: BLE001 - the send's own error is the one to report
                pass
        raise
    total = sum(math.prod(shape) for bucket in plan for _, shape in bucket) * DTYPES[dtype].itemsize
    return {"bytes": total, "buckets": len(plan), "publish_s": time.perf_counter() - start}


def buffer_bytes(plan: BucketPlan, dtype: str, buffer_mb: float) -> int:
    """vLLM's packed IPC buffer: rollout.sync_bucket_mb, or the largest single tensor of the plan if
    that is larger (vLLM refuses a tensor bigger than its buffer; a 0.5B model's embedding alone is
    272 MB in bf16)."""
    largest = max((math.prod(shape) for bucket in plan for _, shape in bucket), default=0)
    return max(int(buffer_mb * 2**20), largest * DTYPES[dtype].itemsize)


def plan_source(publisher: WeightPublisher, plan: BucketPlan, dtype: str):
    """A vLLM `WeightSource` over the publisher's buckets (gathered per bucket under ZeRO-3)."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class PlanSource(WeightSource):
        def __init__(self) -> None:
            self.plan = plan

        def metadata(self) -> list:
            return [ParamMeta(name, DTYPES[dtype], tuple(shape)) for bucket in self.plan for name, shape in bucket]

        def __iter__(self):
            for params in publisher.buckets(self.plan):
                for name, param in params:
                    yield name, param.detach().to(DTYPES[dtype])

    return PlanSource()


# ---------------------------------------------------------------------- engine side
def loaded(engine, verify: bool) -> dict[str, Any]:
    """After the learner drove the load: the checksums, if asked."""
    return with_checksums(engine, {"load_s": 0.0}, verify)


# ---------------------------------------------------------------------- controller side
@register_transport(NAME)
class Ipc(Transport):
    engine_options = {"weight_transfer_config": {"backend": "ipc"}}  # vLLM's CUDA-IPC receiver
    learner_verbs = {"send": send}
    engine_verbs = {"receive": loaded}

    def check_config(self, device: str, tensor_parallel_size: int, num_engines: int,
                     learner_ranks: int = 1, zero_stage: int = 0) -> None:
        if device == "cpu":
            raise ConfigError(
                "rollout.sync_transport=ipc hands CUDA memory from the learner to an engine on the same "
                "GPU, and cluster.device=cpu has none. Options that work on CPU: "
                "rollout.sync_transport=collective (gloo broadcast) or object_store.")
        if tensor_parallel_size > 1 or num_engines > 1:
            raise ConfigError(
                f"rollout.sync_transport=ipc needs one engine with one shard on the learner's GPU; got "
                f"rollout.num_engines={num_engines}, rollout.tensor_parallel_size={tensor_parallel_size}. "
                "Fix: rollout.sync_transport=collective (NCCL) for several engines or shards.")
        if learner_ranks > 1 and zero_stage != 3:
            # vLLM's sender gathers IPC handles over the ranks' default group (all_gather_object,
            # barrier): every rank must take part, and below ZeRO-3 only rank 0 is called
            raise ConfigError(
                f"rollout.sync_transport=ipc with learner.world_size={learner_ranks} and "
                f"learner.zero_stage={zero_stage}: vLLM's IPC sender needs every learner rank in each "
                "sync, and below ZeRO-3 only rank 0 sends, so the others would never join. Fix: "
                "learner.world_size=1 (one GPU, cluster=gpu1), or learner.zero_stage=3.")

    def start(self, sync, verify: bool) -> tuple[list, list]:
        ro = sync.cfg
        # the learner drives the engines itself, so the engines' verb only follows the send
        sends = [rank.weights_call.remote(NAME, "send", sync.engines.actors, sync.plan, ro.dtype, ro.sync_bucket_mb)
                 for rank in sync.ranks]
        sync.learners.wait(sends, "weight sync (CUDA IPC)", ro.sync_timeout_s)
        return sends, sync.engines.call("weights_call", NAME, "receive", verify)
