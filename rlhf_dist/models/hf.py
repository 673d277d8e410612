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


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Turn every dropout off, in train mode too.

    RL compares logprobs of the same tokens under models that must agree (learner vs engine,
    old vs new policy, critic values at rollout vs train time); dropout would make each forward
    pass a different function. `eval()` alone is not enough: DeepSpeed puts the module back in
    train mode, and gradient checkpointing only runs in train mode. HF attention layers read
    their own `attention_dropout` attribute, so that is zeroed as well.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


@torch.no_grad()
def batched_forward(batch, micro_batch_size: int, forward) -> torch.Tensor:
    """Run `forward(input_ids, attention_mask, prompt_width) -> (b, T)` over micro-batches.

    `batch` is a rlhf_dist Batch; its padding-only response columns are trimmed first. Returns
    the concatenated (B, T') float32 CPU tensor; callers pad it back to the batch's width.
    """
    batch = batch.trimmed()
    chunks = []
    for start in range(0, len(batch), micro_batch_size):
        rows = list(range(start, min(start + micro_batch_size, len(batch))))
        part = batch.select(rows, ["input_ids", "attention_mask"])
        chunks.append(forward(part["input_ids"], part["attention_mask"], batch.prompt_width).float().cpu())
    return torch.cat(chunks)
