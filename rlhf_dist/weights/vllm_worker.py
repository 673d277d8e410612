"""What rlhf_dist adds to every vLLM worker process (`worker_extension_cls`), and the CPU oneDNN fixes.

A rollout engine with `tensor_parallel_size > 1` runs its workers in their own processes, where
only `collective_rpc("<method name>", args=...)` reaches them: no generators, no object refs, and
tensors in arguments do not survive the trip. So everything a worker does for weight sync is a
method that vLLM mixes into its worker class:

- `rlhf_weights_call(transport, verb, *args)`: a transport's worker side
  (rlhf_dist.weights.transports; the collective transport joins its group and receives there);
- `rlhf_weight_layout` / `rlhf_weight_checksums`: which rows of the learner's tensors this
  worker's shard holds, and their checksums, so verification compares shard with slice;
- `rlhf_packed_modules`: the model's fusion map (qkv_proj <- q/k/v), for the learner's checksums;
- `rlhf_lora_setup`: adapter sync (model.lora.sync=adapter, rlhf_dist.weights.adapter): later
  weights are installed as the LoRA adapter, and the checksums are those of its slots.

Importing this module on CPU also keeps vLLM's linear weights (engine_weights.keep_cpu_linear_weights):
vLLM imports the extension before it loads the model, in every worker process.
"""

from __future__ import annotations

from typing import Any

from rlhf_dist.weights import adapter
from rlhf_dist.weights.checksum import Piece, held_checksums
from rlhf_dist.weights.engine_weights import keep_cpu_linear_weights, shard_layout
from rlhf_dist.weights.transports import call_verb


class WorkerExtension:
    """Mixed into vLLM's worker class; `self` is the worker (self.model_runner, self.device)."""

    def rlhf_tp_rank(self) -> int:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()

    def rlhf_weight_layout(self) -> dict[str, list[Piece]]:
        return shard_layout(self.model_runner.model)

    def rlhf_weight_checksums(self) -> dict[str, list[int]]:
        if adapter.adapter_mode(self):
            return adapter.held_checksums(self)
        model = self.model_runner.model
        return held_checksums(dict(model.named_parameters()), shard_layout(model))

    def rlhf_packed_modules(self) -> dict[str, list[str]]:
        return dict(getattr(self.model_runner.model, "packed_modules_mapping", {}) or {})

    def rlhf_lora_setup(self, config: dict[str, Any]) -> None:
        adapter.setup_worker(self, config)

    def rlhf_weights_call(self, transport: str, verb: str, *args: Any) -> Any:
        """A transport's worker-side `verb` on this worker (rlhf_dist.weights.transports)."""
        return call_verb(transport, "worker", verb, self, *args)


keep_cpu_linear_weights()  # on import: vLLM imports the extension before it loads the model
