"""Core lists of cluster.engine_cores / cluster.learner_cores (rlhf_dist/runtime/cpu.py): parsing,
vLLM's binding string, validation, and pinning a process."""

import subprocess
import sys

import pytest

from rlhf_dist.runtime.cpu import available_cores, parse_cores, vllm_binding
from rlhf_dist.errors import ConfigError
from rlhf_dist.validation import validate

from helpers import compose_config as compose


def test_core_lists_parse_ids_ranges_and_lists():
    assert parse_cores(None) is None
    assert parse_cores(3) == [3]
    assert parse_cores("2-4") == [2, 3, 4]
    assert parse_cores("0-1,4, 6") == [0, 1, 4, 6]
    for bad in ("a", "3-1", "-2", "1-"):
        with pytest.raises(ConfigError, match="is not a core list"):
            parse_cores(bad, "cluster.engine_cores")


def test_vllm_binding_splits_cores_between_tensor_parallel_workers():
    assert vllm_binding(None, 1, alone=True) == "auto"
    assert vllm_binding(None, 2, alone=False) == "nobind"
    assert vllm_binding([0], 1, alone=True) == "0"
    assert vllm_binding([0, 1, 2, 3], 2, alone=False) == "0,1|2,3"


def test_bad_core_settings_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="cluster.engine_cores='x' is not a core list"):
        validate(compose(["cluster.engine_cores=x"]))
    missing = max(available_cores()) + 1
    with pytest.raises(ConfigError, match=rf"names cores \[{missing}\] that this machine does not have"):
        validate(compose([f"cluster.learner_cores={missing}"]))
    with pytest.raises(ConfigError, match="only CPU nodes use"):
        validate(compose(["cluster=gpu8", "cluster.engine_cores=0"]))
    with pytest.raises(ConfigError, match=r"gives 1 core\(s\) to 2 engine\(s\)"):
        validate(compose(["cluster.engine_cores=0", "rollout.num_engines=2"]))
    validate(compose(["cluster.engine_cores=0", "cluster.learner_cores=0"]))


def test_each_engine_gets_its_own_share_of_the_engine_cores(monkeypatch):
    from rlhf_dist.rl import launcher

    captured = {}

    class Group:  # records the per-engine arguments instead of starting actors
        def __init__(self, name, cls, num, cpus, gpus, timeout, kwargs, resources):
            captured["kwargs"] = kwargs

    monkeypatch.setattr(launcher, "ActorGroup", Group)
    launcher.start_engines(compose(["cluster.engine_cores=0-3", "rollout.num_engines=2"]), "/model")
    assert [(k["cpu_cores"], k["cpu_threads_bind"], k["threads_share"]) for k in captured["kwargs"]] == [
        ([0, 1], "0,1", 1), ([2, 3], "2,3", 1)]


def test_use_cores_pins_the_process_and_sets_the_threads():
    code = ("import os, torch; from rlhf_dist.runtime.cpu import use_cores; "
            "n = use_cores([0], 1); print(n, torch.get_num_threads(), sorted(os.sched_getaffinity(0)), "
            "os.environ['OMP_NUM_THREADS'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "1", "[0]", "1"]
