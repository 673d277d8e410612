"""Faults during a run that must not end it: a killed rollout engine (replaced, weights re-sent,
the phase retried, the restart counted), killed reference and reward actors (replaced, the phase
retried) and a reward function raising on some samples."""

import os
import signal

import pytest

from helpers import REPO, actor_pids, read_metrics, run_cli, start_cli

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _logged_steps(run_dir):
    return read_metrics(run_dir, "reward/mean")


def test_a_killed_engine_is_replaced_and_the_run_finishes(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = ["experiment=smoke", f"model.path={tiny_model_dir}", f"trainer.run_dir={run_dir}",
            f"reward.fn={REPO / 'tests' / 'data' / 'slow_reward.py'}:score", "trainer.total_steps=5"]
    driver = start_cli(args, tmp_path, until=lambda: len(_logged_steps(run_dir)) >= 2)
    engines = actor_pids(driver, "RolloutActor")
    assert len(engines) == 1, engines
    os.kill(engines[0], signal.SIGKILL)
    output, _ = driver.communicate(timeout=900)
    assert driver.returncode == 0, output[-4000:]
    assert "[fault] rollout[0] died during" in output
    steps = _logged_steps(run_dir)
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5]
    assert steps[-1]["faults/engine_restarts"] == 1.0
    assert steps[-1]["sync/verified_tensors"] > 0  # the new engine holds the learner's weights


def test_killed_reference_and_reward_actors_are_replaced_and_the_run_finishes(tiny_model_dir, tmp_path):
    """They hold no training state (the frozen initial policy; the reward function): a killed one
    is restarted in its placement and the phase that found it dead runs again."""
    run_dir = tmp_path / "run"
    args = ["experiment=smoke", f"model.path={tiny_model_dir}", f"trainer.run_dir={run_dir}",
            f"reward.fn={REPO / 'tests' / 'data' / 'slow_reward.py'}:score", "trainer.total_steps=5"]
    driver = start_cli(args, tmp_path, until=lambda: len(_logged_steps(run_dir)) >= 2)
    for actor in ("ReferenceActor", "RewardActor"):
        pids = actor_pids(driver, actor)
        assert len(pids) == 1, (actor, pids)
        os.kill(pids[0], signal.SIGKILL)
    output, _ = driver.communicate(timeout=900)
    assert driver.returncode == 0, output[-4000:]
    assert "[fault] reward[0], reference[0] died during" in output or (
        "[fault] reward[0] died during" in output and "[fault] reference[0] died during" in output), output[-3000:]
    steps = _logged_steps(run_dir)
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5]
    assert steps[-1]["faults/aux_restarts"] == 2.0 and steps[-1]["faults/engine_restarts"] == 0.0
    assert all(0 <= s["kl/mean"] < 10 for s in steps)  # k3 from the (new) reference on every step


def test_a_reward_function_that_raises_on_some_samples_does_not_end_the_run(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(["experiment=smoke", f"model.path={tiny_model_dir}", f"trainer.run_dir={run_dir}",
                      f"reward.fn={REPO / 'tests' / 'data' / 'flaky_reward.py'}:score"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "raised on" in result.stdout and "they get reward.fallback_score=0" in result.stdout
    steps = _logged_steps(run_dir)
    assert len(steps) == 3 and sum(s["reward/failed_samples"] for s in steps) > 0


def test_a_dead_learner_rank_stops_the_run_with_the_command_that_resumes_it(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = ["experiment=smoke", f"model.path={tiny_model_dir}", f"trainer.run_dir={run_dir}",
            f"reward.fn={REPO / 'tests' / 'data' / 'slow_reward.py'}:score", "trainer.total_steps=6",
            "trainer.save_every=2"]
    checkpoint = run_dir / "checkpoints" / "step_00000002" / "COMPLETE.json"
    driver = start_cli(args, tmp_path, until=checkpoint.exists)
    os.kill(actor_pids(driver, "LearnerActor")[0], signal.SIGKILL)
    output, _ = driver.communicate(timeout=600)
    assert driver.returncode == 2, output[-3000:]
    assert "learner[0] died during" in output and "The last complete checkpoint is step" in output
    command = output.split("Resume with:\n")[1].splitlines()[0].split()
    assert command[0] == "rlhf-dist" and command[-1] == "trainer.resume=auto"
    resumed = run_cli(command[1:], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [s["step"] for s in _logged_steps(run_dir)] == [1, 2, 3, 4, 5, 6]
