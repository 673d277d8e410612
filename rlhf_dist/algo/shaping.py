"""Reward shaping and sample filtering from DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM
Reinforcement Learning System at Scale"): pure torch, no actors.

    overlong_penalty   Soft Overlong Punishment (DAPO section 3.4, eq. 13): a length penalty that
                       ramps linearly over the last `buffer` tokens before the response budget
    groups_with_signal Dynamic Sampling (DAPO section 3.2, eq. 11): a group whose rewards are all
                       equal has zero GRPO advantage everywhere, so it carries no gradient
"""

from __future__ import annotations

import torch


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO eq. 13, the penalty added to the reward of a response of `lengths` (B,) tokens:

        R_length(y) = 0                                   if |y| <= L_max - L_cache
                    = ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max
                    = -1                                  if |y| > L_max

    times `penalty`, with L_max = `max_new_tokens` and L_cache = `buffer`: 0 up to
    max_new_tokens - buffer tokens, then falling linearly to -penalty at max_new_tokens.
    `buffer` = 0 turns it off (all zeros). Returns (B,) float32.
    """
    if not 0 <= buffer < max_new_tokens:
        raise ValueError(f"overlong buffer={buffer} must be in [0, max_new_tokens={max_new_tokens})")
    lengths = lengths.to(torch.float32)
    if buffer == 0:
        return torch.zeros_like(lengths)
    over = (lengths - (max_new_tokens - buffer)).clamp(min=0.0, max=float(buffer))  # tokens into the buffer
    return -penalty * over / buffer


def groups_with_signal(rewards: torch.Tensor, group_size: int, atol: float = 1e-6) -> torch.Tensor:
    """Which groups have rewards that are not all equal: (B,) prompt-major rewards, G = `group_size`
    contiguous samples per prompt -> (B / G,) bool. "Equal" is within `atol` of the group's mean
    (a float reward such as 0.1 * format + correct is not compared bit for bit)."""
    grouped = rewards.view(-1, group_size)  # (B / G, G)
    spread = (grouped - grouped.mean(-1, keepdim=True)).abs().amax(-1)  # (B / G,)
    return spread > atol
