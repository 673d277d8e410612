"""The reward-model stage: a scalar-head model trained with the Bradley-Terry loss, multi-rank.

    1. pairs: (prompt, chosen, rejected[, margin]) records and every ordered pair of each ranking
       (T-REX), as `PreferencePair`s (rlhf_dist.data.preferences)
    2. every step: a random mini-batch of pairs, sharded over the ranks
    3. every `eval_every` steps and at the end: held-out pairwise accuracy and mean margin
    4. save in HF sequence-classification format (`reward.model.path` accepts it)

With reward.model.ensemble=K the stage trains K members one after the other, each on a bootstrap
resample of the pairs with its own seed (head initialisation, mini-batch order), into
out_dir/member_<k>, and writes out_dir/ensemble.json: the reward actor then serves their mean
score minus reward.model.uncertainty_coef times their spread.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Callable

import torch

from rlhf_dist.runtime.ds_group import DSGroupSpec
from rlhf_dist.actors.rm_trainer import RewardModelTrainerActor
from rlhf_dist.data.batch import Batch
from rlhf_dist.data.records import render_prompt
from rlhf_dist.errors import DatasetError
from rlhf_dist.models.hf import load_tokenizer
from rlhf_dist.models.scalar_reward import reward_model_inputs, write_ensemble
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


def run_reward_model_ensemble(model_path: str, out_dir: str, train: list, held_out: list, spec: DSGroupSpec,
                              steps: int, eval_every: int, members: int, seed: int = 0,
                              log: Callable[[str], None] = print) -> dict[str, float]:
    """`members` reward models (one: `run_reward_model` itself). Returns the members' mean of
    every metric, each member's held-out accuracy (rm/member<k>/eval_accuracy) and, with held-out
    pairs, the ensemble mean's accuracy (rm/ensemble_eval_accuracy)."""
    if members == 1:
        return run_reward_model(model_path, out_dir, train, held_out, spec, steps, eval_every, seed, log)
    histories, names = [], [f"member_{k}" for k in range(members)]
    for k, name in enumerate(names):
        rng = random.Random(f"reward-model-bootstrap|{seed}|{k}")
        resample = [train[rng.randrange(len(train))] for _ in train]
        log(f"[reward_model] ensemble member {k + 1}/{members}: a bootstrap resample of {len(train)} pairs")
        histories.append(run_reward_model(model_path, str(Path(out_dir) / name), resample, held_out,
                                          dataclasses.replace(spec, seed=spec.seed + k), steps,
                                          eval_every, seed + k, log))
    pairs = held_out or train[:SCALE_PAIRS]
    raw = member_scores(out_dir, names, pairs)  # (K, 2N): each pair's chosen, then its rejected
    scales = member_scales(raw, SCALE_PAIRS)
    write_ensemble(out_dir, names, scales)
    summary = {key: sum(h[key] for h in histories) / members for key in histories[0]}
    for k, history in enumerate(histories):
        summary[f"rm/member{k}/eval_accuracy"] = history["rm/eval_accuracy_end"]
    if held_out:
        summary["rm/ensemble_eval_accuracy"] = ensemble_accuracy(raw, scales)
        log(f"[reward_model] ensemble of {members}: held-out accuracy "
            f"{summary['rm/ensemble_eval_accuracy']:.4f} (members' mean {summary['rm/eval_accuracy_end']:.4f})")
    return summary


SCALE_PAIRS = 2000  # pairs whose texts put the members on one scale


def member_scores(out_dir: str, names: list[str], pairs: list) -> torch.Tensor:
    """(K, 2N) raw scores of each of the K members: the N pairs' chosen texts, then their rejected
    ones. Scored once on the driver and shared by member_scales and ensemble_accuracy: right for
    the models this machine trains, slow for billion-parameter ones."""
    from rlhf_dist.actors.reward import ModelScorer

    records = [{"prompt": p.prompt} for p in pairs] * 2
    texts = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    return torch.stack([torch.tensor(ModelScorer(str(Path(out_dir) / name)).score(records, texts)[0])
                        for name in names])


def member_scales(raw: torch.Tensor, most: int) -> list[tuple[float, float]]:
    """(mean, std) of each member's scores over both texts of the first `most` pairs: what puts the
    members on one scale before their spread is read as uncertainty."""
    half = raw.shape[1] // 2
    both = torch.cat([raw[:, :min(most, half)], raw[:, half:half + min(most, half)]], dim=1)
    return [(row.mean().item(), max(row.std().item(), 1e-6)) for row in both]


def ensemble_accuracy(raw: torch.Tensor, scales: list[tuple[float, float]]) -> float:
    """The share of pairs whose chosen text the ensemble's mean score (members standardised by
    `scales`, as the reward actor serves them, no uncertainty penalty) ranks higher; ties count
    half."""
    offsets = torch.tensor([offset for offset, _ in scales])[:, None]
    spreads = torch.tensor([scale for _, scale in scales])[:, None]
    mean = ((raw - offsets) / spreads).mean(0)
    half = raw.shape[1] // 2
    chosen, rejected = mean[:half], mean[half:]
    return ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean().item()
