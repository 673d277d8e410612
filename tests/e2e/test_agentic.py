"""Multi-turn episodes from the command line: the calculator tool with PPO, several engines and
async rollout; `experiment=agentic` (the guessing game) killed then resumed (the environments are
rebuilt from the records, every turn has its seed, so the resumed run draws the episodes the
uninterrupted one did)."""

import json
import signal

import pytest

from helpers import run_cli, start_cli

pytestmark = [pytest.mark.ray, pytest.mark.slow]


CALCULATOR = ["task=calc", "rollout.env=rlhf_dist.envs.calculator:Calculator", "rollout.max_turns=3",
              "rollout.max_new_tokens=16", "rollout.max_episode_tokens=64"]


def _args(run_dir, model_dir, *extra):
    return ["experiment=agentic", f"model.path={model_dir}", f"trainer.run_dir={run_dir}", "warmup.steps=100",
            "trainer.prompts_per_step=4", "rollout.n_samples_per_prompt=4", "learner.mini_batch_size=16",
            "learner.micro_batch_size=8", "task.num_train=64", "task.num_eval=8", "trainer.eval_every=0",
            "logger.wandb.mode=disabled", *extra]


def _steps(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward/mean" in r]


def test_agentic_ppo_with_two_engines_and_async_rollout(tiny_model_dir, tmp_path):
    """PPO: the critic's values and GAE on multi-turn sequences, episodes split over two engines,
    the next batch's episodes played while the current one trains."""
    run_dir = tmp_path / "run"
    done = run_cli(_args(run_dir, tiny_model_dir, *CALCULATOR, "algo=ppo", "trainer.total_steps=3", "rollout.num_engines=2",
                         "cluster.cpus_per_engine=0.25", "cluster.cpus_per_critic=0.25",
                         "trainer.async_rollout=true"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    steps = _steps(run_dir)
    assert [r["step"] for r in steps] == [1, 2, 3]
    for row in steps:
        assert row["episode/turns_mean"] >= 1.0 and row["episode/policy_tokens_mean"] > 0
        assert "episode/tool_calls_mean" in row and row["episode/env_errors_mean"] == 0.0
        assert row["async/staleness"] in (0.0, 1.0)
        assert "critic/explained_variance" in row
        assert row["episode/tool_calls_mean"] > 0.5  # the warm-up taught the tool call
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert any(row["completion"].startswith("call ") and "\ngot " in row["completion"] for row in samples), \
        "no episode with a tool call and the tool's answer in the samples table"


def test_agentic_killed_and_resumed_draws_the_same_episodes(tiny_model_dir, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    common = ["trainer.total_steps=4", "trainer.save_every=2"]
    done = run_cli(_args(whole, tiny_model_dir, *common), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = cut / "checkpoints" / "step_00000002" / "COMPLETE.json"
    driver = start_cli(_args(cut, tiny_model_dir, *common), tmp_path, until=checkpoint.exists, capture=False)
    driver.send_signal(signal.SIGKILL)
    driver.wait(60)
    resumed = run_cli(_args(cut, tiny_model_dir, *common, "trainer.resume=auto"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = _steps(whole), _steps(cut)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(want, got):
        for key in ("data/prompt_crc", "reward/mean", "episode/turns_mean", "episode/tool_calls_mean",
                    "episode/observation_tokens_mean"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)
