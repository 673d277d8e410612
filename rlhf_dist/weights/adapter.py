"""Adapter-only weight sync (model.lora.sync=adapter): after each update only the LoRA tensors move,
and the engines serve them through vLLM's own LoRA support.

    learner    `AdapterPublisher`: the A and B of every adapted layer under PEFT's saved names
               ('base_model.model.<module>.lora_A.weight'), B already multiplied by alpha / rank,
               in the usual bucket plan. Any transport that streams (name, tensor) pairs into
               `engine_weights.apply_weights` carries them (object_store, collective).
    engine     `lora_setup` once (the PEFT config with the scale folded into B: alpha = rank, so
               vLLM's own B *= scaling is a no-op and the engine holds exactly the bits sent);
               then every sync `install` builds a `LoRAModel` from the received tensors in memory
               (no file), replaces adapter `ADAPTER_ID` with it and activates it, which copies it
               into the engine's stacked adapter slots. The rollout actor sends a `LoRARequest` of
               that id with every generate once one is installed.
    verify     `held_checksums` hashes the adapter slots the LoRA kernels read (vLLM stacks
               q/k/v and gate/up into one layer's slots: each part is read back from its own
               slot, named by the HF module it came from), the learner hashes what it sent.

Engines keep the base weights they loaded; the learner's base is frozen, so they stay equal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch

from rlhf_dist.models.lora import ADAPTER, PEFT_PREFIX, lora_layers
from rlhf_dist.weights.checksum import narrow_to, tensor_checksum
from rlhf_dist.weights.plan import DTYPES, BucketPlan, WeightPublisher, gathered

ADAPTER_ID = 1  # the one adapter an engine serves (vLLM ids start at 1)
ADAPTER_NAME = "rlhf-policy"
STATE = "_rlhf_lora"  # the worker attribute that holds the adapter config once set up

# the ranks vLLM's LoRA slots come in (vllm.config.lora.MaxLoRARanks); an adapter of a smaller
# rank fills the leading rows of its slot
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_rank(rank: int) -> int:
    """The smallest slot rank vLLM offers that holds a rank-`rank` adapter."""
    for allowed in VLLM_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest adapter rank {VLLM_RANKS[-1]}")


def serves_adapters(model_path: str) -> tuple[bool, str]:
    """Whether vLLM serves LoRA adapters for the model's architecture (its model class implements
    `SupportsLoRA`), and the architecture's name. Imports the model class, not the weights."""
    from vllm.model_executor.models.interfaces import supports_lora
    from vllm.model_executor.models.registry import ModelRegistry

    archs = json.loads((Path(model_path) / "config.json").read_text()).get("architectures") or ["?"]
    arch = archs[0]
    if arch not in ModelRegistry.models:
        return False, arch
    return bool(supports_lora(ModelRegistry.models[arch].load_model_cls())), arch


# ---------------------------------------------------------------------- learner side
class AdapterPublisher(WeightPublisher):
    """A `WeightPublisher` over a peft-wrapped module that yields only the adapter tensors."""

    def __init__(self, module: torch.nn.Module, rank: int, zero_stage: int) -> None:
        super().__init__(module, rank, zero_stage)
        self.params, self.scales, self.targets = {}, {}, set()
        for base_name, layer in lora_layers(module).items():  # module order
            module_name = base_name.removesuffix(".weight")
            self.targets.add(module_name.rsplit(".", 1)[-1])
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            self.params[f"{PEFT_PREFIX}{module_name}.lora_A.weight"] = a
            self.params[f"{PEFT_PREFIX}{module_name}.lora_B.weight"] = b
            self.scales[f"{PEFT_PREFIX}{module_name}.lora_B.weight"] = float(layer.scaling[ADAPTER])
        self.lora_rank = int(next(iter(module.peft_config.values())).r)

    def engine_lora_config(self) -> dict[str, Any]:
        """The PEFT config the engines build the adapter with: the scale is already in B, so
        lora_alpha = r (scaling 1)."""
        return {"r": self.lora_rank, "lora_alpha": self.lora_rank, "target_modules": sorted(self.targets)}

    def buckets(self, plan: BucketPlan, dtype: str | None = None):
        """Each bucket's [(name, tensor)], B scaled (gathered under ZeRO-3; only rank 0 gets
        tensors when `dtype` is given)."""
        for bucket in plan:
            names = [name for name, _ in bucket]
            with gathered([self.params[n] for n in names], self.zero_stage), torch.no_grad():
                if dtype is not None and self.rank != 0:
                    yield []
                    continue
                out = [(n, self.params[n].detach() * self.scales[n] if n in self.scales else self.params[n].detach())
                       for n in names]
                yield out if dtype is None else [(n, t.to(DTYPES[dtype])) for n, t in out]

    def checksums(self, plan: BucketPlan, dtype: str, packed_modules: dict[str, list[str]],
                  layouts: list[dict]) -> list[dict[str, list[int]]] | None:
        """One checksum per tensor sent (rank 0): what the engine's adapter slots must hold."""
        sums = {name: [tensor_checksum(t)] for bucket in self.buckets(plan, dtype) for name, t in bucket}
        return [sums for _ in layouts] if self.rank == 0 else None


