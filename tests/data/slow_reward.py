"""The built-in reverse task's reward, slowed to about a second per step: long enough for a test
to kill the driver between two checkpoints."""

import time

from rlhf_dist.data.tasks import reverse_reward


def score(prompts, completions, **fields):
    time.sleep(1.0)
    return reverse_reward(prompts, completions, **fields)
