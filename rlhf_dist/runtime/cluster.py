"""Connecting to Ray and checking, before any actor starts, that the actors fit."""

from __future__ import annotations

import os

from rlhf_dist.config import uses_critic, uses_reference
from rlhf_dist.errors import ClusterResourceError


NETWORK_ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME")


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
        from rlhf_dist.runtime.reaper import start_reaper

        start_reaper()  # ends this Ray session's processes if the driver is killed (kill -9)
    else:  # within cluster.connect_timeout_s, or a message naming the address
        from rlhf_dist.runtime.connect import join_cluster

        join_cluster(cluster.address, cluster.connect_timeout_s, env)


def quiet_env() -> dict[str, str]:
    """Actor environment: keep the console to our progress lines and real errors.

    vLLM otherwise logs two "Failed to load weights" warnings per sync (rotary and tied lm_head
    have no weights to load), transformers draws a progress bar per model load, and torch warns
    about deprecated collectives inside DeepSpeed. Lines with no switch are dropped on the driver
    (`rlhf_dist.console`). Set RLHF_DIST_VERBOSE=1 to see all of it.
    """
    from rlhf_dist.console import QUIET_ENV, verbose

    env = {"TOKENIZERS_PARALLELISM": "false"}
    if "DS_ACCELERATOR" in os.environ:  # the driver's choice from cluster.device, also on remote nodes
        env["DS_ACCELERATOR"] = os.environ["DS_ACCELERATOR"]
    # the network settings of NCCL and gloo (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, GLOO_SOCKET_IFNAME,
    # TORCH_NCCL_*...) as the driver's environment has them: actors on other nodes do not inherit it
    env.update({k: v for k, v in os.environ.items() if k.startswith(NETWORK_ENV_PREFIXES)})
    if verbose():
        return env
    return {
        **env,
        **QUIET_ENV,
        "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning",
        "RAY_DEDUP_LOGS": "1",
    }


def required_resources(cfg) -> dict[str, dict[str, float]]:
    """Every resource each role needs in total: CPU, GPU and the custom cluster.*_resources."""
    cl = cfg.cluster

    def role(count: float, cpus: float, gpus: float, custom: dict[str, float] | None) -> dict[str, float]:
        return {"CPU": count * cpus, "GPU": count * gpus,
                **{k: count * v for k, v in (custom or {}).items()}}

    need = {
        f"{cfg.rollout.num_engines} rollout engine(s)": role(
            cfg.rollout.num_engines, cl.cpus_per_engine, cl.gpus_per_engine, cl.engine_resources),
        f"{cfg.learner.world_size} learner rank(s)": role(
            cfg.learner.world_size, cl.cpus_per_learner, cl.gpus_per_learner, cl.learner_resources),
        "reward actor": role(1, cl.cpus_per_aux, cl.gpus_per_aux, cl.aux_resources),
    }
    if cfg.stage == "eval":  # engines and the reward only
        return {name: parts for name, parts in need.items() if "learner" not in name}
    if uses_reference(cfg):
        need["reference actor"] = role(1, cl.cpus_per_aux, cl.gpus_per_aux, cl.aux_resources)
    if uses_critic(cfg):
        need[f"{cfg.critic.world_size} critic rank(s)"] = role(
            cfg.critic.world_size, cl.cpus_per_critic, cl.gpus_per_critic, cl.critic_resources)
    return need


def check_resources(cfg) -> None:
    """Fail fast, with a breakdown, when the cluster cannot hold every actor at once."""
    import ray

    problems = resource_shortfall(required_resources(cfg), ray.cluster_resources())
    if problems:
        raise ClusterResourceError(
            f"the actors need more than the Ray cluster has: {'; '.join(problems)}.")


def resource_shortfall(need: dict[str, dict[str, float]], total: dict[str, float]) -> list[str]:
    """One line per resource the actors need more of than `total` holds: needed (by role),
    existing, and how to fix it."""
    problems = []
    resources = dict.fromkeys(key for parts in need.values() for key in parts)
    for resource in resources:
        wanted = sum(parts.get(resource, 0.0) for parts in need.values())
        have = total.get(resource, 0.0)
        if wanted > have + 1e-9:
            breakdown = ", ".join(f"{name}: {parts[resource]:g}" for name, parts in need.items()
                                  if parts.get(resource))
            if resource == "CPU":
                hint = "lower rollout.num_engines / learner.world_size, or the cluster.*_per_* fractions"
            elif resource == "GPU":
                hint = "use fewer GPU actors or a bigger cluster"
            else:
                hint = (f"start nodes with --resources='{{\"{resource}\": N}}' or change "
                        "cluster.*_resources")
            problems.append(f"{resource}: needs {wanted:g} ({breakdown}), the cluster has {have:g}. "
                            f"Fix: {hint}")
    return problems
