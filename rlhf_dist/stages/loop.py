"""The supervised training loop that the SFT and reward-model stages share.

    start the DeepSpeed group -> evaluate -> [sample a mini-batch, shard it over the ranks,
    train_step; every eval_every steps evaluate] -> save in HF format -> stop the group
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable

import torch

from rlhf_dist.runtime.cpu import parse_cores
from rlhf_dist.runtime.ds_group import DSGroupSpec, merge_rank_metrics, start_ds_group
from rlhf_dist.runtime.files import bring_back
from rlhf_dist.runtime.group import ActorGroup
from rlhf_dist.data.batch import Batch, shard_minibatches


def stage_spec(cfg, batch_size: int, micro_batch_size: int, lr: float, steps: int, scheduler: str) -> DSGroupSpec:
    """A stage's DeepSpeed group: the policy learner's ranks, ZeRO stage and resources."""
    optim = dict(lr=lr, weight_decay=0.0, betas=[0.9, 0.999], eps=1e-8, grad_clip=1.0,
                 scheduler=scheduler, warmup_steps=0, min_lr_ratio=0.1)
    return DSGroupSpec(cfg.learner.world_size, cfg.learner.zero_stage, micro_batch_size, batch_size, optim,
                       steps, cfg.cluster.cpus_per_learner, cfg.cluster.gpus_per_learner,
                       device=cfg.cluster.device, backend=cfg.learner.backend,
                       placement_timeout_s=cfg.cluster.placement_timeout_s,
                       init_timeout_s=cfg.learner.init_timeout_s,
                       resources=dict(cfg.cluster.learner_resources or {}), shared_dir=cfg.cluster.shared_dir,
                       cpu_cores=parse_cores(cfg.cluster.learner_cores),
                       ship_models=cfg.cluster.ship_models)


def run_supervised(name: str, actor_cls: type, model_path: str, out_dir: str, spec: DSGroupSpec,
                   steps: int, eval_every: int, num_train: int, make_batch: Callable[[list[int]], Batch],
                   keys: list[str], evaluate: Callable[[ActorGroup], dict[str, float]],
                   loss_key: str, seed: int = 0, log: Callable[[str], None] = print) -> dict[str, float]:
    """Train `steps` optimizer steps of `spec.mini_batch_size` examples drawn from `num_train`.

    `make_batch(rows)` builds the Batch of those training rows; `evaluate(group)` returns held-out
    metrics. Returns them at the start (`*_start`) and the end (`*_end`) plus the last train loss.
    """
    group, init_refs = start_ds_group(name, actor_cls, model_path, spec)
    try:
        group.wait(init_refs, f"{name} start-up (DeepSpeed init)", spec.init_timeout_s)
        rng, start = random.Random(seed), time.perf_counter()
        evaluation = evaluate(group)
        history = {f"{k}_start": v for k, v in evaluation.items()}
        log(f"[{name}] step    0/{steps} | " + _fmt(evaluation))
        for step in range(1, steps + 1):
            batch = make_batch(rng.sample(range(num_train), min(spec.mini_batch_size, num_train)))
            parts = shard_minibatches(batch, keys, [torch.arange(len(batch))], len(batch), spec.world_size)
            results = group.wait(group.call_each("train_step", [(part, step) for part in parts]),
                                 f"{name} train_step", 600)
            metrics = merge_rank_metrics(results, (loss_key,))
            if step % eval_every == 0 or step == steps:
                evaluation = evaluate(group)
                log(f"[{name}] step {step:>4}/{steps} | train loss {metrics[loss_key]:.4f} | "
                    f"{_fmt(evaluation)} | {time.perf_counter() - start:.1f}s")
        history.update({f"{k}_end": v for k, v in evaluation.items()})
        history[f"{loss_key.split('/')[0]}/train_loss_end"] = metrics[loss_key]
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        group.run("save_pretrained", str(out_dir), timeout_s=600)
        bring_back(group, str(out_dir), spec.shared_dir, spec.ship_models)  # rank 0's node -> here
        return history
    finally:
        group.kill()


def _fmt(metrics: dict[str, float]) -> str:
    return " | ".join(f"{k.split('/')[-1].replace('_', ' ')} {v:.4f}" for k, v in metrics.items())
