"""Reference actor: a frozen copy of the initial policy that scores responses token by token."""

from __future__ import annotations

import os

import torch

from rlhf_dist.data.batch import Batch
from rlhf_dist.models.hf import load_causal_lm, response_logprobs


class ReferenceActor:
    def __init__(self, model_path: str, dtype: str = "float32", device: str = "cpu",
                 num_threads: int | None = None) -> None:
        if device == "cpu":
            torch.set_num_threads(num_threads or os.cpu_count() or 1)
        self.device = device
        self.model = load_causal_lm(model_path, dtype, device).eval().requires_grad_(False)

    def ready(self) -> bool:
        return True

    @torch.inference_mode()
    def compute_logprobs(self, batch: Batch, temperature: float, micro_batch_size: int) -> torch.Tensor:
        """log pi_ref of every response token, (B, T), float32 on CPU."""
        batch = batch.trimmed()
        chunks = []
        for start in range(0, len(batch), micro_batch_size):
            rows = list(range(start, min(start + micro_batch_size, len(batch))))
            part = batch.select(rows, ["input_ids", "attention_mask"])
            logprobs, _ = response_logprobs(
                self.model,
                part["input_ids"].to(self.device),
                part["attention_mask"].to(self.device),
                batch.prompt_width,
                temperature,
            )
            chunks.append(logprobs.float().cpu())
        return torch.cat(chunks)
