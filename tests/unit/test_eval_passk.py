"""pass@k (Chen et al. 2021) and the statistics of an eval set, against hand values and brute force."""

import itertools
import math
import random

import pytest

from rlhf_dist.evaluation import pass_at_k, set_metrics, sets_table


@pytest.mark.parametrize("n, c, k, expected", [
    (1, 0, 1, 0.0), (1, 1, 1, 1.0),
    (2, 1, 1, 0.5),  # one of two samples correct: a single draw finds it half the time
    (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (4, 1, 4, 1.0),  # all four drawn: the correct one is among them
    (10, 3, 1, 0.3),  # pass@1 is c / n
    (10, 0, 5, 0.0), (10, 10, 3, 1.0),
    (8, 2, 3, 1 - 20 / 56),  # 1 - C(6,3)/C(8,3)
])
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_the_share_of_k_subsets_holding_a_correct_sample():
    """Brute force: every k-subset of n samples, c of them correct."""
    for n in range(1, 9):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_where_the_binomials_overflow():
    """n = 2000: C(2000, 1000) ~ 1e600 overflows a float; the product form does not."""
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5, abs=1e-12)
    exact = 1 - math.comb(1990, 1000) / math.comb(2000, 1000)  # exact integers, then one division
    assert pass_at_k(2000, 10, 1000) == pytest.approx(exact, rel=1e-9)
    assert 0.0 <= pass_at_k(2000, 1, 1) <= 1.0


def test_pass_at_k_refuses_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_set_metrics_by_hand():
    """2 prompts x n=4 samples: prompt 0 solves 1 of 4, prompt 1 none; greedy solves prompt 0."""
    metrics = set_metrics(
        greedy_scores=[1.0, 0.5], greedy_gold=[1.0, 0.5], greedy_lengths=[3, 5],
        sampled_scores=[1.0, 0.2, 0.2, 0.2, 0.0, 0.0, 0.4, 0.0],
        sampled_gold=[1.0, 0.2, 0.2, 0.2, 0.0, 0.0, 0.4, 0.0],
        sampled_lengths=[2, 2, 2, 2, 4, 4, 4, 4], n=4, ks=[1, 2, 4], threshold=1.0 - 1e-6)
    assert metrics["prompts"] == 2 and metrics["greedy"] == 0.75 and metrics["greedy_solved"] == 0.5
    assert metrics["greedy_length"] == 4.0 and metrics["sampled_length"] == 3.0
    assert metrics["mean@4"] == pytest.approx(2.0 / 8)
    assert metrics["pass@1"] == pytest.approx((0.25 + 0.0) / 2)
    assert metrics["pass@2"] == pytest.approx((0.5 + 0.0) / 2)  # 1 - C(3,2)/C(4,2) = 0.5
    assert metrics["pass@4"] == pytest.approx((1.0 + 0.0) / 2)


def test_set_metrics_mean_pass_at_1_is_the_solved_share_of_samples():
    rng = random.Random(0)
    n, prompts = 6, 20
    gold = [float(rng.random() < 0.3) for _ in range(n * prompts)]
    metrics = set_metrics([0.0] * prompts, [0.0] * prompts, [1] * prompts, gold, gold, [1] * len(gold),
                          n, [1], 0.5)
    assert metrics["pass@1"] == pytest.approx(sum(gold) / len(gold))


def test_threshold_decides_solved():
    metrics = set_metrics([0.9], [0.9], [1], [0.9, 0.9], [0.9, 0.9], [1, 1], 2, [1], threshold=0.8)
    assert metrics["pass@1"] == 1.0 and metrics["greedy_solved"] == 1.0
    metrics = set_metrics([0.9], [0.9], [1], [0.9, 0.9], [0.9, 0.9], [1, 1], 2, [1], threshold=1.0)
    assert metrics["pass@1"] == 0.0 and metrics["greedy_solved"] == 0.0


def test_greedy_only_set_has_no_sampled_statistics():
    metrics = set_metrics([1.0], [1.0], [2], [], [], [], 0, [1], 0.5)
    assert set(metrics) == {"prompts", "greedy", "greedy_solved", "greedy_length"}


def test_sets_table_groups_metrics_by_set_and_skips_the_flat_ones():
    table = sets_table({"eval/reward_mean": 0.5, "eval/held_out/greedy": 0.5, "eval/held_out/pass@1": 0.2,
                        "eval/math/greedy": 0.1, "eval/episode/turns_mean": 2.0})
    assert table == {"held_out": {"greedy": 0.5, "pass@1": 0.2}, "math": {"greedy": 0.1}}
