"""The console a user sees: our progress lines and real warnings/errors, no third-party chatter
they can do nothing about (RLHF_DIST_VERBOSE=1 shows it all)."""

import logging
import os
import subprocess
import sys

import pytest

from rlhf_dist import console
from rlhf_dist.runtime.cluster import quiet_env

from helpers import REPO

# What a default run printed before (2 cores, Ray 2.60, vLLM 0.32 CPU, DeepSpeed 0.19).
THIRD_PARTY = (
    "Token authentication is enabled for this Ray cluster",
    "Setting accelerator to CPU",
    "NUMA binding: Using MEMBIND policy",
    "Triton is installed",
    "Loading safetensors checkpoint shards",
    "Writing model shards",
    "deepspeed_shm_comm_op built successfully",
    "Ray deduplicates logs by default",
)


@pytest.fixture
def ray_printer(monkeypatch):
    """Ray's driver-side printer of actor output, replaced by a recorder for the test."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    monkeypatch.delenv("RLHF_DIST_VERBOSE", raising=False)
    saved = list(dispatcher.handlers)
    printed: list[str] = []
    dispatcher.handlers = [("ray_print_logs", lambda batch: printed.extend(batch["lines"]))]
    yield dispatcher, printed
    dispatcher.handlers = saved


def test_actor_output_keeps_real_warnings_and_drops_known_noise(ray_printer):
    dispatcher, printed = ray_printer
    console.quiet_actor_output()
    console.quiet_actor_output()  # idempotent: one filter, not two
    real = ["WARNING vllm: max_model_len is larger than the model supports",
            "Traceback (most recent call last):", "RuntimeError: CUDA out of memory"]
    noise = ["[2026-11-29] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator "
             "to CPU. If you have GPU or other accelerator, we were unable to detect it.",
             "Loading safetensors checkpoint shards: 100% Completed | 1/1", "   ",
             "[W1129 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy for memory allocation"]
    dispatcher.emit({"lines": noise[:2] + real + noise[2:], "pid": 1, "is_err": True})
    dispatcher.emit({"lines": noise, "pid": 1, "is_err": True})  # nothing left: nothing printed
    assert printed == real


def test_verbose_shows_everything(ray_printer, monkeypatch):
    dispatcher, printed = ray_printer
    monkeypatch.setenv("RLHF_DIST_VERBOSE", "1")
    console.quiet_actor_output()
    dispatcher.emit({"lines": ["Loading safetensors checkpoint shards: 0%"], "pid": 1, "is_err": True})
    assert printed == ["Loading safetensors checkpoint shards: 0%"]
    assert "VLLM_LOGGING_LEVEL" not in quiet_env() and "TQDM_DISABLE" not in quiet_env()


def test_actor_env_quiets_the_libraries_and_carries_the_deepspeed_device(monkeypatch):
    monkeypatch.delenv("RLHF_DIST_VERBOSE", raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    env = quiet_env()
    assert env["VLLM_LOGGING_LEVEL"] == "ERROR" and env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert env["DS_ACCELERATOR"] == "cpu"


def test_actor_env_carries_the_network_settings_of_nccl_and_gloo(monkeypatch):
    """Actors on other nodes do not inherit the driver's environment: NCCL_SOCKET_IFNAME and the
    like travel in the job's runtime env, other variables do not."""
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth1")
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth1")
    monkeypatch.setenv("MY_UNRELATED_SETTING", "x")
    env = quiet_env()
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "eth1"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2" and "MY_UNRELATED_SETTING" not in env


def test_driver_drops_the_token_notice_but_not_other_ray_warnings(monkeypatch):
    monkeypatch.delenv("RLHF_DIST_VERBOSE", raising=False)
    console.quiet_driver_logging()
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        logger.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE")
        logger.warning("Token authentication is disabled for this Ray cluster. Anyone with ...")
    finally:
        logger.removeHandler(handler)
    assert seen == ["Token authentication is disabled for this Ray cluster. Anyone with ..."]


@pytest.mark.slow
@pytest.mark.ray
def test_smoke_run_console_is_quiet_and_errors_still_show(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RLHF_DIST_VERBOSE"}
    env["PYTHONPATH"] = str(REPO)
    run = [sys.executable, "-m", "rlhf_dist.main", "experiment=smoke", f"hydra.run.dir={tmp_path}/run",
           f"model.tiny.cache_dir={tmp_path}/models"]  # a fresh model: its build and save show too
    result = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    console_text = result.stdout + result.stderr
    assert result.returncode == 0, console_text[-4000:]
    assert "run summary" in result.stdout and "[start] actors ready" in result.stdout
    shown = [phrase for phrase in THIRD_PARTY if phrase in console_text]
    assert not shown, f"third-party lines on the console: {shown}\n{console_text[-4000:]}"

    bad_run = [f"hydra.run.dir={tmp_path}/bad" if a.startswith("hydra.run.dir=") else a for a in run]
    bad = subprocess.run([*bad_run, "rollout.n_samples_per_prompt=1"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "error: algo.advantage=grpo compares samples within a group" in bad.stderr
