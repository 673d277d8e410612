"""The rollout batch: token tensors plus everything computed about them during one step.

Layout (B sequences, P prompt columns, T response columns):
    input_ids       (B, P + T)  prompts left-padded to P, responses right-padded to T
    attention_mask  (B, P + T)  1 on real tokens
    response_mask   (B, T)      1 on response tokens the policy sampled (including the final eos);
                                0 on padding and on a multi-turn episode's observation tokens
    rollout_logprobs(B, T)      logprobs of the sampled tokens under the engine that sampled them
    ref_logprobs    (B, T)      reference policy, filled in the reference phase
    rewards         (B,)        one scalar per sequence
    advantages      (B, T)
Samples of the same prompt are contiguous rows (group g = rows g*G .. g*G+G-1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlhf_dist.data.records import render_observation


@dataclass
class Batch:
    tensors: dict[str, torch.Tensor]
    prompt_width: int
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        if value.shape[0] != len(self):
            raise ValueError(f"{key} has {value.shape[0]} rows, batch has {len(self)}")
        self.tensors[key] = value

    def select(self, rows: torch.Tensor | list[int], keys: list[str] | None = None) -> "Batch":
        rows = torch.as_tensor(rows, dtype=torch.long)
        keys = keys or list(self.tensors)
        return Batch({k: self.tensors[k][rows] for k in keys}, self.prompt_width)

    def chunk(self, num: int) -> list["Batch"]:
        """Split into `num` contiguous equal parts (len must divide evenly)."""
        size = len(self) // num
        return [self.select(range(i * size, (i + 1) * size)) for i in range(num)]

    def split_by_tokens(self, max_tokens: int, num_parts: int = 0, with_rows: bool = False):
        """Trimmed micro-batches of at most `max_tokens` padded tokens (`token_budget_parts`);
        with `with_rows`, (the rows of each, the micro-batches)."""
        mask = self.tensors["response_mask"] > 0  # (B, T); gaps where a multi-turn episode's observations are
        lengths = (mask * torch.arange(1, mask.shape[1] + 1)).amax(-1).clamp(min=1).tolist()
        parts = token_budget_parts(lengths, self.prompt_width, max_tokens, num_parts)
        micros = [self.select(rows).trimmed() for rows in parts]
        return (parts, micros) if with_rows else micros

    def token_counts(self) -> tuple[int, int]:
        """(padded, real) tokens a forward pass sees: over every attention mask of the batch."""
        masks = [v for k, v in self.tensors.items() if k.endswith("mask") and k != "response_mask"]
        return sum(m.numel() for m in masks), sum(int(m.sum()) for m in masks)

    def trimmed(self) -> "Batch":
        """Drop response columns that are padding in every row (saves compute on short batches)."""
        if "response_mask" not in self.tensors:  # e.g. reward-model pairs: nothing to trim
            return self
        width = int(self.tensors["response_mask"].sum(0).nonzero().max().item()) + 1 \
            if self.tensors["response_mask"].any() else 1
        cut = {}
        for key, value in self.tensors.items():
            if key in ("input_ids", "attention_mask"):
                cut[key] = value[:, : self.prompt_width + width]
            elif value.dim() == 2:
                cut[key] = value[:, :width]
            else:
                cut[key] = value
        return Batch(cut, self.prompt_width, dict(self.meta))


def collate_sequences(
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    response_logprobs: list[list[float]],
    pad_id: int,
    loss_masks: list[list[int] | None] | None = None,
    turn_rewards: list[dict[int, float] | None] | None = None,
) -> Batch:
    """Pad prompts on the left and responses on the right into one Batch.

    Multi-turn episodes (rlhf_dist.rl.episodes) give `loss_masks`: their observation tokens are in
    the context (attention 1) but not in the response mask, so no loss, KL or advantage touches
    them; and `turn_rewards` ({token index: reward}), which become a (B, T) "turn_rewards" tensor.
    """
    num = len(prompt_ids)
    width_p = max(len(p) for p in prompt_ids)
    width_t = max(1, max(len(r) for r in response_ids))
    input_ids = torch.full((num, width_p + width_t), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((num, width_p + width_t), dtype=torch.long)
    response_mask = torch.zeros((num, width_t), dtype=torch.float32)
    logprobs = torch.zeros((num, width_t), dtype=torch.float32)
    for row, (prompt, response, lps) in enumerate(zip(prompt_ids, response_ids, response_logprobs)):
        start = width_p - len(prompt)
        input_ids[row, start:width_p] = torch.tensor(prompt)
        attention_mask[row, start:width_p] = 1
        if response:
            input_ids[row, width_p : width_p + len(response)] = torch.tensor(response)
            attention_mask[row, width_p : width_p + len(response)] = 1
            mask = loss_masks[row] if loss_masks and loss_masks[row] is not None else None
            if mask is not None and len(mask) != len(response):
                raise ValueError(f"row {row}: loss mask of {len(mask)} for {len(response)} response tokens")
            response_mask[row, : len(response)] = 1.0 if mask is None else torch.tensor(mask, dtype=torch.float32)
            logprobs[row, : len(response)] = torch.tensor(lps, dtype=torch.float32)
    tensors = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "rollout_logprobs": logprobs,
    }
    if turn_rewards and any(turn_rewards):
        tensors["turn_rewards"] = torch.zeros((num, width_t), dtype=torch.float32)
        for row, rewards in enumerate(turn_rewards):
            for index, reward in (rewards or {}).items():
                tensors["turn_rewards"][row, index] = float(reward)
    return Batch(tensors, width_p)


def samples_batch(samples: list, pad_id: int) -> Batch:
    """The engines' samples (rlhf_dist.data.messages.Sample) as one Batch, with the loss masks and
    turn rewards of multi-turn episodes."""
    return collate_sequences([s.prompt_ids for s in samples], [s.token_ids for s in samples],
                             [s.logprobs for s in samples], pad_id, [s.loss_mask for s in samples],
                             [s.turn_rewards for s in samples])


def token_budget_parts(lengths: list[int], prompt_width: int, max_tokens: int,
                       num_parts: int = 0) -> list[list[int]]:
    """Rows grouped into micro-batches of at most `max_tokens` padded tokens, longest first.

    A trimmed micro-batch of rows R holds |R| x (P + max_{r in R} lengths[r]) tokens. Rows are
    packed greedily in order of decreasing length, so short responses share micro-batches instead
    of padding to the longest one (a row over the budget alone gets a micro-batch of its own).
    With `num_parts` above that count, the part with the most padded tokens is halved until
    there are `num_parts` (the ranks of a ZeRO group must run the same number of forwards).
    """
    if num_parts > len(lengths):
        raise ValueError(f"cannot split {len(lengths)} rows into {num_parts} micro-batches")
    parts: list[list[int]] = []
    for row in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        if parts and (len(parts[-1]) + 1) * (prompt_width + lengths[parts[-1][0]]) <= max_tokens:
            parts[-1].append(row)
        else:
            parts.append([row])

    def padded(part: list[int]) -> int:
        return len(part) * (prompt_width + lengths[part[0]])  # part[0] is its longest row

    while len(parts) < num_parts:
        i = max((i for i, part in enumerate(parts) if len(part) > 1), key=lambda i: padded(parts[i]))
        part = parts.pop(i)
        parts[i:i] = [part[: len(part) // 2], part[len(part) // 2 :]]
    return parts


def split_evenly(items: list, parts: int) -> list[list]:
    """Contiguous, near-equal parts (sizes differ by at most one)."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def demonstration_batch(tokenizer, prompts: list[str], completions: list, with_eos: bool = True) -> Batch:
    """(prompt, completion) demonstrations as a Batch in the rollout layout: prompt ids, then
    completion ids (+ eos) as the response (the SFT stage's, and the policy's SFT-mix rows).

    A completion may be a whole multi-turn episode, [policy turn, observation, policy turn, ...]:
    each policy turn ends with eos and is trained on; observations are context only (mask 0),
    tokenised on their own as the rollout loop tokenises them (rlhf_dist.rl.episodes).
    """
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    eos = [tokenizer.eos_token_id] if with_eos else []
    completion_ids, masks = [], []
    for completion in completions:
        turns = [completion] if isinstance(completion, str) else list(completion)
        ids, mask = [], []
        for k, text in enumerate(turns):
            text = text if k % 2 == 0 else render_observation(text, tokenizer)
            piece = tokenizer(text, add_special_tokens=False)["input_ids"] + (eos if k % 2 == 0 else [])
            ids += piece
            mask += [1 - k % 2] * len(piece)
        completion_ids.append(ids)
        masks.append(mask)
    return collate_sequences(prompt_ids, completion_ids, [[0.0] * len(c) for c in completion_ids],
                             tokenizer.pad_token_id, masks)


def shard_minibatches(batch: Batch, keys: list[str], orders: list[torch.Tensor], mini: int,
                      ranks: int) -> list[list[tuple[Batch, float, float]]]:
    """Per rank: (its shard of each mini-batch, global masked tokens, global sequences).

    `orders` holds one permutation of the batch per epoch; each is cut into mini-batches of
    `mini` rows and each mini-batch into `ranks` equal shards. The global counts normalise the
    loss so that the sum over shards is the loss of the whole mini-batch (algo/masked.py).
    Batches without a response mask (reward-model pairs) count rows for both.
    """
    per_rank: list[list] = [[] for _ in range(ranks)]
    for order in orders:
        for start in range(0, len(batch), mini):
            rows = order[start : start + mini]
            if "response_mask" in batch.tensors:
                mask = batch["response_mask"][rows].bool()
                num_tokens, num_seqs = int(mask.sum()), int(mask.any(-1).sum())
            else:
                num_tokens = num_seqs = len(rows)
            for rank, shard_rows in enumerate(rows.chunk(ranks)):
                per_rank[rank].append((batch.select(shard_rows, keys), float(num_tokens), float(num_seqs)))
    return per_rank
