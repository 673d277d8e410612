"""Reward actor: scores (prompt, completion) pairs with a rule function, a reward model, or both.

    reward = fn_weight * rule(prompt, completion) + model_weight * post(RM(prompt + completion))

RM may be an ensemble of K reward models: its score is then mean - uncertainty_coef * std over
the members (an uncertainty-penalised reward, Coste et al. 2023). `post` is optional running
normalisation (mean 0, std 1 over every score seen so far) and
clipping. The actor returns the components too, so a rule that is the task's hidden "gold" score
can be logged beside the learned reward it is not trained on (fn_weight=0): reward hacking shows.
A sample on which the rule raises gets `fallback_score` in its place and is reported back; with
fallback_score None the batch is refused instead (RewardSamplesFailedError: skip the step).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlhf_dist.runtime.files import ModelSpec, local_model_path
from rlhf_dist.data.messages import Scores
from rlhf_dist.data.reward_fn import format_failures, load_reward_fn, reward_part_means, score_samples
from rlhf_dist.errors import RewardSamplesFailedError


class FunctionScorer:
    """`fn(prompts, completions, **fields) -> list[float]`, validated on every call; samples on
    which it raises get `fallback_score` (None: the batch is refused)."""

    def __init__(self, spec: str, fallback_score: float | None = 0.0) -> None:
        self.spec, self.fallback_score = spec, fallback_score
        self.fn = load_reward_fn(spec)

    def score(self, records: list[dict[str, Any]],
              completions: list[str]) -> tuple[list[float], list[dict[str, Any]]]:
        """(one score per completion, the samples fn raised on: see score_samples)."""
        scores, failures = score_samples(self.fn, self.spec, records, completions)
        if failures and self.fallback_score is None:
            raise RewardSamplesFailedError(
                format_failures(failures, self.spec, len(completions), None), failures)
        return [self.fallback_score if s is None else s for s in scores], failures

    def part_means(self, records: list[dict[str, Any]], completions: list[str]) -> dict[str, float]:
        """The means of the terms fn reports beside its total, if it does (reward_part_means)."""
        return reward_part_means(self.fn, self.spec, records, completions)


class ModelScorer:
    """A trained scalar reward model, or an ensemble of them (models.scalar_reward.ensemble_scales),
    scoring the text (its own tokenizer), in batches. `score` returns each completion's mean
    score over the members, each standardised by its own offset and scale, and their standard
    deviation (0 for a single model)."""

    def __init__(self, path: str, batch_size: int = 64, device: str = "cpu",
                 expected_members: int | None = None) -> None:
        from rlhf_dist.models.hf import disable_dropout, load_tokenizer
        from rlhf_dist.models.scalar_reward import check_reward_model_dir, ensemble_scales, load_reward_model

        members = ensemble_scales(check_reward_model_dir(path, expected_members))
        self.models = [disable_dropout(load_reward_model(m, device)).eval().requires_grad_(False)
                       for m, _ in members]
        self.offsets = torch.tensor([offset for _, (offset, _) in members])[:, None]
        self.scales = torch.tensor([scale for _, (_, scale) in members])[:, None]
        self.tokenizer, self.batch_size, self.device = load_tokenizer(members[0][0]), batch_size, device

    @torch.inference_mode()
    def score(self, records: list[dict[str, Any]], completions: list[str]) -> tuple[list[float], list[float]]:
        from rlhf_dist.data.records import render_prompt
        from rlhf_dist.models.scalar_reward import reward_model_inputs, sequence_rewards

        prompts = [render_prompt(r["prompt"], self.tokenizer) for r in records]
        if not prompts:
            return [], []
        scores = []  # (members, B)
        for start in range(0, len(prompts), self.batch_size):
            end = start + self.batch_size
            ids, mask = reward_model_inputs(self.tokenizer, prompts[start:end], completions[start:end])
            ids, mask = ids.to(self.device), mask.to(self.device)
            scores.append(torch.stack([sequence_rewards(model, ids, mask) for model in self.models]))
        scores = (torch.cat(scores, dim=1).cpu() - self.offsets) / self.scales  # members on one scale
        std = scores.std(0, unbiased=False) if len(self.models) > 1 else torch.zeros(scores.shape[1])
        return scores.mean(0).tolist(), std.tolist()


class RunningNorm:
    """Running mean and variance (Welford/Chan) of every score seen."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])

    def update(self, values: list[float]) -> None:
        batch = torch.tensor(values, dtype=torch.float64)
        n, mean, var = len(values), float(batch.mean()), float(batch.var(unbiased=False))
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += var * n + delta**2 * self.count * n / total
        self.count = total

    def normalize(self, values: list[float]) -> list[float]:
        """(v - mean) / std with the statistics so far (std 1 before two scores are seen)."""
        std = math.sqrt(self.m2 / max(1, self.count - 1)) if self.count > 1 else 1.0
        return [(v - self.mean) / (std + 1e-8) for v in values]


