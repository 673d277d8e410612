"""Reference actor: a frozen copy of the initial policy that scores responses token by token."""

from __future__ import annotations

import torch

from rlhf_dist.runtime.cpu import use_cores
from rlhf_dist.runtime.files import ModelSpec, local_model_path
from rlhf_dist.data.batch import Batch
from rlhf_dist.models.hf import batched_forward, disable_dropout, load_causal_lm, response_logprobs


class ReferenceActor:
    def __init__(self, model_path: ModelSpec, dtype: str = "float32", device: str = "cpu",
                 cpu_cores: list[int] | None = None) -> None:
        if device == "cpu":
            use_cores(cpu_cores)
        self.device = device
        model = load_causal_lm(local_model_path(model_path), dtype, device)
        self.model = disable_dropout(model).eval().requires_grad_(False)

    def ready(self) -> bool:
        return True

    @torch.inference_mode()
    def compute_logprobs(self, batch: Batch, temperature: float, micro_batch_size: int,
                         max_tokens: int = 0, banned_token_id: int | None = None) -> torch.Tensor:
        """log pi_ref of every response token, (B, T'), float32 on CPU (T' = trimmed width);
        `max_tokens` > 0: micro-batches by padded-token budget, rows grouped by length."""
        def forward(input_ids, attention_mask, prompt_width):
            return response_logprobs(self.model, input_ids.to(self.device),
                                     attention_mask.to(self.device), prompt_width, temperature,
                                     banned_token_id=banned_token_id)[0]

        return batched_forward(batch, micro_batch_size, forward, max_tokens)
