"""Supervised warm-up on demonstrations: next-token cross-entropy on completion tokens only.

Used by the default job to give the randomly initialised tiny model a weak starting policy. It is
a plain single-process torch loop (seconds for the tiny model); the full SFT stage of the
SFT -> RM -> RL recipe builds on it.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from rlhf_dist.models.hf import load_causal_lm, load_tokenizer, position_ids_from_mask


def sft_batch(tokenizer, prompts: list[str], completions: list[str]) -> dict[str, torch.Tensor]:
    """Left-padded prompt + completion + eos; labels are -100 outside the completion."""
    rows = []
    for prompt, completion in zip(prompts, completions):
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt_ids, completion_ids))
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (prompt_ids, completion_ids) in enumerate(rows):
        ids = prompt_ids + completion_ids
        start = width - len(ids)
        input_ids[i, start:] = torch.tensor(ids)
        attention_mask[i, start:] = 1
        labels[i, start + len(prompt_ids):] = torch.tensor(completion_ids)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def supervised_warmup(
    model_path: str,
    out_dir: str,
    prompts: list[str],
    completions: list[str],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    log_every: int = 50,
) -> Path:
    """Train `steps` AdamW steps on (prompt, completion) pairs and save an HF model dir."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - 0.9 * s / max(1, steps))
    start, indices = time.perf_counter(), list(range(len(prompts)))
    for step in range(1, steps + 1):
        rows = rng.sample(indices, min(batch_size, len(indices)))
        batch = sft_batch(tokenizer, [prompts[i] for i in rows], [completions[i] for i in rows])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=position_ids_from_mask(batch["attention_mask"])).logits
        # logits at t predict token t+1
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
            ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            print(f"[warmup] step {step:>4}/{steps} | loss {loss.item():.4f} "
                  f"| {time.perf_counter() - start:.1f}s", flush=True)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
