"""trainer.keep_best: keep the policy of the best held-out eval, not only the last one.

RL against a learned reward can keep raising that reward while the true objective falls (reward
over-optimisation, Gao et al. 2022), so the last policy need not be the best. At every eval
(step 0, the SFT/initial policy, included) the run compares `trainer.keep_best`, an eval metric
to maximise (`eval/rule_mean` when a gold/rule score is logged, else e.g. `eval/model_mean`),
with the best so far; an eval whose policy has drifted past `trainer.kl_budget` (the last step's
KL to the reference, nats per sequence) is not a candidate. The best policy is written to
run_dir/best (HF format) and exported as run_dir/final at the end; run_dir/best/choice.json
says which step it is and why.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from rlhf_dist.errors import ConfigError


@dataclass
class Choice:
    step: int
    metric: str
    value: float
    kl: float  # the policy's KL to the reference when it was evaluated (0 at step 0)


class BestPolicy:
    """Decides which eval's policy to keep; the caller saves the weights when `consider` says so."""

    def __init__(self, metric: str, kl_budget: Optional[float], run_dir: str) -> None:
        self.metric, self.kl_budget = metric, kl_budget
        self.dir = Path(run_dir) / "best"
        self.best: Optional[Choice] = self._load()

    def _load(self) -> Optional[Choice]:  # a resumed run keeps the choice its first part made
        path = self.dir / "choice.json"
        return Choice(**json.loads(path.read_text())) if path.is_file() else None

    def consider(self, step: int, evaluation: dict[str, float], kl: float) -> bool:
        """Whether the policy just evaluated at `step` is the best so far (then save it, and call
        `kept`). NaN metrics and policies past the KL budget never are."""
        if self.metric not in evaluation:
            raise ConfigError(
                f"trainer.keep_best={self.metric!r} is not an eval metric of this run; it logs "
                f"{sorted(k for k in evaluation if k.startswith('eval/'))}. Fix: trainer.keep_best=<one of "
                "those> (eval/rule_mean is the rule/gold score; it needs a reward model beside the rule).")
        value = evaluation[self.metric]
        if not math.isfinite(value) or (self.kl_budget is not None and kl > self.kl_budget):
            return False
        return self.best is None or value > self.best.value

    def kept(self, step: int, evaluation: dict[str, float], kl: float) -> None:
        """Record that run_dir/best now holds the policy of `step`."""
        self.best = Choice(step, self.metric, evaluation[self.metric], kl)
        (self.dir / "choice.json").write_text(json.dumps(asdict(self.best), indent=1) + "\n")

    def summary(self) -> dict[str, float]:
        if self.best is None:
            return {}
        return {"best/step": self.best.step, "best/metric": self.metric, "best/value": self.best.value,
                "best/kl": self.best.kl}
