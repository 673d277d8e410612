"""SFT actor: one DeepSpeed rank of supervised fine-tuning on demonstrations.

Next-token cross-entropy on response tokens only (the prompt is context, not a target), summed
over the mini-batch's tokens and divided by their global count, so 2 ranks x k micro-batches make
the same update as one rank on the whole mini-batch (`DeepSpeedRank`).
"""

from __future__ import annotations

import torch

from rlhf_dist.actors.ds_rank import DeepSpeedRank
from rlhf_dist.algo.masked import aggregate_loss, masked_sum
from rlhf_dist.data.batch import Batch
from rlhf_dist.models.hf import load_causal_lm, response_logprobs


class SFTActor(DeepSpeedRank):
    role = "sft"
    stage = "SFT"

    def build_model(self) -> torch.nn.Module:
        return load_causal_lm(self.model_path, "float32", self.load_device)

    def train_step(self, minibatches: list[tuple[Batch, float, float]], step: int) -> dict[str, float]:
        def micro_loss(micro: Batch, num_tokens: float, num_seqs: float):
            tensors = {k: v.to(self.device) for k, v in micro.tensors.items()}
            logprobs, _ = response_logprobs(self.ds_engine, tensors["input_ids"],
                                            tensors["attention_mask"], micro.prompt_width)
            loss = aggregate_loss(-logprobs, tensors["response_mask"], "token_mean", num_tokens=num_tokens)
            return loss, {"sft/loss": loss.detach()}, {}

        return self.run_minibatches(minibatches, micro_loss, step, prefix="sft/")

    def eval_loss(self, batch: Batch, micro_batch_size: int) -> tuple[float, float]:
        """(summed token NLL, token count) of this rank's held-out shard; the caller divides."""
        def forward(input_ids, attention_mask, prompt_width):
            return response_logprobs(self.ds_engine.module, input_ids.to(self.device),
                                     attention_mask.to(self.device), prompt_width)[0]

        logprobs = self.forward_batch(batch, micro_batch_size, forward)  # (B, T') trimmed
        mask = batch.trimmed()["response_mask"]
        return float(-masked_sum(logprobs, mask)), float(mask.sum())
