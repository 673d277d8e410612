import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 built offline once per test session."""
    from rlhf_dist.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", arch="qwen2")


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
    from rlhf_dist.main import conf_dir, prepare
    from rlhf_dist.models.hf import load_tokenizer
    from rlhf_dist.monitor import RunMonitor
    from rlhf_dist.trainer import RLTrainer

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
