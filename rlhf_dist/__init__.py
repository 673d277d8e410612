"""rlhf_dist: distributed actor/learner RLHF (GRPO, PPO) on Ray, vLLM and DeepSpeed."""

__version__ = "0.1.0"
