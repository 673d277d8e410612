"""pass@k and the other statistics of one eval set, from plain lists of scores (no torch, no actors).

For each prompt the harness draws a greedy response and n sampled ones; a sample is *solved* when
its correctness score (the rule/gold score) is >= the set's threshold. Then, over the P prompts:

    greedy         mean score of the greedy responses            greedy_solved  share solved
    mean@n         mean score of all P x n sampled responses
    pass@k         mean over prompts of the unbiased estimator (Chen et al. 2021, eq. 1)
                   1 - C(n - c, k) / C(n, k), c = solved samples of that prompt, k <= n
    *_length       mean response length in tokens (greedy, sampled)
"""

from __future__ import annotations

import math


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n, c of them correct, is correct)
    = 1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i): the binomials of
    n = 200 overflow a float, the product stays in [0, 1] (Chen et al. 2021, Codex paper, Fig. 3)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def set_metrics(greedy_scores: list[float], greedy_gold: list[float], greedy_lengths: list[float],
                sampled_scores: list[float], sampled_gold: list[float], sampled_lengths: list[float],
                n: int, ks: list[int], threshold: float) -> dict[str, float]:
    """The statistics of one eval set (names without the eval/<set>/ prefix).

    greedy_*: one value per prompt (P,); sampled_*: (P * n,), prompt-major (the n samples of a
    prompt contiguous); n = 0: no sampled pass. *_scores: the reward; *_gold: the correctness score
    that decides solved (>= threshold); *_lengths: response tokens."""
    metrics = {"prompts": float(len(greedy_scores)), "greedy": _mean(greedy_scores),
               "greedy_solved": _mean([float(g >= threshold) for g in greedy_gold]),
               "greedy_length": _mean(greedy_lengths)}
    if not n:
        return metrics
    if len(sampled_gold) != n * len(greedy_gold):
        raise ValueError(f"{len(sampled_gold)} sampled scores for {len(greedy_gold)} prompts x n={n}")
    solved = [sum(g >= threshold for g in sampled_gold[i:i + n]) for i in range(0, len(sampled_gold), n)]
    metrics[f"mean@{n}"] = _mean(sampled_scores)
    for k in ks:
        metrics[f"pass@{k}"] = _mean([pass_at_k(n, c, k) for c in solved])
    metrics["sampled_length"] = _mean(sampled_lengths)
    return metrics


def sets_table(metrics: dict[str, float], prefix: str = "eval") -> dict[str, dict[str, float]]:
    """{set: {statistic: value}} from flat metrics named <prefix>/<set>/<statistic> (what the end
    summary and the eval report show as a table)."""
    table: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == prefix and parts[1] != "episode":
            table.setdefault(parts[1], {})[parts[2]] = value
    return table
