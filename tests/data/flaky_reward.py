"""The reverse task's reward, raising on 3-character completions (as a parser might): the run
must score them reward.fallback_score, name them, and go on."""

from rlhf_dist.data.tasks import reverse_reward


def score(prompts, completions, **fields):
    if any(len(c) == 3 for c in completions):
        if len(completions) > 1:
            raise ValueError("batch has a 3-char completion")
        raise ValueError(f"cannot score {completions[0]!r}")
    return reverse_reward(prompts, completions, **fields)
