"""Kill the driver with SIGKILL mid-run, resume with trainer.resume=auto, and compare step by
step with an uninterrupted run of the same seed. PPO, so the checkpoint must carry the critic too
(its values shape the advantages, hence the policy). Real Ray, vLLM and DeepSpeed."""

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, run_cli, start_cli

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SLOW_REWARD = f"reward.fn={REPO / 'tests' / 'data' / 'slow_reward.py'}:score"


def _args(run_dir, model_dir, *extra):
    return ["experiment=smoke", "algo=ppo", f"model.path={model_dir}", f"trainer.run_dir={run_dir}", SLOW_REWARD,
            "trainer.total_steps=6", "trainer.save_every=2", "trainer.save_final=true", *extra]


def _steps(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward/mean" in r]


def _final_weights(run_dir):
    (file,) = (run_dir / "final").glob("*.safetensors")
    return load_file(file)


def test_sigkill_then_resume_equals_the_uninterrupted_run(tiny_model_dir, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    done = run_cli(_args(whole, tiny_model_dir), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    checkpoint = cut / "checkpoints" / "step_00000002" / "COMPLETE.json"
    driver = start_cli(_args(cut, tiny_model_dir), tmp_path, until=checkpoint.exists, capture=False)
    driver.send_signal(signal.SIGKILL)  # mid-run: steps 3-4 are in flight
    driver.wait(60)
    assert checkpoint.exists(), "the run never wrote its step-2 checkpoint"
    logged_before = [r["step"] for r in _steps(cut)]
    assert max(logged_before) < 6, "the kill came too late to test anything"
    half = cut / "checkpoints" / ".step_00000099.partial-test"  # as if killed while saving
    half.mkdir()
    (half / "driver.pt").write_bytes(b"torn")

    resumed = run_cli(_args(cut, tiny_model_dir, "trainer.resume=auto"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[resume] from" in resumed.stdout and "step_00000099" not in resumed.stdout

    want, got = _steps(whole), _steps(cut)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]  # each step once, none missing
    for a, b in zip(want, got):  # the same prompts, the same samples' rewards, step by step
        assert a["data/prompt_crc"] == b["data/prompt_crc"], a["step"]
        assert a["reward/mean"] == pytest.approx(b["reward/mean"], abs=1e-6), a["step"]
    wanted, held = _final_weights(whole), _final_weights(cut)
    assert set(wanted) == set(held)
    for name, tensor in wanted.items():
        torch.testing.assert_close(held[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert json.loads((cut / "summary.json").read_text())["steps"] == 6
