"""Starting the actor groups of an RL run from its config: rollout engines, policy learner ranks,
reward, reference and critic ranks, and the weight sync between learners and engines.

This is where the config becomes actor arguments. Each `start_*` returns once the group's actors
exist; they load their models in their own processes, so `start_rl_actors` creates every group
first and then waits for them (`wait_ready`, and the DeepSpeed init refs `start_ds_group` returns):
engines, reference, learners and critics load concurrently (on a shared GPU the engines first:
`engines_start_alone`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

from rlhf_dist.runtime.cpu import parse_cores, vllm_binding
from rlhf_dist.actors.critic import CriticActor
from rlhf_dist.runtime.ds_group import DSGroupSpec, start_ds_group
from rlhf_dist.runtime.files import ModelDir, current_node_id, model_dir
from rlhf_dist.runtime.group import ActorGroup
from rlhf_dist.actors.learner import LearnerActor
from rlhf_dist.actors.reference import ReferenceActor
from rlhf_dist.actors.reward import RewardActor
from rlhf_dist.actors.rollout import RolloutActor
from rlhf_dist.weights.sync import WeightSync
from rlhf_dist.config import critic_micro_batch_size, response_budget
from rlhf_dist.models.lora import resolve_lora


@dataclass
class RLActors:
    """The actor groups of an RL run, every one ready, and the weight sync prepared."""

    model: ModelDir  # the policy's model dir, as the actors get it
    engines: ActorGroup
    learners: ActorGroup
    reward: ActorGroup
    reference: Optional[ActorGroup]
    critics: Optional[ActorGroup]
    weights: WeightSync
    num_params: int  # the policy's
    timings: dict[str, float]  # startup/total_s, startup/engine_init_s, ...
    lora_sync: Optional[str] = None  # with LoRA, what the engines get: "merged" or "adapter"


def start_rl_actors(cfg, model_path: str, reward_spec: str, use_reference: bool, use_critic: bool) -> RLActors:
    """Create every group, wait until each is ready, prepare the weight sync and write
    run_dir/actors.json. On any failure the groups created so far are killed, then the error
    propagates."""
    cl, ro = cfg.cluster, cfg.rollout
    start, groups = time.perf_counter(), {}
    try:
        # model dirs go to actors on other nodes through Ray unless under cluster.shared_dir
        model = model_dir(model_path, cl.shared_dir, cl.ship_models)
        lora_sync = lora_sync_mode(cfg, model.path)
        groups["engines"] = start_engines(cfg, model, lora_sync)
        engine_info = wait_ready(groups["engines"], ro.init_timeout_s) if engines_start_alone(cfg) else None
        groups["learners"], init_refs = start_learners(cfg, model, lora_sync)
        groups["reward"] = start_reward(cfg, reward_spec)
        if use_reference:
            groups["reference"] = start_reference(cfg, model)
        if use_critic:
            groups["critics"], critic_refs = start_critics(cfg, model)
        engine_info = engine_info or wait_ready(groups["engines"], ro.init_timeout_s)
        wait_ready(groups["reward"], 120.0)
        if use_reference:
            wait_ready(groups["reference"], cfg.learner.init_timeout_s)
        learner_info = groups["learners"].wait(init_refs, "learner start-up (DeepSpeed init)",
                                               cfg.learner.init_timeout_s)
        if use_critic:
            groups["critics"].wait(critic_refs, "critic start-up (DeepSpeed init)", cfg.critic.init_timeout_s)
        ready = time.perf_counter()
        weights = WeightSync(groups["learners"], groups["engines"], ro, cl.device, cfg.learner.zero_stage)
        weights.prepare()
        if cfg.model.lora.rank > 0 and (cfg.model.lora.path or lora_sync == "adapter"):
            weights.sync()  # the engines hold the base: add the adapter (merged, or installed as one)
        write_placement(os.path.join(cfg.trainer.run_dir, "actors.json"), list(groups.values()))
    except BaseException:
        kill_all(list(groups.values()))
        raise
    timings = {"startup/total_s": time.perf_counter() - start,
               "startup/engine_init_s": max(e["init_s"] for e in engine_info),
               "startup/learner_init_s": max(l["init_s"] for l in learner_info),
               "startup/weight_sync_prepare_s": time.perf_counter() - ready}
    return RLActors(model, groups["engines"], groups["learners"], groups["reward"], groups.get("reference"),
                    groups.get("critics"), weights, learner_info[0]["num_params"], timings, lora_sync)


def lora_sync_mode(cfg, model_path: str) -> Optional[str]:
    """With LoRA, what the engines get after each update: model.lora.sync, except that "adapter"
    falls back to "merged", saying so, when vLLM serves no adapters for the model's architecture."""
    lora = cfg.model.lora
    if lora.rank == 0:
        return None
    if lora.sync != "adapter":
        return "merged"
    from rlhf_dist.weights.adapter import serves_adapters

    served, arch = serves_adapters(model_path)
    if not served:
        print(f"[lora] model.lora.sync=adapter: vLLM serves no LoRA adapters for {arch} (its model class "
              "does not implement SupportsLoRA), so the engines get the merged weights after each "
              "update instead (model.lora.sync=merged)", flush=True)
        return "merged"
    return "adapter"


