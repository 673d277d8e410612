"""trainer.async_rollout=true end to end on the real actors: the engine generates batch k+1 while
the learners train on batch k; every batch after the first is one update stale, corrected by TIS
with pi_old taken from the training forward (one optimizer step per batch).

One run (about 80 s on 2 cores, most of it start-up) checks the pipeline, the checkpointed sampler
state, an engine killed with a batch in flight, the timing metrics and that the reward rises."""

import pytest
import ray

from rlhf_dist.runtime.cpu import available_cores
from rlhf_dist.data.prompts import PromptSampler

from helpers import assert_rises, start_trainer, threads_and_cores

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS, KILL_AFTER = 10, 4


def test_async_rollout_overlaps_generation_and_learns(tiny_model_dir, tmp_path):
    # generation and training on their own cores, as overlapping them is meant to run
    split = len(available_cores()) >= 2
    trainer = start_trainer(tmp_path / "run", tiny_model_dir, [
        "trainer.async_rollout=true", f"trainer.total_steps={STEPS}",
        "learner.mini_batch_size=64",  # 8 prompts x 8 samples: one optimizer step per batch
        "algo.kl_coef=0", "learner.optim.lr=2e-3", "learner.optim.warmup_steps=0",
        *(["cluster.engine_cores=0", "cluster.learner_cores=1"] if split else [])])
    try:
        if split:  # the engine on core 0 with one thread, both learner ranks on core 1
            assert threads_and_cores(trainer.engines.actors[0]) == (1, [0])
            assert [threads_and_cores(a) for a in trainer.learners.actors] == [(1, [1])] * 2
        rows = []
        for step in range(1, STEPS + 1):
            rows.append(trainer.step(step))
            if step == 2:  # a checkpoint now holds the sampler from before the prefetched draw
                sampler = PromptSampler(trainer.sampler.records, trainer.sampler.batch_size)
                sampler.load_state_dict(trainer.state_dict(step)["sampler"])
                assert sampler.next_batch() == trainer.prefetched.records
            if step == KILL_AFTER:  # the next step's launch meets a dead engine
                ray.kill(trainer.engines.actors[0], no_restart=True)
        assert trainer.prefetched is None  # the last step launched no generation
    finally:
        trainer.shutdown()
        ray.shutdown()
    rewards = [round(r["reward/mean"], 3) for r in rows]
    # the engine restarted during step 5's wait got the learner's current weights and regenerated
    # batch 6 with them: that batch is on-policy
    expected = [0.0] + [1.0] * (STEPS - 1)
    expected[KILL_AFTER + 1] = 0.0
    assert [r["async/staleness"] for r in rows] == expected
    assert [r["faults/engine_restarts"] for r in rows][KILL_AFTER - 1:KILL_AFTER + 1] == [0.0, 1.0]
    assert all(r["sync/verified_tensors"] > 0 for r in rows)
    # the correction is on and logged; at step 1 the engine held the learner's weights (float32)
    for key in ("policy/is_weight_mean", "policy/is_capped_frac", "policy/rollout_mismatch_kl"):
        assert all(key in r for r in rows), key
    assert rows[0]["policy/rollout_logprob_diff_max"] < 1e-3
    assert rows[1]["policy/rollout_mismatch_kl"] > 100 * rows[0]["policy/rollout_mismatch_kl"] + 1e-4
    # generation was partly hidden behind training (the last step launched none)
    assert sum(r["timing/generate_hidden_s"] for r in rows[:-1]) > 0
    assert rows[-1]["timing/generate_hidden_s"] == 0.0
    assert_rises(rewards, head=3, tail=3, within_sd=[r["reward/std"] for r in rows], batch=64)
