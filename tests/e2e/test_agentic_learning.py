"""`experiment=agentic` learns to use the environment's answers (shortened; the full run and its
control: docs/agentic.md, benchmarks/agentic.py).

The guessing game's prompt never changes, so a policy that ignores "higher"/"lower" finds the
secret in at most 40% of games (tests/unit/test_guess_env.py, by brute force). The warm-up's
demonstrations guess without reading the answers; passing 40% is RL's doing."""

import json

import pytest

from helpers import assert_rises, run_cli

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BLIND_CEILING = 0.4


def test_agentic_learns_to_use_the_feedback(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli([f"hydra.run.dir={run_dir}", "experiment=agentic", "trainer.total_steps=35",
                      "trainer.eval_every=0", "logger.wandb.mode=disabled"], cwd=tmp_path, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert len(steps) == 35
    success = [r["reward/mean"] for r in steps]  # 768 episodes a step: standard error ~0.018
    assert_rises(success, head=5, tail=5, within_sd=[r["reward/std"] for r in steps], batch=768)
    late = sum(success[-5:]) / 5
    # the games are balanced over the run (every secret equally often), but a step's 96 are drawn
    # at random: the best 4 numbers chosen in hindsight for 5 steps' games reach ~0.45, so 0.5
    assert late > BLIND_CEILING + 0.1, f"last 5 steps {late:.3f}: not clearly above what ignoring the answers gets"
    assert all(r["episode/env_errors_mean"] == 0.0 and r["episode/tool_errors_mean"] == 0.0 for r in steps)
    assert 1.0 <= steps[-1]["episode/turns_mean"] <= 4.0