class RewardActor:
    def __init__(self, fn_spec: str | None, model_path: ModelSpec | None = None, fn_weight: float = 1.0,
                 model_weight: float = 1.0, normalize: bool = False, clip: float | None = None,
                 batch_size: int = 64, device: str = "cpu", fallback_score: float | None = 0.0,
                 ensemble: int | None = None, uncertainty_coef: float = 0.0) -> None:
        self.rule = FunctionScorer(fn_spec, fallback_score) if fn_spec else None
        model_path = local_model_path(model_path)
        self.model = ModelScorer(model_path, batch_size, device, ensemble) if model_path else None
        self.fn_weight, self.model_weight, self.clip = fn_weight, model_weight, clip
        self.uncertainty_coef = uncertainty_coef
        self.norm = RunningNorm() if normalize else None
        self.fallback_score = fallback_score
        self.set_scorers: dict[str, FunctionScorer] = {}  # eval sets' own reward functions, by spec

    def ready(self) -> bool:
        return True

    def score(self, records: list[dict[str, Any]], completions: list[str],
              update_stats: bool = True, normalized: bool = True) -> Scores:
        """{"reward": the training reward, "rule": ..., "model": ...}, one float per completion,
        "failures": the samples the rule raised on (scored fallback_score; `report` is their
        console lines, "" when none), "metrics": {"reward/failed_samples": their count}.

        `records[i]` is the prompt record completion i answers. Eval calls pass
        update_stats=False, normalized=False: held-out scoring neither moves the running
        normalisation nor goes through it, so an eval's reward is on one scale over the whole run
        (the normaliser's statistics change as the policy does; step 0 has none).
        Raises RewardSamplesFailedError when the rule raised on some samples and fallback_score
        is None, RewardFnError when it raised on all of them.
        """
        rule, failures = self.rule.score(records, completions) if self.rule else (None, [])
        model, model_std = self.model.score(records, completions) if self.model else (None, None)
        shaped = model
        if model is not None and self.uncertainty_coef:  # pessimism where the members disagree
            shaped = [m - self.uncertainty_coef * s for m, s in zip(model, model_std)]
        if shaped is not None and self.norm is not None:
            if update_stats:
                self.norm.update(shaped)
            shaped = self.norm.normalize(shaped) if normalized else shaped
        if shaped is not None and self.clip is not None and (normalized or self.norm is None):
            shaped = [max(-self.clip, min(self.clip, v)) for v in shaped]
        reward = [0.0] * len(completions)
        if rule is not None:
            reward = [r + self.fn_weight * v for r, v in zip(reward, rule)]
        if shaped is not None:
            reward = [r + self.model_weight * v for r, v in zip(reward, shaped)]
        report = (format_failures(failures, self.rule.spec, len(completions), self.rule.fallback_score)
                  if failures else "")
        metrics = {"reward/failed_samples": float(len(failures))}
        if self.rule is not None and not failures:
            metrics.update(self.rule.part_means(records, completions))
        if model_std is not None and len(self.model.models) > 1:
            metrics["reward/model_std_mean"] = sum(model_std) / len(model_std)
        return Scores(reward=reward, rule=rule, model=model, failures=failures, report=report,
                      metrics=metrics, state=self.state_dict() if self.norm is not None and update_stats else None)

    def score_with(self, fn_spec: str, records: list[dict[str, Any]], completions: list[str]) -> Scores:
        """Scores from an eval set's own reward function (eval.sets.<name>.reward_fn, imported here
        once): its score is both the reward and the rule (gold) score; no model, no normaliser."""
        if fn_spec not in self.set_scorers:
            self.set_scorers[fn_spec] = FunctionScorer(fn_spec, self.fallback_score)
        scorer = self.set_scorers[fn_spec]
        scores, failures = scorer.score(records, completions)
        report = format_failures(failures, fn_spec, len(completions), self.fallback_score) if failures else ""
        return Scores(reward=scores, rule=scores, model=None, failures=failures, report=report,
                      metrics={"reward/failed_samples": float(len(failures))})

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the reward normaliser's running statistics."""
        return {"norm": self.norm.state_dict() if self.norm is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.norm is not None and state.get("norm") is not None:
            self.norm.load_state_dict(state["norm"])