# ---------------------------------------------------------------------- worker side (in the engine)
def setup_worker(worker, config: dict[str, Any]) -> None:
    """Adapter mode on: later weight streams are installed as the adapter (`apply_weights`)."""
    setattr(worker, STATE, dict(config))


def adapter_mode(worker) -> bool:
    return getattr(worker, STATE, None) is not None


def install(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> dict[str, int]:
    """Build the adapter from the streamed (name, tensor) pairs in memory, replace adapter
    `ADAPTER_ID` with it and activate it (its tensors copied into the engine's adapter slots)."""
    from vllm.lora.peft_helper import PEFTHelper

    manager = worker.model_runner.lora_manager
    tensors = dict(weights)
    helper = PEFTHelper.from_dict(dict(getattr(worker, STATE),
                                       vllm_max_position_embeddings=manager.max_position_embeddings))
    helper.validate_legal(manager.lora_config)  # vLLM's own checks (the rank fits the slots)
    lora = manager._lora_model_cls.from_lora_tensors(
        ADAPTER_ID, tensors, helper, device="cpu", dtype=manager.lora_config.lora_dtype,
        model_vocab_size=manager.vocab_size)
    models = manager._adapter_manager
    models.remove_adapter(ADAPTER_ID)
    models.add_adapter(lora)
    models.activate_adapter(ADAPTER_ID)
    return {"adapter_tensors": len(tensors)}


def held_adapter(worker) -> dict[str, torch.Tensor]:
    """The adapter as the engine computes with it: each part's A and B read back from the stacked
    slot of `ADAPTER_ID` (views, cut to the adapter's shapes), named like the tensors the learner
    sends. Parts vLLM serves no adapter for are absent (so reported as never received)."""
    models = worker.model_runner.lora_manager._adapter_manager
    adapter = models.get_adapter(ADAPTER_ID)
    if adapter is None or ADAPTER_ID not in models.lora_index_to_id:
        return {}
    slot = models.lora_index_to_id.index(ADAPTER_ID)
    held: dict[str, torch.Tensor] = {}
    for module_name, layer in models.modules.items():
        weights = adapter.get_lora(module_name)
        if weights is None:
            continue
        parts = models.packed_modules.get(module_name, [module_name])
        a_parts = weights.lora_a if isinstance(weights.lora_a, list) else [weights.lora_a]
        b_parts = weights.lora_b if isinstance(weights.lora_b, list) else [weights.lora_b]
        for i, (part, a, b) in enumerate(zip(parts, a_parts, b_parts)):
            if a is None:
                continue
            for kind, received, stacked in (("A", a, layer.lora_a_stacked[i]), ("B", b, layer.lora_b_stacked[i])):
                tensor = narrow_to(stacked[slot, 0], tuple(received.shape))
                if tensor is not None:
                    held[f"{PEFT_PREFIX}{part}.lora_{kind}.weight"] = tensor
    return held


def held_checksums(worker) -> dict[str, list[int]]:
    """Checksums of `held_adapter`, in the form `diff_checksums` compares with the learner's."""
    return {name: [tensor_checksum(t)] for name, t in held_adapter(worker).items()}
