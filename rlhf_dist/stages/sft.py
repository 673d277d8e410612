"""The SFT stage: supervised fine-tuning on (prompt, completion) demonstrations, multi-rank.

    1. tokenize: prompt (left-padded) + completion + eos (right-padded); loss on completion tokens
    2. every step: a random mini-batch, sharded over the ranks (`SFTActor.train_step`)
    3. every `eval_every` steps and at the end: held-out loss (token-weighted mean NLL)
    4. save the model in HF format (what `model.path` accepts)

The default RL job's warm-up is this stage run on the built-in task's demonstrations.
"""

from __future__ import annotations

from typing import Callable

from rlhf_dist.runtime.ds_group import DSGroupSpec
from rlhf_dist.actors.sft import SFTActor
from rlhf_dist.data.batch import Batch, demonstration_batch
from rlhf_dist.errors import DatasetError
from rlhf_dist.models.hf import load_tokenizer
from rlhf_dist.stages.loop import run_supervised

KEYS = ["input_ids", "attention_mask", "response_mask"]


def run_sft(model_path: str, out_dir: str, train: list[tuple[str, str]], held_out: list[tuple[str, str]],
            spec: DSGroupSpec, steps: int, eval_every: int, seed: int = 0,
            log: Callable[[str], None] = print) -> dict[str, float]:
    """Train `steps` optimizer steps of `spec.mini_batch_size` pairs; returns the loss history."""
    if not train:
        raise DatasetError("the SFT stage got no training demonstrations.")
    tokenizer = load_tokenizer(model_path)
    held_out = held_out[: len(held_out) - len(held_out) % spec.world_size]  # equal shards
    eval_batch = demonstration_batch(tokenizer, *zip(*held_out)) if held_out else None

    def make_batch(rows: list[int]) -> Batch:
        return demonstration_batch(tokenizer, [train[i][0] for i in rows], [train[i][1] for i in rows])

    def evaluate(group) -> dict[str, float]:
        return {"sft/eval_loss": _held_out_loss(group, eval_batch, spec)}

    return run_supervised("sft", SFTActor, model_path, out_dir, spec, steps, eval_every, len(train),
                          make_batch, KEYS, evaluate, "sft/loss", seed, log)


def _held_out_loss(group, batch: Batch | None, spec: DSGroupSpec) -> float:
    if batch is None:
        return float("nan")
    parts = group.wait(group.call_on_shards("eval_loss", batch, spec.micro_batch_size), "sft eval", 600)
    return sum(nll for nll, _ in parts) / max(1.0, sum(count for _, count in parts))
