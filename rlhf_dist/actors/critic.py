"""Critic actor: one DeepSpeed rank of the PPO value model. Thin verbs over `DeepSpeedRank`.

The value model is the policy's architecture with a scalar head on every position
(rlhf_dist.models.value); it is trained by its own group of ranks, with its own optimizer, LR and
ZeRO stage, concurrently with the policy.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from rlhf_dist.actors.ds_rank import DeepSpeedRank
from rlhf_dist.algo.objective import ValueLossConfig, value_objective
from rlhf_dist.data.batch import Batch
from rlhf_dist.models.value import load_value_model, response_values


class CriticActor(DeepSpeedRank):
    role = "critic"

    def build_model(self) -> torch.nn.Module:
        return load_value_model(self.model_path, self.load_device)

    def compute_values(self, batch: Batch, micro_batch_size: int) -> torch.Tensor:
        """V(s_t) of every response position of this rank's shard, (B, T) float32."""
        def forward(input_ids, attention_mask, prompt_width):
            return response_values(self.ds_engine.module, input_ids.to(self.device),
                                   attention_mask.to(self.device), prompt_width)

        return self.forward_batch(batch, micro_batch_size, forward)

    def train_step(self, minibatches: list[tuple[Batch, float, float]], loss: ValueLossConfig,
                   step: int, max_tokens: int = 0) -> dict[str, float]:
        """ppo_epochs x mini-batches of clipped value-regression updates on this rank's shards
        (`max_tokens` > 0: micro-batches by padded-token budget)."""
        def micro_loss(micro: Batch, num_tokens: float, num_seqs: float):
            tensors = {k: v.to(self.device) for k, v in micro.tensors.items()}
            values = response_values(self.ds_engine, tensors["input_ids"],
                                     tensors["attention_mask"], micro.prompt_width)
            return value_objective(values, tensors["values"], tensors["returns"],
                                   tensors["response_mask"], num_tokens=num_tokens,
                                   num_seqs=num_seqs, **asdict(loss))

        return self.run_minibatches(minibatches, micro_loss, step, prefix="critic/", max_tokens=max_tokens)
