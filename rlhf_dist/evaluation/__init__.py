"""Evaluation without actors: the eval sets a run (or stage=eval) scores, and the statistics of
their scored samples (pass@k, mean@n, greedy score, lengths). The harness that drives the
engines and the reward actor over these sets is rlhf_dist/rl/evaluation.py."""

from rlhf_dist.evaluation.passk import pass_at_k, set_metrics, sets_table
from rlhf_dist.evaluation.sets import DEFAULT_SET, EvalSet, EvalSetSpec, eval_set_specs

__all__ = ["DEFAULT_SET", "EvalSet", "EvalSetSpec", "eval_set_specs", "pass_at_k", "set_metrics", "sets_table"]
