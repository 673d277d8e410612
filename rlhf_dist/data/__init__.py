"""Prompt sources, built-in tasks with rewards checked in code, and reward-function loading."""

from rlhf_dist.data.prompts import PromptSampler, load_prompt_records
from rlhf_dist.data.reward_fn import check_reward_fn, load_reward_fn
from rlhf_dist.data.tasks import TASKS, Task, clean_completion, get_task, register_task

__all__ = [
    "TASKS",
    "PromptSampler",
    "Task",
    "check_reward_fn",
    "clean_completion",
    "get_task",
    "load_prompt_records",
    "load_reward_fn",
    "register_task",
]
