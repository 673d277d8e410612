"""What a vLLM engine needs to take new weights in place, whoever sends them: the reload itself and
the CPU oneDNN fixes around it, and which rows of the learner's tensors each tensor-parallel shard
holds. Used by the transports' engine and worker sides and by the worker extension; imports no
transport."""

from __future__ import annotations

import time

import torch

from rlhf_dist.weights.checksum import Piece


def keep_cpu_linear_weights() -> None:
    """On CPU, vLLM packs linear weights into oneDNN/SGL handles and frees `layer.weight`.

    An in-place reload does not rebuild those handles (measured with vLLM 0.32: after
    `reload_weights` the engine kept computing with the old packed weights while generating),
    so we keep `layer.weight` and rebuild the handles from it after every reload
    (`refresh_cpu_gemm_handles`). This also lets the checksum read the weights the engine uses.
    Costs one extra copy of the linear weights in RAM; GPU engines are unaffected.
    """
    try:
        from vllm.model_executor.layers import utils as layer_utils
    except ImportError:  # imported outside a vLLM install (tests of the pure parts)
        return
    original = layer_utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "_rlhf_keeps_weights", False):
        return

    def dispatch_keeping_weight(layer, remove_weight):
        return original(layer, remove_weight=False)

    dispatch_keeping_weight._rlhf_keeps_weights = True
    layer_utils.dispatch_cpu_unquantized_gemm = dispatch_keeping_weight


def refresh_cpu_gemm_handles(model) -> int:
    """Re-create every packed CPU GEMM handle from the layer's current weight."""
    from vllm.model_executor.layers import utils as layer_utils

    refreshed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and weight is not None and weight.dim() == 2 and weight.numel():
            layer_utils.dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            refreshed += 1
    return refreshed


def reload_in_place(worker, weights) -> float:
    """Stream (name, tensor) pairs into the worker's live model with vLLM's in-place loader; on
    CPU then re-pack the oneDNN handles. Returns the seconds the re-pack took."""
    worker.model_runner.reload_weights(weights_iterator=weights)
    refresh_start = time.perf_counter()
    if worker.device.type == "cpu":
        refresh_cpu_gemm_handles(worker.model_runner.model)
    return time.perf_counter() - refresh_start


def apply_weights(worker, weights) -> float:
    """Take a stream of (name, tensor) pairs, whichever transport brought them: the model's weights
    in place (`reload_in_place`), or, on an engine set up for adapter sync
    (rlhf_dist.weights.adapter), the policy's LoRA adapter. Returns the CPU re-pack seconds."""
    from rlhf_dist.weights import adapter

    if adapter.adapter_mode(worker):
        adapter.install(worker, weights)
        return 0.0
    return reload_in_place(worker, weights)


def shard_layout(model: torch.nn.Module) -> dict[str, list[Piece]]:
    """For each parameter, the pieces of the learner's (engine-named, fused) tensor it holds.

    Column-parallel layers (qkv_proj, gate_up_proj, ...) hold, per fused part, rows
    [part offset + tp_rank * local, + local); row-parallel layers hold columns
    [tp_rank * local, + local) of their weight and a full bias; vocab-parallel embeddings hold the
    vocab rows of `shard_indices`. Everything else is replicated (one piece, all rows).
    """
    from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    layout: dict[str, list[Piece]] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if param.dim() == 0 or param.numel() == 0:
                continue
            if isinstance(module, VocabParallelEmbedding):
                indices = module.shard_indices
                pieces = [(0, 0, indices.org_vocab_start_index, indices.num_org_elements)]
            elif isinstance(module, ColumnParallelLinear):
                local_sizes = list(module.output_partition_sizes)
                full_sizes = list(getattr(module, "output_sizes", None) or [s * module.tp_size for s in local_sizes])
                pieces, local_start = [], 0
                for part, (local, full) in enumerate(zip(local_sizes, full_sizes)):
                    pieces.append((0, local_start, sum(full_sizes[:part]) + module.tp_rank * local, local))
                    local_start += local
            elif isinstance(module, RowParallelLinear) and param.dim() == 2:
                local = module.input_size_per_partition
                pieces = [(1, 0, module.tp_rank * local, local)]
            else:
                pieces = [(0, 0, 0, param.shape[0])]
            layout.setdefault(name, pieces)  # tied weights: the first module that holds it
    return layout
