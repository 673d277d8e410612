"""The stages `rlhf-dist` runs, picked by `stage=<name>`: each a short driver over actor groups.

    rl            rl.py: RL (the default), with its SFT warm-up
    sft           recipe.py -> sft.py: supervised fine-tuning on demonstrations
    reward_model  recipe.py -> reward_model.py: a Bradley-Terry reward model from pairs / rankings
    full_recipe   recipe.py: SFT -> reward model -> RL against it
    eval          evaluate.py: the eval sets on any model, no training (engines and reward only)

Adding a stage: its module here and one line in rlhf_dist.config.STAGES, which is part of the
schema (config validation reads the names there).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from rlhf_dist.config import STAGES


def stage_runner(name: str) -> Callable[[Any], dict]:
    """The function that runs stage `name` (imported only when that stage runs)."""
    module, function = STAGES[name].split(":")
    return getattr(importlib.import_module(module), function)