def engines_start_alone(cfg) -> bool:
    """Whether the engines must be ready before any other actor starts: on a GPU they share (a
    fraction of one GPU each), vLLM's memory profiling counts what other processes allocate or free
    meanwhile as its own and fails ("Error in memory profiling"). Elsewhere all groups load at once."""
    return cfg.cluster.device == "cuda" and cfg.cluster.gpus_per_engine < 1


def start_engines(cfg, model: ModelDir, lora_sync: Optional[str] = None) -> ActorGroup:
    """rollout.num_engines vLLM engines, engine i seeded rollout.seed + i; with adapter sync they
    serve one LoRA adapter of the policy's rank."""
    cl, ro = cfg.cluster, cfg.rollout
    num_engines = ro.num_engines
    tp, cores = ro.tensor_parallel_size, parse_cores(cl.engine_cores)
    # cluster.engine_cores: each engine its own equal share of them; else every engine shares
    # the node's cores (threads divided by the engines and their workers)
    per_engine = [cores[i * (len(cores) // num_engines):(i + 1) * (len(cores) // num_engines)]
                  for i in range(num_engines)] if cores else [None] * num_engines

    def placement(engine_cores):  # vLLM's auto-binding gives each worker its own NUMA node: one only
        bind = vllm_binding(engine_cores, tp, num_engines == 1 and tp == 1) if cl.device == "cpu" else "auto"
        return dict(cpu_threads_bind=bind, cpu_cores=engine_cores,
                    threads_share=tp * (num_engines if engine_cores is None else 1))

    engine_kwargs = dict(
        model_path=model, dtype=ro.dtype,
        max_model_len=response_budget(cfg) + cfg.task.max_prompt_len,
        tensor_parallel_size=ro.tensor_parallel_size,
        gpu_memory_utilization=ro.gpu_memory_utilization,
        kv_cache_gb=ro.kv_cache_gb, enforce_eager=ro.enforce_eager,
        device=cl.device, sync_transport=ro.sync_transport,
        sleep_level=ro.sleep_level, ignore_eos=ro.ignore_eos,
        lora_rank=cfg.model.lora.rank if lora_sync == "adapter" else 0)
    return ActorGroup(
        "rollout", RolloutActor, num_engines, cl.cpus_per_engine, cl.gpus_per_engine,
        cl.placement_timeout_s,
        [dict(engine_kwargs, seed=ro.seed + i, **placement(per_engine[i])) for i in range(num_engines)],
        resources=dict(cl.engine_resources or {}))


def start_learners(cfg, model: ModelDir, lora_sync: Optional[str] = None) -> tuple[ActorGroup, list]:
    """The policy's DeepSpeed ranks, and their init refs; with model.lora.rank > 0 they train
    LoRA adapters (rlhf_dist/models/lora.py) and publish them as `lora_sync` says."""
    cl = cfg.cluster
    lora = resolve_lora(cfg.model.lora, model.path) if cfg.model.lora.rank > 0 else None
    if lora is not None:
        lora = replace(lora, sync=lora_sync or "merged")
    return start_ds_group("learner", LearnerActor, model, DSGroupSpec(
        cfg.learner.world_size, cfg.learner.zero_stage, cfg.learner.micro_batch_size,
        optim=asdict(cfg.learner.optim), num_cpus=cl.cpus_per_learner, num_gpus=cl.gpus_per_learner,
        resources=dict(cl.learner_resources or {}), lora=lora, **_ds_common(cfg)))


def start_critics(cfg, model: ModelDir) -> tuple[ActorGroup, list]:
    """The critic's DeepSpeed ranks (PPO), from critic.model_path or else the policy's model; with
    critic.lora.rank > 0 they train LoRA adapters and the value head only."""
    cl = cfg.cluster
    lora = None
    if cfg.critic.lora.rank > 0:
        lora = replace(resolve_lora(cfg.critic.lora, cfg.critic.model_path or model.path, "critic.lora"),
                       task_type="TOKEN_CLS")
    return start_ds_group(
        "critic", CriticActor, cfg.critic.model_path or model, DSGroupSpec(
            cfg.critic.world_size, cfg.critic.zero_stage, critic_micro_batch_size(cfg),
            optim=asdict(cfg.critic.optim), num_cpus=cl.cpus_per_critic,
            num_gpus=cl.gpus_per_critic, resources=dict(cl.critic_resources or {}), lora=lora,
            **_ds_common(cfg)))


def _ds_common(cfg) -> dict[str, Any]:
    """DSGroupSpec values the policy and the critic share: both take the same mini-batches."""
    cl = cfg.cluster
    seqs = cfg.trainer.prompts_per_step * cfg.rollout.n_samples_per_prompt
    optimizer_steps = cfg.trainer.total_steps * cfg.algo.ppo_epochs * (seqs // cfg.learner.mini_batch_size)
    return dict(mini_batch_size=cfg.learner.mini_batch_size, total_optimizer_steps=optimizer_steps,
                device=cl.device, backend=cfg.learner.backend, bf16=cfg.model.dtype == "bfloat16",
                gradient_checkpointing=cfg.model.gradient_checkpointing,
                placement_timeout_s=cl.placement_timeout_s, init_timeout_s=cfg.learner.init_timeout_s,
                shared_dir=cl.shared_dir, ship_models=cl.ship_models, seed=cfg.trainer.seed,
                cpu_cores=parse_cores(cl.learner_cores))


def start_reward(cfg, reward_spec: str) -> ActorGroup:
    """One reward actor: the reward function `reward_spec` and/or the reward model."""
    cl, rw = cfg.cluster, cfg.reward
    return ActorGroup("reward", RewardActor, 1, cl.cpus_per_aux, cl.gpus_per_aux,
                      cl.placement_timeout_s, [dict(
                          fn_spec=reward_spec,
                          model_path=model_dir(rw.model.path, cl.shared_dir, cl.ship_models),
                          fn_weight=rw.fn_weight, model_weight=rw.model_weight,
                          normalize=rw.normalize, clip=rw.clip,
                          batch_size=rw.model.batch_size, device=cl.device,
                          fallback_score=rw.fallback_score, ensemble=rw.model.ensemble,
                          uncertainty_coef=rw.model.uncertainty_coef)],
                      resources=dict(cl.aux_resources or {}))


def start_reference(cfg, model: ModelDir) -> ActorGroup:
    """One reference actor: the frozen initial policy's logprobs."""
    cl = cfg.cluster
    return ActorGroup(
        "reference", ReferenceActor, 1, cl.cpus_per_aux, cl.gpus_per_aux,
        cl.placement_timeout_s,
        [dict(model_path=model, dtype=cfg.model.dtype, device=cl.device,
              cpu_cores=parse_cores(cl.learner_cores))], resources=dict(cl.aux_resources or {}))


def wait_ready(group: ActorGroup, timeout_s: float) -> list:
    return group.wait(group.call("ready"), f"{group.name} start-up", timeout_s)


def write_placement(path: str, groups: list[Optional[ActorGroup]]) -> None:
    """`path` (run_dir/actors.json): the node of every actor and of the driver (multi-node checks)."""
    placement = {"driver_node_id": current_node_id(),
                 "actors": [row for g in groups if g is not None for row in g.placement()]}
    with open(path, "w") as f:
        json.dump(placement, f, indent=1)


def kill_all(groups: list[Optional[ActorGroup]]) -> None:
    """Best effort: every actor and placement group of `groups` (after a failure too)."""
    for group in groups:
        if group is not None:
            try:
                group.kill()
            except Exception:  # noqa: BLE001 - best-effort cleanup after a failure
                pass
