"""Threads and cores of the compute actors on a CPU node.

Ray starts an actor with fractional `num_cpus` with OMP_NUM_THREADS=1, so a vLLM engine built
inside it decodes on one thread (measured, 113M model, 64 x 64 tokens on 2 cores: 6.9 s with
one thread, 4.4 s with two). The phases of a synchronous step run one after another, so every
compute actor (engine, learner ranks, reference, critic) takes all the cores it may use, shared
by the ranks of a group on the node. `cluster.engine_cores` / `cluster.learner_cores` give the
engines and the training side their own cores instead, so that overlapped generation and
training (trainer.async_rollout) do not fight over the same ones.
"""

from __future__ import annotations

import os

from rlhf_dist.errors import ConfigError


def parse_cores(spec, key: str = "cores") -> list[int] | None:
    """"0" | "2-5" | "0,2" | "0-1,4" -> sorted core ids; None -> None (all cores)."""
    if spec is None:
        return None
    cores: set[int] = set()
    try:
        for part in str(spec).replace(" ", "").split(","):
            first, dash, last = part.partition("-")
            start, end = int(first), int(last if dash else first)
            if start < 0 or end < start:
                raise ValueError(part)
            cores.update(range(start, end + 1))
    except ValueError:
        raise ConfigError(f"{key}={spec!r} is not a core list. Expected core ids and ranges, e.g. "
                          f"{key}=0, {key}=2-5 or {key}='\"0,2\"' (quoted for the shell and Hydra).") from None
    return sorted(cores)


def available_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def use_cores(cores: list[int] | None, share: int = 1) -> int:
    """Pin this process to `cores` (None: keep its cores) and give torch (and OpenMP libraries
    started later) len(cores) // share threads; `share` = ranks of the group on one node.
    Returns the thread count."""
    import torch

    if cores is not None:
        missing = sorted(set(cores) - set(available_cores()))
        if missing:
            raise ConfigError(f"cores {missing} do not exist on this node (it has {available_cores()}). "
                              "Fix: pick cores from that list in cluster.engine_cores / cluster.learner_cores.")
        os.sched_setaffinity(0, cores)
    threads = max(1, len(cores or available_cores()) // max(1, share))
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by OpenMP runtimes a library starts later
    torch.set_num_threads(threads)
    return threads


def vllm_binding(cores: list[int] | None, tensor_parallel_size: int, alone: bool) -> str:
    """VLLM_CPU_OMP_THREADS_BIND: the given cores (split between tensor-parallel workers, "|"),
    else vLLM's auto-binding for a lone engine worker and none when several share the node."""
    if cores is None:
        return "auto" if alone else "nobind"
    size = max(1, len(cores) // tensor_parallel_size)
    groups = [cores[i * size:(i + 1) * size] for i in range(tensor_parallel_size)]
    return "|".join(",".join(map(str, group)) for group in groups)
