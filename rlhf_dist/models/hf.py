"""Loading HF causal LMs and computing per-token logprobs of responses.

Every actor that runs the policy in torch (learner ranks, the reference) goes through
`load_causal_lm` and `response_logprobs`, so the logprobs they compare are computed the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_dist.models.tiny import check_model_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(path: str, dtype: str = "float32", device: str = "cpu"):
    """`from_pretrained(path)`: the same call that loads a hub checkpoint on a cluster."""
    from transformers import AutoModelForCausalLM

    check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    return model.to(device)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    check_model_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: the first real token of every row gets position 0."""
    positions = attention_mask.long().cumsum(-1) - 1  # (B, L)
    return positions.clamp(min=0)


def response_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_width: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(y_t | x, y_<t) for every response position.

    input_ids: (B, P + T): prompts left-padded to width P, responses right-padded to T.
    The logits at position P-1+t predict response token t. Logits are divided by the sampling
    temperature so that these logprobs match the distribution vLLM sampled from
    (`logprobs_mode="processed_logprobs"`).
    Returns logprobs (B, T) and, if asked, the entropy of each position's distribution (B, T).
    """
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    logits = outputs.logits[:, prompt_width - 1 : -1, :].float() / temperature  # (B, T, V)
    targets = input_ids[:, prompt_width:]  # (B, T)
    log_norm = torch.logsumexp(logits, dim=-1)  # (B, T)
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    entropy = None
    if with_entropy:
        probs = F.softmax(logits, dim=-1)
        entropy = log_norm - (probs * logits).sum(-1)
    return logprobs, entropy
