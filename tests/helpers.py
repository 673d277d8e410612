"""Helpers shared by the tests of every kind (imported as `helpers`; fixtures live in conftest.py).

    run_cli        the real `rlhf-dist` entry point in a subprocess, to completion
    start_cli      the same, left running until a condition holds (then the caller kills or waits)
    actor_pids     the pids of a driver's actor processes of one class (to SIGKILL one)
    read_metrics   a run's metrics.jsonl rows
    start_trainer  an RLTrainer started on a local Ray with the smoke experiment
    assert_rises   a learning bar measured against the run's own noise
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent


def run_cli(args: list[str], cwd: Path, timeout: int = 900):
    """Run the real `rlhf-dist` entry point in a subprocess."""
    import subprocess

    cmd = [sys.executable, "-m", "rlhf_dist.main", *args]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def start_trainer(run_dir: Path, model_dir: Path, overrides: list[str]):
    """A started RLTrainer on a local Ray (experiment=smoke, a reward with a gradient on random
    text, many small weight buckets) plus `overrides`. The caller shuts down trainer and Ray."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rlhf_dist.runtime.cluster import init_ray
    from rlhf_dist.session import conf_dir, prepare
    from rlhf_dist.models.hf import load_tokenizer
    from rlhf_dist.monitor import RunMonitor
    from rlhf_dist.rl.trainer import RLTrainer

    with initialize_config_dir(conf_dir(), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=[
            f"trainer.run_dir={run_dir}", f"model.path={model_dir}", "experiment=smoke",
            "rollout.sync_bucket_mb=0.1",  # several buckets: exercises streaming
            f"reward.fn={REPO / 'examples' / 'my_rewards.py'}:score", *overrides]))
    inputs = prepare(cfg)
    init_ray(cfg.cluster)
    monitor = RunMonitor(str(run_dir), "disabled", "p", None, None, [], {}, cfg.trainer.total_steps, console=False)
    trainer = RLTrainer(cfg, inputs["model_path"], load_tokenizer(inputs["model_path"]),
                        inputs["train"], inputs["eval"], inputs["reward_spec"], monitor)
    trainer.start()
    return trainer


def assert_resume_repeats_the_step(trainer, checkpoint: str, saved_step: int, keys: tuple[str, ...],
                                   weights: Callable[[], dict]) -> None:
    """Step `saved_step` + 1, load `checkpoint` (of `saved_step`), step again: the metrics `keys`
    and every tensor `weights()` returns are the same both times (exact resume)."""
    import torch

    after = trainer.step(saved_step + 1)
    weights_after = weights()
    assert trainer.load_checkpoint(checkpoint) == saved_step
    again = trainer.step(saved_step + 1)
    for key in keys:
        assert again[key] == after[key], key
    for name, tensor in weights().items():
        assert torch.equal(tensor, weights_after[name]), name


def assert_rises(values: list[float], head: int, tail: int, k: float = 3.0,
                 within_sd: list[float] | None = None, batch: int = 1) -> None:
    """The mean of the last `tail` values exceeds that of the first `head` by `k` standard errors
    of the difference, so a policy that learns nothing fails (~1% of the time at k=3), whatever
    the seed. Each window's standard error is the larger of its step-to-step spread / sqrt(n) and,
    given the within-batch standard deviations of `batch` samples a step, mean sd / sqrt(n * batch)."""
    import statistics

    def mean_and_se(part: list[float], sds: list[float] | None) -> tuple[float, float]:
        se = statistics.stdev(part) / len(part) ** 0.5
        if sds:
            se = max(se, statistics.fmean(sds) / (len(part) * batch) ** 0.5)
        return statistics.fmean(part), se

    first, first_se = mean_and_se(values[:head], within_sd[:head] if within_sd else None)
    last, last_se = mean_and_se(values[-tail:], within_sd[-tail:] if within_sd else None)
    margin = k * (first_se**2 + last_se**2) ** 0.5
    assert last - first > margin, (
        f"no rise beyond noise: first {head} steps {first:.3f}, last {tail} {last:.3f}, "
        f"needed +{margin:.3f} ({k} standard errors); values {[round(v, 3) for v in values]}")


def start_cli(args: list[str], cwd: Path, until: Callable[[], bool], timeout_s: float = 600,
              capture: bool = True) -> subprocess.Popen:
    """Start `rlhf-dist args` and return it, still running, once `until()` holds (or the process
    ended, or `timeout_s` passed: the caller's asserts say which)."""
    driver = subprocess.Popen([sys.executable, "-m", "rlhf_dist.main", *args], cwd=cwd,
                              env=dict(os.environ, PYTHONPATH=str(REPO)),
                              stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                              stderr=subprocess.STDOUT if capture else subprocess.DEVNULL, text=True)
    deadline = time.time() + timeout_s
    while not until() and driver.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    return driver


def actor_pids(driver: subprocess.Popen, actor_class: str) -> list[int]:
    """Pids of the driver's Ray worker processes running `actor_class` (e.g. "RolloutActor")."""
    import psutil

    assert driver.poll() is None, f"the driver exited ({driver.returncode}) before its actors were looked up"
    pids = []
    for child in psutil.Process(driver.pid).children(recursive=True):
        try:
            if actor_class in " ".join(child.cmdline()):
                pids.append(child.pid)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):  # a short-lived child that just exited
            continue
    return pids


def read_metrics(run_dir: Path, key: str | None = None) -> list[dict]:
    """The rows of run_dir/metrics.jsonl ([] before the file exists), those with `key` if given."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if key is None or key in r]


def threads_and_cores(actor) -> tuple[int, list[int]]:
    """(torch threads, CPU affinity) inside a live actor."""
    import ray

    def probe(_self):
        import os

        import torch
        return torch.get_num_threads(), sorted(os.sched_getaffinity(0))

    return ray.get(actor.__ray_call__.remote(probe), timeout=60)


def compose_config(overrides: list[str]):
    """The typed config `rlhf-dist` would run with these overrides (Hydra compose, no run)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rlhf_dist.session import conf_dir  # importing it registers the schema

    with initialize_config_dir(conf_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["trainer.run_dir=/tmp/unused", *overrides])
    return OmegaConf.to_object(cfg)
