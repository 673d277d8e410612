"""Core lists of cluster.engine_cores / cluster.learner_cores (rlhf_dist/runtime/cpu.py): parsing,
vLLM's binding string, validation, and pinning a process."""

import subprocess
import sys

import pytest

from rlhf_dist.runtime.cpu import available_cores, parse_cores, vllm_binding
from rlhf_dist.errors import ConfigError
from rlhf_dist.validation import validate

from helpers import compose_config as compose, threads_and_cores


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


@pytest.mark.ray
@pytest.mark.slow
def test_each_engine_gets_its_own_share_of_the_engine_cores(local_ray, tiny_model_dir):
    """Two real engines given cluster.engine_cores=0-1: each decodes on its own core."""
    from rlhf_dist.rl import launcher

    if len(available_cores()) < 2:
        pytest.skip("needs 2 cores")
    cfg = compose(["cluster.engine_cores=0-1", "rollout.num_engines=2", "cluster.cpus_per_engine=0.5"])
    engines = launcher.start_engines(cfg, str(tiny_model_dir))
    try:
        launcher.wait_ready(engines, 600)
        assert [threads_and_cores(actor) for actor in engines.actors] == [(1, [0]), (1, [1])]
    finally:
        engines.kill()


def test_use_cores_pins_the_process_and_sets_the_threads():
    code = ("import os, torch; from rlhf_dist.runtime.cpu import use_cores; "
            "n = use_cores([0], 1); print(n, torch.get_num_threads(), sorted(os.sched_getaffinity(0)), "
            "os.environ['OMP_NUM_THREADS'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "1", "[0]", "1"]
