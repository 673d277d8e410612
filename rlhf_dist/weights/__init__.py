"""Weight sync: a learner's weights into every rollout engine, verified, under a deadline.

    plan.py          bucket plans (whole decoder layers) and the learner side every transport
                     shares (`WeightPublisher`: gathered under ZeRO-3, cast to the engine dtype)
    checksum.py      exact checksums both sides compute the same way, per tensor-parallel shard
    merged.py        LoRA runs, merged sync: the learner yields W + (alpha/rank) B A as a full model
    adapter.py       LoRA runs, adapter sync: only A and B move; engines serve them as a vLLM adapter
    sync.py          the controller (`WeightSync`): prepare, sync, verify, engine sleep/wake
    transports/      one module per transport, its send and its receive together, by name
    vllm_worker.py   the vLLM worker extension (`WorkerExtension`) and the CPU oneDNN fixes
"""

from rlhf_dist.weights.transports import get_transport

__all__ = ["get_transport"]
