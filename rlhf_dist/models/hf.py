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


# (row, position) pairs whose fp32 logits exist at once: 256 x V floats, 0.16 GB at V = 152k
LOGPROB_CHUNK_TOKENS = 256


def response_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_width: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = True,
    chunk_tokens: int = LOGPROB_CHUNK_TOKENS,
    banned_token_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(y_t | x, y_<t) for every response position.

    input_ids: (B, P + T): prompts left-padded to width P, responses right-padded to T.
    The logits at position P-1+t predict response token t. Logits are divided by the sampling
    temperature so that these logprobs match the distribution vLLM sampled from
    (`logprobs_mode="processed_logprobs"`).
    Returns logprobs (B, T) and, if asked, the entropy of each position's distribution (B, T);
    `entropy_grad=False` returns it without a gradient (a metric only).
    `banned_token_id`: a token the engine could not sample at any response position (EOS under
    fixed lengths, vLLM `min_tokens`): its logit is removed before normalising, as vLLM's processed
    logprobs remove it, so that the policy trained is the one sampled from.

    Memory: the model computes logits for the last T+1 positions only (`logits_to_keep`), never
    for the prompt, and `_TokenLogprobs` turns them into fp32 `chunk_tokens` (row, position) pairs
    at a time, so neither the forward nor the backward holds a (B, T, V) fp32 tensor.
    """
    width = input_ids.shape[1] - prompt_width  # T
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        logits_to_keep=width + 1,
    )
    targets = input_ids[:, prompt_width:]  # (B, T)
    step = max(1, chunk_tokens // len(input_ids))
    # outputs.logits: (B, T+1, V) in the model's dtype, position t predicting response token t
    logprobs, entropy = _TokenLogprobs.apply(outputs.logits, targets, temperature, step, with_entropy,
                                             banned_token_id)
    if with_entropy and not entropy_grad:
        entropy = entropy.detach()
    return logprobs, entropy


class _TokenLogprobs(torch.autograd.Function):
    """Logprobs of `targets` (B, T) and entropies from the first T positions of (B, >= T, V)
    logits, `step` positions at a time (the logits are not sliced: a slice's backward would
    allocate another (B, T, V) gradient).

    With z = logits / temperature, log p = z - logsumexp(z) and H = -sum p log p. Only a (B, step, V)
    fp32 slice exists at once: backward recomputes p from the saved logits and log-normaliser and
    writes into one gradient of the logits' shape and dtype:
        d log p(y) / dz = onehot(y) - p,        dH / dz = -p (log p + H).
    """

    @staticmethod
    def forward(ctx, logits, targets, temperature: float, step: int, with_entropy: bool, banned: int | None):
        ctx.set_materialize_grads(False)  # an unused output (the entropy metric) gets no gradient
        log_norm = logits.new_empty(targets.shape, dtype=torch.float32)  # (B, T)
        logprobs = torch.empty_like(log_norm)
        entropy = torch.empty_like(log_norm) if with_entropy else None
        for part in _chunks(targets.shape[1], step):
            z = _scaled(logits[:, part], temperature, banned)  # (B, C, V)
            log_norm[:, part] = torch.logsumexp(z, dim=-1)
            logprobs[:, part] = z.gather(-1, targets[:, part, None]).squeeze(-1) - log_norm[:, part]
            if with_entropy:
                entropy[:, part] = log_norm[:, part] - (F.softmax(z, dim=-1) * z).sum(-1)
        ctx.save_for_backward(logits, targets, log_norm, entropy)
        ctx.temperature, ctx.step, ctx.banned = temperature, step, banned
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, targets, log_norm, entropy = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        grad_logits[:, targets.shape[1] :] = 0  # positions past the response predict nothing
        for part in _chunks(targets.shape[1], ctx.step):
            log_probs = _scaled(logits[:, part], ctx.temperature, ctx.banned) - log_norm[:, part, None]  # (B, C, V)
            probs = log_probs.exp()
            grad = torch.zeros_like(probs)
            if grad_logprobs is not None:
                upstream = grad_logprobs[:, part, None]
                grad.sub_(probs * upstream).scatter_add_(-1, targets[:, part, None], upstream)
            if grad_entropy is not None:
                grad.sub_(probs * (log_probs + entropy[:, part, None]) * grad_entropy[:, part, None])
            grad_logits[:, part] = grad / ctx.temperature
        return grad_logits, None, None, None, None, None


# a banned token's scaled logit: exp() of it is 0 in fp32, and unlike -inf it keeps a banned target
# (padding, when pad = EOS) finite, so masking it by multiplication leaves 0, not NaN
_BANNED_LOGIT = -1e4


def _scaled(logits: torch.Tensor, temperature: float, banned: int | None) -> torch.Tensor:
    """fp32 logits / temperature, a banned token's set to _BANNED_LOGIT: (B, C, V)."""
    z = logits.float() / temperature
    if banned is not None:
        z[..., banned] = _BANNED_LOGIT
    return z


def _chunks(length: int, step: int) -> list[slice]:
    return [slice(start, min(start + step, length)) for start in range(0, length, step)]


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
def batched_forward(batch, micro_batch_size: int, forward, max_tokens: int = 0) -> torch.Tensor:
    """Run `forward(input_ids, attention_mask, prompt_width) -> (b, T)` over micro-batches.

    `batch` is a rlhf_dist Batch; its padding-only response columns are trimmed first. Micro-batches
    are `micro_batch_size` rows in order, or with `max_tokens` > 0 rows grouped by length into at
    most that many padded tokens each (`Batch.split_by_tokens`: short responses are not padded to
    the longest). Returns the (B, T') float32 CPU tensor in the batch's row order; callers pad it
    back to the batch's width.
    """
    batch = batch.trimmed()
    width = batch["response_mask"].shape[1]
    if max_tokens > 0:
        rows, micros = batch.split_by_tokens(max_tokens, with_rows=True)
    else:
        rows = [list(range(start, min(start + micro_batch_size, len(batch))))
                for start in range(0, len(batch), micro_batch_size)]
        micros = [batch.select(part, ["input_ids", "attention_mask"]) for part in rows]
    out = torch.zeros(len(batch), width)
    for part, micro in zip(rows, micros):
        values = forward(micro["input_ids"], micro["attention_mask"], batch.prompt_width).float().cpu()
        out[torch.as_tensor(part), : values.shape[1]] = values
    return out
