"""rlhf_dist.seeding: every sample's seed is its own, stable, and collides with no other run's."""

import pytest

from rlhf_dist.seeding import sample_seed, sample_seeds


def test_no_two_samples_of_a_seed_sweep_share_a_seed():
    """4 runs x 60 steps x 32 prompts x 8 samples, training and eval streams: all distinct.
    (The sums they replaced, seed * 1_000_003 + step * 100_003 + prompt (+ child, in vLLM), gave
    run 1 step 1 the streams of run 0 step 11, and one step 15 streams for 64 samples.)"""
    seen = set()
    count = 0
    for run_seed in range(4):
        for stream in ("train", "eval"):
            for step in range(60):
                grid = sample_seeds(run_seed, stream, step, 32, 8)
                # a CPU generator uses the low 32 bits: unique within every step too
                assert len({s & 0xFFFFFFFF for row in grid for s in row}) == 32 * 8
                for row in grid:
                    seen.update(row)
                    count += len(row)
    assert len(seen) == count == 4 * 2 * 60 * 32 * 8


def test_seeds_depend_only_on_their_coordinates():
    grid = sample_seeds(7, "train", 12, 3, 4)
    assert grid == sample_seeds(7, "train", 12, 3, 4)  # a resumed run draws the same
    assert [[sample_seed(7, "train", 12, i, j) for j in range(4)] for i in range(3)] == grid
    assert sample_seeds(7, "train", 12, 5, 4)[:3] == grid  # more prompts: the first keep theirs
    assert all(0 <= s < 2**63 for row in grid for s in row)


def test_bad_coordinates_are_refused():
    with pytest.raises(ValueError, match="rollout.seed=-1"):
        sample_seeds(-1, "train", 1, 2, 2)
    with pytest.raises(ValueError, match="unknown random stream 'warmup'"):
        sample_seeds(0, "warmup", 1, 2, 2)


def test_every_eval_set_has_streams_of_its_own():
    """eval:<set> streams differ from each other and from train/eval/select at the same coordinates."""
    seeds = {stream: sample_seeds(0, stream, 0, 4, 4) for stream in
             ("train", "eval", "select", "eval:held_out", "eval:math", "eval:code")}
    flat = [s for rows in seeds.values() for row in rows for s in row]
    assert len(set(flat)) == len(flat)
    assert sample_seeds(0, "eval:math", 0, 4, 4) == seeds["eval:math"]  # a function of its coordinates
