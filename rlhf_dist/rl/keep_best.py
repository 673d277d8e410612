"""trainer.keep_best: keep the policy of the best held-out eval, not only the last one.

RL against a learned reward can keep raising that reward while the true objective falls (reward
over-optimisation, Gao et al. 2022), so the last policy need not be the best. At every eval
(step 0, the SFT/initial policy, included) the run also scores the policy greedily on selection
prompts of its own, disjoint from the eval prompts (logged as select/...), and compares
`trainer.keep_best`, an eval metric to maximise (`eval/rule_mean` when a gold/rule score is
logged, else e.g. `eval/model_mean`), computed on them, with the best so far; an eval whose
policy has drifted past `trainer.kl_budget` (the last step's KL to the reference, nats per
sequence) is not a candidate. The best policy is written to run_dir/best (HF format) and exported
as run_dir/final at the end; run_dir/best/choice.json says which step it is and why. The eval/
figures of the kept step are then an honest estimate: the choice was made on other prompts.
"""

from __future__ import annotations

import json
import math
import shutil
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

    def __init__(self, metric: str, kl_budget: Optional[float], run_dir: str, resumed_at: int = 0) -> None:
        self.metric, self.kl_budget = metric, kl_budget
        self.dir = Path(run_dir) / "best"
        self.best: Optional[Choice] = self._load(resumed_at)
        self._checked = False

    def _load(self, resumed_at: int) -> Optional[Choice]:
        """A resumed run keeps the choice its first part made, unless that choice came from steps
        after the checkpoint it resumes from (a policy of the abandoned continuation)."""
        path = self.dir / "choice.json"
        if not path.is_file():
            return None
        choice = Choice(**json.loads(path.read_text()))
        if choice.step > resumed_at:
            shutil.rmtree(self.dir)
            return None
        return choice

    def consider(self, evaluation: dict[str, float], kl: float) -> bool:
        """Whether the policy just evaluated is the best so far (then save it, and call
        `kept`). NaN metrics and policies past the KL budget never are."""
        if not self._checked and self.metric not in evaluation and not any(
                math.isnan(v) for v in evaluation.values()):
            raise ConfigError(
                f"trainer.keep_best={self.metric!r} is not an eval metric of this run; it logs "
                f"{sorted(k for k in evaluation if k.startswith('eval/'))}. Fix: trainer.keep_best=<one of "
                "those> (eval/rule_mean is the rule/gold score; it needs a reward model beside the rule).")
        self._checked = True
        value = evaluation.get(self.metric, float("nan"))  # an eval whose rewards failed: NaN
        if not math.isfinite(value) or (self.kl_budget is not None and kl > self.kl_budget):
            return False
        return self.best is None or value > self.best.value

    def kept(self, step: int, evaluation: dict[str, float], kl: float, saved: Path) -> None:
        """`saved` holds the policy of `step`: it becomes run_dir/best, with its choice.json, in one
        rename (a crash leaves the previous best whole)."""
        self.best = Choice(step, self.metric, evaluation[self.metric], kl)
        (saved / "choice.json").write_text(json.dumps(asdict(self.best), indent=1) + "\n")
        old = self.dir.with_name(self.dir.name + ".old")
        if self.dir.exists():
            self.dir.rename(old)
        saved.rename(self.dir)
        shutil.rmtree(old, ignore_errors=True)

    def summary(self) -> dict[str, float]:
        if self.best is None:
            return {}
        return {"best/step": self.best.step, "best/metric": self.metric, "best/value": self.best.value,
                "best/kl": self.best.kl}
