"""Every `cluster=` option, as the command line composes it, is a valid config; the GPU options
set their own GPU values (not the CPU defaults) and fit the GPUs they are named for."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlhf_dist.runtime.cluster import required_resources
from rlhf_dist.config import ModelConfig, RLConfig, RolloutConfig
from rlhf_dist.errors import ConfigError
from rlhf_dist.session import conf_dir
from rlhf_dist.validation import validate

from helpers import REPO

pytestmark = pytest.mark.slow  # one `rlhf-dist --cfg job` subprocess per test

CLUSTER_OPTIONS = sorted(p.stem for p in (Path(conf_dir()) / "cluster").glob("*.yaml"))
GPUS_PER_OPTION = {"gpu1": 1, "gpu8": 8}  # what each GPU option is named for


def cfg_job(*overrides: str) -> RLConfig:
    """`rlhf-dist <overrides> --cfg job` in a subprocess, read back into the typed schema."""
    cmd = [sys.executable, "-m", "rlhf_dist.main", *overrides, "trainer.run_dir=/tmp/unused",
           "--cfg", "job"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    composed = OmegaConf.merge(OmegaConf.structured(RLConfig), yaml.safe_load(result.stdout))
    return OmegaConf.to_object(composed)


@pytest.mark.parametrize("option", CLUSTER_OPTIONS)
def test_cluster_option_composes_on_the_command_line_and_validates(option):
    validate(cfg_job(f"cluster={option}"))


@pytest.mark.parametrize("option", [o for o in CLUSTER_OPTIONS if o in GPUS_PER_OPTION])
def test_gpu_option_sets_gpu_values_instead_of_inheriting_cpu_ones(option):
    cfg = cfg_job(f"cluster={option}")
    cpu_rollout, cpu_model = RolloutConfig(), ModelConfig()
    assert cfg.cluster.device == "cuda"
    assert cfg.model.dtype == cfg.rollout.dtype == "bfloat16" != cpu_model.dtype
    assert cfg.rollout.enforce_eager is False and cpu_rollout.enforce_eager is True
    assert cfg.rollout.kv_cache_gb is None  # a CPU-only knob (VLLM_CPU_KVCACHE_SPACE)
    assert cfg.rollout.gpu_memory_utilization >= 0.3 > cpu_rollout.gpu_memory_utilization
    assert cfg.cluster.gpus_per_aux > 0 and cfg.cluster.gpus_per_critic > 0


@pytest.mark.parametrize("option,extra", [("gpu8", []), ("gpu8", ["experiment=ppo"]), ("gpu1", [])])
def test_gpu_option_fits_the_gpus_it_is_named_for(option, extra):
    """Sum of GPU shares <= GPUs, and no actor wants more than one GPU (fractions pack per GPU)."""
    cfg = cfg_job(f"cluster={option}", *extra)
    need = required_resources(cfg)
    assert sum(parts["GPU"] for parts in need.values()) <= GPUS_PER_OPTION[option], need
    engine, learner, aux = (cfg.cluster.gpus_per_engine, cfg.cluster.gpus_per_learner,
                            cfg.cluster.gpus_per_aux)
    assert engine <= 1 and learner <= 1 and aux <= 1
    if option == "gpu8":  # engines on their own GPUs; reference + reward fit beside training ranks
        assert engine == 1 and learner + aux <= 1 and cfg.cluster.gpus_per_critic + aux <= 1


@pytest.mark.parametrize("overrides,needle", [
    (["cluster.gpus_per_aux=0"], "the reference actor (the KL term is on) gets no GPU share"),
    (["experiment=ppo", "cluster.gpus_per_critic=0"], "the critic ranks (algo.advantage=gae)"),
    (["cluster.gpus_per_aux=0", "algo.kl_coef=0", "reward.model.path=/rm"], "the reward actor"),
])
def test_gpu_actor_without_a_gpu_share_is_refused(overrides, needle):
    cfg = cfg_job("cluster=gpu8", *overrides)
    with pytest.raises(ConfigError, match="Fix: cluster.gpus_per_") as err:
        validate(cfg)
    assert needle in str(err.value)


def test_kl_off_needs_no_reference_gpu():
    validate(cfg_job("cluster=gpu8", "cluster.gpus_per_aux=0", "algo.kl_coef=0"))


def test_sizing_guide_commands_compose_and_validate():
    """docs/sizing.md's runs are configs that exist: each `rlhf-dist ...` line composes and validates."""
    lines = [line.split()[1:] for line in (REPO / "docs" / "sizing.md").read_text().splitlines()
             if line.startswith("rlhf-dist ")]
    assert len(lines) >= 5
    for overrides in lines:
        with initialize_config_dir(conf_dir(), version_base="1.3"):
            cfg = compose("config", overrides=["trainer.run_dir=/tmp/unused", *overrides])
        validate(OmegaConf.to_object(cfg))
