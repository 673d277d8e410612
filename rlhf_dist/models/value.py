"""The critic's value model: the policy's architecture with a scalar head on every position.

Stored in the HF token-classification format with one label (`AutoModelForTokenClassification`,
`num_labels=1`), so any HF tool can load a trained critic (with critic.lora: a PEFT
token-classification adapter over the base model, its value head saved in full). Initialised from a causal-LM checkpoint
(the policy: its transformer body is reused, the LM head dropped and a fresh `score` head added) or
from a sequence-classification reward model, whose `score` head has the same name and shape and is
then reused as well.
"""

from __future__ import annotations

import torch

from rlhf_dist.models.hf import position_ids_from_mask
from rlhf_dist.models.tiny import check_model_dir


def load_value_model(path: str, device: str = "cpu") -> torch.nn.Module:
    """A float32 value model from `path` (causal LM, reward model or an earlier critic)."""
    from transformers import AutoModelForTokenClassification
    from transformers.utils import logging

    check_model_dir(path)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "newly initialized: score.weight" is expected, not a problem
    try:
        model = AutoModelForTokenClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    finally:
        logging.set_verbosity(verbosity)
    return model.to(device)


def response_values(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int
) -> torch.Tensor:
    """V(s_t) for every response position t, (B, T), float32.

    input_ids is laid out as in `response_logprobs` (prompts left-padded to P, responses
    right-padded to T). The state before response token t ends at position P-1+t, the same
    position whose logits predict token t, so values and logprobs line up token for token.
    """
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return outputs.logits[:, prompt_width - 1 : -1, 0].float()  # (B, T)
