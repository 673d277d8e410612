"""The learner's weights as the engines see them when the learner trains LoRA adapters.

The engines serve the base model's architecture, so they get the merged weights
W' = W + (alpha / rank) * B @ A under the base model's own (HF) names, and the tensors no
adapter touches as they are. The plan, the buckets and the checksums are then those of a full
model: every transport and the verification work unchanged ("merged" sync, docs/lora.md).
"""

from __future__ import annotations

import torch

from rlhf_dist.models.lora import adapter_params, base_params, lora_layers, merged_weight
from rlhf_dist.weights.plan import DTYPES, BucketPlan, WeightPublisher, gathered


class MergedLoraPublisher(WeightPublisher):
    """A `WeightPublisher` over a peft-wrapped module that yields merged weights."""

    def __init__(self, module: torch.nn.Module, rank: int, zero_stage: int) -> None:
        super().__init__(module, rank, zero_stage)
        self.params = base_params(module)  # HF name -> frozen base parameter (plan order = module order)
        self.layers = lora_layers(module)  # HF name of a base weight -> its LoRA layer

    def buckets(self, plan: BucketPlan, dtype: str | None = None):
        """Each bucket's [(name, merged tensor)], its base weights and adapters gathered together
        under ZeRO-3 (every rank joins; only rank 0 gets tensors when `dtype` is given)."""
        for bucket in plan:
            names = [name for name, _ in bucket]
            adapters = [p for n in names if n in self.layers for p in adapter_params(self.layers[n])]
            with gathered([self.params[n] for n in names] + adapters, self.zero_stage), torch.no_grad():
                if dtype is not None and self.rank != 0:
                    yield []
                    continue
                merged = [(n, merged_weight(self.params[n].detach(), self.layers.get(n))) for n in names]
                yield merged if dtype is None else [(n, t.to(DTYPES[dtype])) for n, t in merged]
