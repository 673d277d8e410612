"""The eval harness: every eval set (rlhf_dist.evaluation.sets) on the rollout engines, scored by
the reward actor. RLTrainer.evaluate runs it during training, stage=eval on any model
(rlhf_dist.stages.evaluate): the same code, so both report the same numbers for the same weights.

    1. generate  per set: a greedy response per prompt and, with n > 0, n sampled ones, on the
                 set's own random streams (seeding "eval:<set>")
    2. score     every pass in flight at once: the run's reward (raw, not normalised) or the
                 set's own reward_fn (RewardActor.score_with)
    3. metrics   eval/reward_mean, eval/solved_frac, ... from held_out's greedy pass (as before),
                 eval/<set>/{greedy, greedy_solved, mean@n, pass@k, ...} for every set

The sampled pass's seeds depend on (rollout.seed, set, prompt, sample), not on the step: every
eval draws the same random numbers, so two evals differ by their weights alone (common random
numbers), and stage=eval on an exported policy repeats the run's eval of it exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from rlhf_dist.data.messages import Sample, Scores
from rlhf_dist.errors import RewardSamplesFailedError
from rlhf_dist.evaluation import EvalSet, set_metrics
from rlhf_dist.rl.metrics import eval_metrics
from rlhf_dist.runtime.group import ActorGroup, wait_all

EVAL_STEP = 0  # the seeds' step: the same at every eval (see the module docstring)


@dataclass
class ScoredPass:
    """One pass (greedy or sampled) over a set's prompts: its samples, prompt-major, and their
    scores (None when the reward function raised on some and reward.fallback_score is null)."""

    samples: list[Sample]
    records: list[dict]
    scores: Scores | None = None
    error: str = ""


@dataclass
class SetResult:
    greedy: ScoredPass
    sampled: ScoredPass | None = None  # None with n = 0


class EvalHarness:
    """Eval sets on `engines` (through `generation`, rlhf_dist.rl.generation) scored by `reward`.

    `ks`: the k of pass@k; `recover(phase, call)` runs the scoring again after replacing a dead
    reward actor (RLTrainer.with_aux_recovery; identity in stage=eval)."""

    def __init__(self, generation, reward: ActorGroup, ks: list[int], timeout_s: float,
                 recover: Callable[[str, Callable[[], Any]], Any] | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.generation, self.reward, self.ks, self.timeout_s = generation, reward, list(ks), timeout_s
        self.recover = recover or (lambda phase, call: call())
        self.log = log

    def evaluate(self, sets: list[EvalSet], prefix: str = "eval", per_set: bool = True) -> dict[str, float]:
        """<prefix>/reward_mean, solved_frac, ... of the first set's greedy pass and, with
        `per_set`, eval/<set>/... of every set."""
        start = time.perf_counter()
        results = self.run(sets)
        first = results[sets[0].name].greedy
        if first.scores is None:
            nan = float("nan")
            metrics = {"eval/reward_mean": nan, "eval/solved_frac": nan, "eval/length_mean": nan}
        else:
            metrics = eval_metrics(first.scores, first.samples, time.perf_counter() - start)
        if prefix != "eval":
            metrics = {f"{prefix}/{k.split('/', 1)[1]}": v for k, v in metrics.items()}
        if per_set:
            for s in sets:
                metrics.update({f"eval/{s.name}/{k}": v for k, v in self.set_metrics(s, results[s.name]).items()})
        return metrics

    def run(self, sets: list[EvalSet]) -> dict[str, SetResult]:
        """Phases 1 and 2 for every set: {set name: its scored passes}."""
        # 1. generate: every pass queued on the engines at once (they run them in order), then collected
        launch = self.generation.launch_generate
        launched = [(launch(s.records, 1, 0.0, EVAL_STEP, s.stream),
                     launch(s.records, s.spec.n, s.spec.temperature, EVAL_STEP, s.stream) if s.spec.n else None)
                    for s in sets]
        results = {}
        for s, (greedy, sampled) in zip(sets, launched):
            results[s.name] = SetResult(self._collect(greedy), self._collect(sampled) if sampled else None)
        self.recover("eval", lambda: self._score(sets, results))  # 2. score
        return results

    def _collect(self, launched: dict) -> ScoredPass:
        samples, records, _ = self.generation.collect_generate(launched)
        return ScoredPass(samples, records)

    def _score(self, sets: list[EvalSet], results: dict[str, SetResult]) -> None:
        passes = [(s, p) for s in sets for p in (results[s.name].greedy, results[s.name].sampled) if p]
        refs = []
        for s, scored in passes:  # all in flight; each waited for on its own, so one set's failure is its own
            texts = [sample.text for sample in scored.samples]
            if s.spec.reward_fn is None:  # the run's reward, raw: one scale over the run
                refs.append(self.reward.call("score", scored.records, texts, False, False)[0])
            else:
                refs.append(self.reward.call("score_with", s.spec.reward_fn, scored.records, texts)[0])
        for (s, scored), ref in zip(passes, refs):
            try:
                scored.scores = wait_all([ref], self.reward.names[:1], f"eval set '{s.name}' scoring", self.timeout_s)[0]
            except RewardSamplesFailedError as err:  # reward.fallback_score=null: no score for this pass
                scored.error = str(err)
                self.log(f"[eval] set '{s.name}' not scored: {err}")
                continue
            if scored.scores.report:
                self.log(scored.scores.report)

    def set_metrics(self, s: EvalSet, result: SetResult) -> dict[str, float]:
        """greedy, greedy_solved, mean@n, pass@k, lengths (rlhf_dist.evaluation.passk); NaN where
        a pass could not be scored."""
        greedy, sampled = result.greedy, result.sampled
        if greedy.scores is None or (sampled is not None and sampled.scores is None):
            nan = float("nan")
            return {"greedy": nan, **({f"pass@{k}": nan for k in self.ks} if sampled else {})}
        return set_metrics(
            greedy.scores.reward, _gold(greedy.scores), _lengths(greedy.samples),
            sampled.scores.reward if sampled else [], _gold(sampled.scores) if sampled else [],
            _lengths(sampled.samples) if sampled else [], s.spec.n, self.ks, s.spec.solved_threshold)


def _gold(scores: Scores) -> list[float]:
    """What decides solved: the rule (gold) score, else the reward (as eval/solved_frac)."""
    return scores.rule if scores.rule is not None else scores.reward


def _lengths(samples: list[Sample]) -> list[float]:
    """The policy's tokens of each response (a multi-turn episode's observations not counted)."""
    return [float(sum(s.loss_mask) if s.loss_mask else len(s.token_ids)) for s in samples]


def format_sets(step: int, metrics: dict[str, float]) -> list[str]:
    """One console line per eval set: `[eval] step 10 | held_out | greedy 0.55 solved 0.05 | ...`."""
    from rlhf_dist.evaluation import sets_table

    lines = []
    for name, row in sets_table(metrics).items():
        parts = " ".join(f"{k.replace('greedy_', '')} {v:.3f}" for k, v in row.items()
                         if k not in ("prompts", "greedy_length", "sampled_length"))
        lines.append(f"[eval] step {step:>4} | {name} ({int(row.get('prompts', 0))} prompts) | {parts}")
    return lines
