"""Starting a group of DeepSpeed ranks (policy learner, critic, SFT, reward-model trainer).

Every stage that trains a model uses this one function, so process-group set-up, batch-size
arithmetic and deadlines are the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from rlhf_dist.runtime.files import ModelDir, model_dir
from rlhf_dist.runtime.group import ActorGroup

# the response tokens a rank's stats averaged over (DeepSpeedRank.run_minibatches): merge_rank_metrics
# weights the ranks by it
STATS_WEIGHT = "perf/response_tokens_per_rank"


@dataclass
class DSGroupSpec:
    """Plain values a DeepSpeed group needs (read once from config by the caller)."""

    world_size: int
    zero_stage: int
    micro_batch_size: int  # per rank per forward/backward
    mini_batch_size: int  # sequences (or pairs) per optimizer step, over all ranks
    optim: dict[str, Any]  # OptimConfig as a dict
    total_optimizer_steps: int
    num_cpus: float
    num_gpus: float
    device: str = "cpu"
    backend: str = "auto"  # auto | gloo | nccl
    bf16: bool = False
    gradient_checkpointing: bool = False
    placement_timeout_s: float = 60.0
    init_timeout_s: float = 600.0
    seed: int = 0  # torch's seed while the model is built (new heads are initialised at random)
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per rank
    shared_dir: Optional[str] = None  # cluster.shared_dir (rlhf_dist.runtime.files)
    ship_models: bool = False  # cluster.ship_models
    cpu_cores: Optional[list[int]] = None  # cluster.learner_cores, parsed (rlhf_dist.runtime.cpu)
    lora: Any = None  # a rlhf_dist.models.lora.LoraSpec: adapters, the only weights trained; None = all


def start_ds_group(name: str, actor_cls: type, model_path: Union[str, ModelDir],
                   spec: DSGroupSpec) -> tuple[ActorGroup, list]:
    """Create `spec.world_size` ranks of `actor_cls` and start DeepSpeed on them. A ModelDir
    path is shipped to ranks on other nodes (rlhf_dist.runtime.files).

    Returns the group and the init refs (wait on them with `group.wait`, so several groups can
    load concurrently).
    """
    if isinstance(model_path, str):
        model_path = model_dir(model_path, spec.shared_dir, spec.ship_models)
    # an adapter to start from (model.lora.path) travels to other nodes as the model dir does
    lora_path = spec.lora.path if spec.lora is not None else None
    if lora_path is not None:
        lora_path = model_dir(lora_path, spec.shared_dir, spec.ship_models)
    group = ActorGroup(name, actor_cls, spec.world_size, spec.num_cpus, spec.num_gpus,
                       spec.placement_timeout_s,
                       [dict(rank=r, world_size=spec.world_size, model_path=model_path, device=spec.device,
                             cpu_cores=spec.cpu_cores, lora=spec.lora, lora_path=lora_path)
                        for r in range(spec.world_size)],
                       resources=spec.resources)
    master_addr, master_port = group.run("address", timeout_s=60)[0]
    backend = spec.backend
    if backend == "auto":
        backend = "nccl" if spec.device == "cuda" else "gloo"
    grad_accum = spec.mini_batch_size // spec.world_size // spec.micro_batch_size
    refs = group.call("init", master_addr, master_port, backend, spec.zero_stage, spec.micro_batch_size,
                      grad_accum, spec.optim, spec.total_optimizer_steps, spec.bf16,
                      spec.gradient_checkpointing, spec.init_timeout_s, spec.seed)
    return group, refs


def merge_rank_metrics(results: list[dict[str, float]], additive: tuple[str, ...]) -> dict[str, float]:
    """One dict from every rank's: keys starting with `additive` (each rank's share of a
    global-normalised sum) are summed, `*_max` / `*_min` keep the extreme, the rest average,
    weighted by each rank's response tokens where the ranks report them (`STATS_WEIGHT`: a stat
    such as clip_frac is a mean over tokens, and the shards of a mini-batch hold different counts)."""
    weight_key = next((k for k in results[0] if k.endswith(STATS_WEIGHT)), None)
    weights = [r[weight_key] for r in results] if weight_key else [1.0] * len(results)
    if sum(weights) <= 0:
        weights = [1.0] * len(results)
    merged = {}
    for key in results[0]:
        values = [r[key] for r in results]
        if key.endswith("_max"):
            merged[key] = max(values)
        elif key.endswith("_min"):
            merged[key] = min(values)
        elif key.startswith(additive):
            merged[key] = sum(values)
        elif key == weight_key or key.startswith(("perf/", "optim/")) or "/perf/" in key or "/optim/" in key:
            merged[key] = sum(values) / len(values)  # per-rank figures, not means over tokens
        else:
            merged[key] = sum(w * v for w, v in zip(weights, values)) / sum(weights)
    return merged
