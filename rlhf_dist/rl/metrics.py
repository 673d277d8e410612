"""What an RL step and an eval report about their samples, computed from tensors and lists (no
actors, no config): reward and response statistics, eval scores, the sample rows the monitor shows.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from rlhf_dist.data.messages import Sample, Scores


@contextmanager
def timed(timing: dict[str, float], phase: str) -> Iterator[None]:
    """Add the block's wall time to timing["timing/<phase>_s"] (a phase may be timed in parts)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        key = f"timing/{phase}_s"
        timing[key] = timing.get(key, 0.0) + time.perf_counter() - start


def rollout_metrics(rewards: torch.Tensor, response_mask: torch.Tensor, samples: list[Sample],
                    group_size: int, timing: dict[str, float]) -> dict[str, float]:
    """reward/*, response/*, then `timing` and the step's throughput. `rewards` (B,), `response_mask`
    (B, T), B = prompts x `group_size` samples each, prompt-major."""
    lengths = response_mask.sum(-1)  # (B,)
    group = rewards.view(-1, group_size)  # (B / G, G)
    truncated = sum(s.finish_reason == "length" for s in samples) / len(samples)
    return {
        "reward/mean": rewards.mean().item(), "reward/std": rewards.std().item(),
        "reward/max": rewards.max().item(), "reward/min": rewards.min().item(),
        "reward/frac_groups_all_equal": (group.std(-1) == 0).float().mean().item(),
        "response/length_mean": lengths.mean().item(), "response/length_max": lengths.max().item(),
        "response/truncated_frac": truncated,
        **timing,
        "throughput/tokens_per_s": lengths.sum().item() / timing["timing/step_s"],
    }


EPISODE_COUNTS = ("turns", "tool_calls", "tool_errors", "env_errors", "truncated", "policy_tokens",
                  "observation_tokens", "turn_reward_sum")


def episode_metrics(samples: list[Sample], prefix: str = "episode") -> dict[str, float]:
    """Means over multi-turn episodes (rollout.env) of their counters: turns, tool calls, tool and
    environment errors, truncated episodes, policy vs observation tokens, turn rewards; {} without."""
    episodes = [s.episode for s in samples if s.episode is not None]
    if not episodes:
        return {}
    return {f"{prefix}/{key}_mean": sum(e[key] for e in episodes) / len(episodes) for key in EPISODE_COUNTS}


def eval_metrics(scored: Scores, samples: list[Sample], time_s: float) -> dict[str, float]:
    """eval/* from the reward actor's reply `scored` ({"reward", "rule", "model"} lists) on greedy
    samples; solved means a rule (gold) score of 1."""
    rewards = torch.tensor(scored.reward)
    rule = torch.tensor(scored.rule) if scored.rule is not None else rewards
    metrics = {
        "eval/reward_mean": rewards.mean().item(),
        "eval/solved_frac": (rule >= 1.0 - 1e-6).float().mean().item(),  # by the rule (gold)
        # the policy's tokens (a multi-turn episode's observations are in episode/observation_tokens)
        "eval/length_mean": sum(sum(s.loss_mask) if s.loss_mask else len(s.token_ids) for s in samples) / len(samples),
        "eval/time_s": time_s,
    }
    if scored.model is not None:  # learned reward beside the rule (gold) score
        metrics["eval/model_mean"] = sum(scored.model) / len(scored.model)
        metrics["eval/rule_mean"] = rule.mean().item()
    metrics.update(episode_metrics(samples, "eval/episode"))
    if "reward/model_std_mean" in scored.metrics:  # an ensemble's disagreement on these samples
        metrics["eval/model_std_mean"] = scored.metrics["reward/model_std_mean"]
    return metrics


def sample_rows(records: list[dict], texts: list[str], rewards: torch.Tensor, num: int) -> list[dict[str, Any]]:
    """`num` (prompt, completion, reward) rows spread evenly over the batch."""
    step = max(1, len(texts) // num)
    return [{"prompt": records[i]["prompt"], "completion": texts[i], "reward": float(rewards[i])}
            for i in range(0, len(texts), step)][:num]
