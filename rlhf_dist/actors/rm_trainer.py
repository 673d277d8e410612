"""Reward-model trainer actor: one DeepSpeed rank of Bradley-Terry reward-model training.

Each row of a batch is one preference pair (chosen and rejected, each left-padded to a common
width). The loss is -log sigmoid(r_chosen - r_rejected - margin), averaged over the mini-batch's
pairs however they are split across ranks and micro-batches.
"""

from __future__ import annotations

import torch

from rlhf_dist.actors.ds_rank import DeepSpeedRank
from rlhf_dist.algo.preference import bradley_terry_loss
from rlhf_dist.data.batch import Batch
from rlhf_dist.models.scalar_reward import load_reward_model, sequence_rewards


class RewardModelTrainerActor(DeepSpeedRank):
    role = "reward_model"
    stage = "reward-model"

    def build_model(self) -> torch.nn.Module:
        return load_reward_model(self.model_path, self.load_device)

    def _pair_rewards(self, model, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_chosen, r_rejected), (b,) each, from one forward over both halves."""
        ids = torch.cat([tensors["chosen_ids"], tensors["rejected_ids"]])  # (2b, L)
        mask = torch.cat([tensors["chosen_mask"], tensors["rejected_mask"]])
        rewards = sequence_rewards(model, ids.to(self.device), mask.to(self.device))  # (2b,)
        return rewards.chunk(2)

    def train_step(self, minibatches: list[tuple[Batch, float, float]], step: int) -> dict[str, float]:
        def micro_loss(micro: Batch, num_pairs: float, _num_seqs: float):
            chosen, rejected = self._pair_rewards(self.ds_engine, micro.tensors)
            loss, stats = bradley_terry_loss(chosen, rejected, micro["margin"].to(self.device))
            loss = loss * len(micro) / num_pairs  # this micro-batch's share of the mini-batch mean
            return loss, {"rm/loss": loss.detach()}, {f"rm/train_{k}": v for k, v in stats.items()}

        return self.run_minibatches(minibatches, micro_loss, step, prefix="rm/")

    def evaluate(self, batch: Batch, micro_batch_size: int) -> dict[str, float]:
        """Sums over this rank's held-out pairs: correct, pairs, margin (the caller divides)."""
        self.ds_engine.eval()
        correct = margin = 0.0
        with torch.no_grad():
            for start in range(0, len(batch), micro_batch_size):
                part = batch.select(list(range(start, min(start + micro_batch_size, len(batch)))))
                chosen, rejected = self._pair_rewards(self.ds_engine.module, part.tensors)
                correct += float((chosen > rejected).sum())
                margin += float((chosen - rejected).sum())
        return {"correct": correct, "pairs": float(len(batch)), "margin": margin}
