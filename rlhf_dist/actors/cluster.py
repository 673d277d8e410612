"""Connecting to Ray and checking, before any actor starts, that the actors fit."""

from __future__ import annotations

import os

from rlhf_dist.config import uses_critic, uses_reference
from rlhf_dist.errors import ClusterResourceError


def init_ray(cluster) -> None:
    """Local Ray by default (the embedded laptop mode); `cluster.address=auto` joins a cluster."""
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": quiet_env()}
    if cluster.address is None:
        ray.init(num_cpus=cluster.num_cpus or os.cpu_count(), include_dashboard=False,
                 runtime_env=env, log_to_driver=True, configure_logging=True,
                 logging_level="WARNING")
    else:
        ray.init(address=cluster.address, runtime_env=env, logging_level="WARNING")


def quiet_env() -> dict[str, str]:
    """Actor environment: keep the console to our progress lines and real errors.

    vLLM otherwise logs two "Failed to load weights" warnings per sync (rotary and tied lm_head
    have no weights to load), transformers draws a progress bar per model load, and torch warns
    about deprecated collectives inside DeepSpeed. Set RLHF_DIST_VERBOSE=1 to see all of it.
    """
    if os.environ.get("RLHF_DIST_VERBOSE") == "1":
        return {"TOKENIZERS_PARALLELISM": "false"}
    return {
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_LOGGING_LEVEL": "ERROR",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TQDM_DISABLE": "1",
        "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning",
        "RAY_DEDUP_LOGS": "1",
    }


def required_resources(cfg) -> dict[str, dict[str, float]]:
    cl = cfg.cluster
    need = {
        f"{cfg.rollout.num_engines} rollout engine(s)": {
            "CPU": cfg.rollout.num_engines * cl.cpus_per_engine,
            "GPU": cfg.rollout.num_engines * cl.gpus_per_engine},
        f"{cfg.learner.world_size} learner rank(s)": {
            "CPU": cfg.learner.world_size * cl.cpus_per_learner,
            "GPU": cfg.learner.world_size * cl.gpus_per_learner},
        "reward actor": {"CPU": cl.cpus_per_aux, "GPU": 0.0},
    }
    if uses_reference(cfg):
        need["reference actor"] = {"CPU": cl.cpus_per_aux, "GPU": cl.gpus_per_aux}
    if uses_critic(cfg):
        need[f"{cfg.critic.world_size} critic rank(s)"] = {
            "CPU": cfg.critic.world_size * cl.cpus_per_critic,
            "GPU": cfg.critic.world_size * cl.gpus_per_critic}
    return need


def check_resources(cfg) -> None:
    """Fail fast, with a breakdown, when the cluster cannot hold every actor at once."""
    import ray

    total = ray.cluster_resources()
    need = required_resources(cfg)
    for resource in ("CPU", "GPU"):
        wanted = sum(parts[resource] for parts in need.values())
        have = total.get(resource, 0.0)
        if wanted > have + 1e-9:
            breakdown = ", ".join(f"{name}: {parts[resource]:g}" for name, parts in need.items()
                                  if parts[resource])
            hint = ("lower rollout.num_engines / learner.world_size, or the cluster.*_per_* "
                    "fractions") if resource == "CPU" else "use fewer GPU actors or a bigger cluster"
            raise ClusterResourceError(
                f"the actors need {wanted:g} {resource} ({breakdown}) but the Ray cluster has "
                f"{have:g}. Fix: {hint}.")
