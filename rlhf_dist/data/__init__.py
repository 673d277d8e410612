"""Prompt sources, built-in tasks with rewards checked in code, and reward-function loading."""

from rlhf_dist.data.preferences import (
    PreferencePair,
    load_preference_pairs,
    load_sft_records,
    ranking_to_pairs,
)
from rlhf_dist.data.prompts import PromptSampler, load_prompt_records
from rlhf_dist.data.records import fit_prompt_length, read_records, render_prompt
from rlhf_dist.data.reward_fn import check_reward_fn, load_reward_fn
from rlhf_dist.data.tasks import TASKS, Task, clean_completion, get_task, register_task

__all__ = [
    "TASKS",
    "PreferencePair",
    "PromptSampler",
    "Task",
    "check_reward_fn",
    "clean_completion",
    "fit_prompt_length",
    "get_task",
    "load_preference_pairs",
    "load_prompt_records",
    "load_reward_fn",
    "load_sft_records",
    "ranking_to_pairs",
    "read_records",
    "register_task",
    "render_prompt",
]
