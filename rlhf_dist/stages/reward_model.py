"""The reward-model stage: a scalar-head model trained with the Bradley-Terry loss, multi-rank.

    1. pairs: (prompt, chosen, rejected[, margin]) records and every ordered pair of each ranking
       (T-REX), as `PreferencePair`s (rlhf_dist.data.preferences)
    2. every step: a random mini-batch of pairs, sharded over the ranks
    3. every `eval_every` steps and at the end: held-out pairwise accuracy and mean margin
    4. save in HF sequence-classification format (`reward.model.path` accepts it)
"""

from __future__ import annotations

from typing import Callable

import torch

from rlhf_dist.runtime.ds_group import DSGroupSpec
from rlhf_dist.actors.rm_trainer import RewardModelTrainerActor
from rlhf_dist.data.batch import Batch
from rlhf_dist.data.records import render_prompt
from rlhf_dist.errors import DatasetError
from rlhf_dist.models.hf import load_tokenizer
from rlhf_dist.models.scalar_reward import reward_model_inputs
from rlhf_dist.stages.loop import run_supervised

KEYS = ["chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask", "margin"]


def pair_batch(tokenizer, pairs: list) -> Batch:
    """Chosen and rejected texts of each pair, left-padded to one common width."""
    prompts = [render_prompt(p.prompt, tokenizer) for p in pairs]
    chosen_ids, chosen_mask = reward_model_inputs(tokenizer, prompts, [p.chosen for p in pairs])
    rejected_ids, rejected_mask = reward_model_inputs(tokenizer, prompts, [p.rejected for p in pairs],
                                                      width=chosen_ids.shape[1])
    if rejected_ids.shape[1] > chosen_ids.shape[1]:
        chosen_ids, chosen_mask = reward_model_inputs(tokenizer, prompts, [p.chosen for p in pairs],
                                                      width=rejected_ids.shape[1])
    margin = torch.tensor([float(p.margin) for p in pairs])
    return Batch({"chosen_ids": chosen_ids, "chosen_mask": chosen_mask, "rejected_ids": rejected_ids,
                  "rejected_mask": rejected_mask, "margin": margin}, prompt_width=0)


def run_reward_model(model_path: str, out_dir: str, train: list, held_out: list, spec: DSGroupSpec,
                     steps: int, eval_every: int, seed: int = 0,
                     log: Callable[[str], None] = print) -> dict[str, float]:
    """Train `steps` optimizer steps of `spec.mini_batch_size` pairs; returns the eval history."""
    if not train:
        raise DatasetError("the reward-model stage got no preference pairs.")
    tokenizer = load_tokenizer(model_path)
    held_out = held_out[: len(held_out) - len(held_out) % spec.world_size]
    eval_batch = pair_batch(tokenizer, held_out) if held_out else None

    def make_batch(rows: list[int]) -> Batch:
        return pair_batch(tokenizer, [train[i] for i in rows])

    def evaluate(group) -> dict[str, float]:
        return _evaluate(group, eval_batch, spec)

    return run_supervised("reward_model", RewardModelTrainerActor, model_path, out_dir, spec, steps,
                          eval_every, len(train), make_batch, KEYS, evaluate, "rm/loss", seed, log)


def _evaluate(group, batch: Batch | None, spec: DSGroupSpec) -> dict[str, float]:
    if batch is None:
        return {"rm/eval_accuracy": float("nan"), "rm/eval_margin": float("nan")}
    parts = group.wait(group.call_on_shards("evaluate", batch, spec.micro_batch_size), "reward-model eval", 600)
    pairs = sum(p["pairs"] for p in parts)
    return {"rm/eval_accuracy": sum(p["correct"] for p in parts) / pairs,
            "rm/eval_margin": sum(p["margin"] for p in parts) / pairs}
