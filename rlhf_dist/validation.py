"""Config validation: `validate(cfg)` and `check_override_keys(argv)`, run before any actor starts.

Every failure raises `ConfigError` that says what was given, what was expected and how to fix it.
"""

from __future__ import annotations

import math
from typing import Any

from rlhf_dist.config import (STAGES, RLConfig, critic_micro_batch_size, old_logprobs_source, response_budget, uses_critic,
                              uses_reference)
from rlhf_dist.errors import ConfigError

_CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "rollout.dtype": ("float32", "bfloat16"),
    "rollout.sleep_level": (0, 1, 2),
    "learner.backend": ("auto", "gloo", "nccl"),
    "learner.optim.scheduler": ("constant", "linear", "cosine"),
    "critic.optim.scheduler": ("constant", "linear", "cosine"),
    "cluster.device": ("cpu", "cuda"),
    "logger.wandb.mode": ("offline", "online", "disabled"),
    "stage": tuple(STAGES),
    "sft.on_bad": ("error", "skip"),
    "task.long_prompts": ("truncate", "drop", "error"),
    "recipe.rm_init": ("sft", "base"),
    "reward_model.on_bad": ("error", "skip"),
}

_POSITIVE = (
    "trainer.total_steps", "trainer.prompts_per_step", "trainer.max_bad_steps", "rollout.num_engines",
    "rollout.n_samples_per_prompt", "rollout.max_new_tokens", "rollout.tensor_parallel_size",
    "rollout.max_turns", "rollout.max_episode_tokens", "rollout.tool_timeout_s",
    "rollout.sync_bucket_mb", "rollout.sync_timeout_s", "learner.world_size",
    "learner.mini_batch_size", "learner.micro_batch_size", "learner.optim.lr", "algo.ppo_epochs",
    "algo.kl_horizon", "critic.optim.lr", "task.max_prompt_len", "sft.steps", "sft.batch_size", "sft.micro_batch_size",
    "sft.lr", "sft.eval_every", "reward_model.steps", "reward_model.batch_size",
    "reward_model.micro_batch_size", "reward_model.lr", "reward_model.eval_every",
    "recipe.num_prompts", "recipe.num_pairs", "reward.model.ensemble",
    "algo.sft_batch_size",
)

# (key, lowest, highest): closed ranges; None = unbounded on that side
_RANGES = (
    ("algo.gamma", 0.0, 1.0), ("algo.lam", 0.0, 1.0), ("algo.clip_low", 0.0, 1.0),
    ("algo.clip_high", 0.0, None), ("algo.kl_coef", 0.0, None), ("algo.entropy_coef", 0.0, None),
    ("critic.value_loss_coef", 0.0, None), ("reward.model.uncertainty_coef", 0.0, None),
    ("algo.sft_coef", 0.0, None),
    ("recipe.bias", 0.0, 1.0),
)


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _registered_choices() -> dict[str, tuple]:
    """Choices that registries hold: every registered weight transport. Imported only when
    validating: the transports import torch, which `--help` and a bad key should not wait for."""
    from rlhf_dist.weights.transports import transport_names

    return {"rollout.sync_transport": transport_names()}


def validate(cfg: Any) -> None:
    """Check values and their consistency; raise ConfigError naming the key and the fix."""
    for key, choices in {**_CHOICES, **_registered_choices()}.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {list(choices)}. "
                              f"Fix: pass {key}=<one of those> on the command line.")
    for key in _POSITIVE:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be > 0.")
    for key, low, high in _RANGES:
        value = _get(cfg, key)
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
            raise ConfigError(f"{key}={value!r} is out of range: expected {bounds}.")
    for key in ("learner.zero_stage", "critic.zero_stage"):
        if not 0 <= _get(cfg, key) <= 3:
            raise ConfigError(f"{key}={_get(cfg, key)} must be 0, 1, 2 or 3.")
    if not 0.0 < cfg.rollout.temperature:
        raise ConfigError(f"rollout.temperature={cfg.rollout.temperature} must be > 0 for RL "
                          "sampling (greedy decoding gives every sample of a group the same reward).")
    if cfg.reward.model.uncertainty_coef > 0 and cfg.reward.model.ensemble < 2:
        raise ConfigError(
            f"reward.model.uncertainty_coef={cfg.reward.model.uncertainty_coef} penalises disagreement "
            f"between reward models, but reward.model.ensemble={cfg.reward.model.ensemble}. Fix: "
            "reward.model.ensemble=3 (and a reward model trained with it), or reward.model.uncertainty_coef=0.")
    if cfg.algo.sft_coef > 0 and cfg.algo.sft_batch_size % cfg.learner.world_size:
        raise ConfigError(f"algo.sft_batch_size={cfg.algo.sft_batch_size} must split evenly over "
                          f"learner.world_size={cfg.learner.world_size} ranks. Fix: a multiple of "
                          f"{cfg.learner.world_size}, e.g. algo.sft_batch_size={4 * cfg.learner.world_size}.")
    _validate_keep_best(cfg)
    _validate_eval(cfg)
    if cfg.rollout.env:  # importable, with a step method: before any actor starts
        from rlhf_dist.envs.base import load_env

        load_env(cfg.rollout.env)
        ro = cfg.rollout
        if ro.max_episode_tokens < ro.max_new_tokens:
            raise ConfigError(f"rollout.max_episode_tokens={ro.max_episode_tokens} is below one policy turn's "
                              f"rollout.max_new_tokens={ro.max_new_tokens}. Fix: rollout.max_episode_tokens="
                              f"{ro.max_new_tokens * ro.max_turns} (a turn per rollout.max_turns) or more.")
        if ro.ignore_eos:
            raise ConfigError("rollout.ignore_eos=true with rollout.env: a policy turn ends at its end-of-sequence "
                              "token, which ignore_eos forbids. Fix: rollout.ignore_eos=false.")
        if cfg.stage == "eval":
            raise ConfigError(f"stage=eval with rollout.env={ro.env!r}: the evaluation stage plays single "
                              "completions, not multi-turn episodes, so it would not score what the run's own "
                              "eval scored. Fix: evaluate a multi-turn policy inside a run (trainer.eval_every, "
                              "or trainer.total_steps=0 with model.path=<export>), or drop rollout.env.")
    fallback = cfg.reward.fallback_score
    if fallback is not None and not math.isfinite(fallback):
        raise ConfigError(f"reward.fallback_score={fallback} must be a finite number (the score of a "
                          "sample on which reward.fn raises), or null to skip such steps.")
    if cfg.rollout.top_p != 1.0:
        raise ConfigError(
            f"rollout.top_p={cfg.rollout.top_p}: the engine's logprobs would then be taken over the "
            "top-p truncated distribution while the learner's are over the full softmax, so the "
            "importance ratio would compare different distributions. Expected rollout.top_p=1.0 "
            "(tune exploration with rollout.temperature instead).")
    _validate_algo(cfg)
    _validate_lora(cfg)
    _validate_critic_lora(cfg)
    _validate_batches(cfg)
    _validate_rollout(cfg)
    _validate_off_policy(cfg)
    _validate_cluster(cfg)


def _validate_eval(cfg: Any) -> None:
    """eval.* and every eval set (ConfigError naming the set): k within each set's n, files that
    exist and hold something, reward functions that import. trainer.export_*."""
    from rlhf_dist.evaluation.sets import eval_set_specs

    ev = cfg.eval
    for key in ("trainer.export_every", "trainer.keep_exports", "eval.n"):
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}={_get(cfg, key)} must be >= 0.")
    if not ev.k or any(not isinstance(k, int) or k < 1 for k in ev.k):
        raise ConfigError(f"eval.k={list(ev.k)!r}: expected a non-empty list of whole numbers >= 1 (the k "
                          "of pass@k). Fix: e.g. eval.k=[1,4].")
    for spec in eval_set_specs(ev, cfg.rollout.temperature):
        where = f"eval set '{spec.name}'"
        if spec.n < 0:
            raise ConfigError(f"{where}: n={spec.n} must be >= 0 (0 = greedy only).")
        if spec.n and not spec.temperature > 0:
            raise ConfigError(f"{where}: temperature={spec.temperature} must be > 0 for its {spec.n} sampled "
                              "responses per prompt. Fix: a positive temperature, or n=0 (greedy only).")
        if spec.n and max(ev.k) > spec.n:
            raise ConfigError(f"{where}: eval.k={list(ev.k)} asks for pass@{max(ev.k)} from n={spec.n} samples "
                              f"per prompt; pass@k needs k <= n. Fix: eval.k=[{', '.join(str(k) for k in ev.k if k <= spec.n) or 1}] "
                              f"or n >= {max(ev.k)} (eval.n, or eval.sets={{{spec.name}: {{n: {max(ev.k)}}}}}).")
        if spec.file is not None:
            _check_eval_file(where, spec.file)
        if spec.reward_fn is not None:
            _check_eval_reward_fn(where, spec.name, spec.reward_fn)


def _check_eval_file(where: str, file: str) -> None:
    from pathlib import Path

    path = Path(file).expanduser().absolute()
    if not path.is_file():
        raise ConfigError(f"{where}: file={file!r} not found (looked at {path}). Expected prompt records, "
                          "one JSON object with a \"prompt\" per line. Fix: the path, relative to the "
                          "directory you run from, or an absolute one.")
    if not path.read_text(encoding="utf-8", errors="replace").strip():
        raise ConfigError(f"{where}: file={file!r} is empty. Expected prompt records, one JSON object with a "
                          "\"prompt\" per line. Fix: fill it, or drop the set from eval.sets.")


def _check_eval_reward_fn(where: str, name: str, spec: str) -> None:
    from rlhf_dist.data.reward_fn import load_reward_fn
    from rlhf_dist.errors import RewardFnError

    try:
        load_reward_fn(spec, option=f"eval.sets.{name}.reward_fn")
    except RewardFnError as err:
        raise ConfigError(f"{where}: {err}") from None


def _validate_lora(cfg: Any) -> None:
    """model.lora values on their own; against the model (target names, an adapter's rank) in
    rlhf_dist.models.lora.resolve_lora, once the model dir is known."""
    lora = cfg.model.lora
    _check_lora_values(lora, "model.lora")
    if lora.rank == 0:
        set_fields = [k for k, v in (("path", lora.path), ("target_modules", list(lora.target_modules)),
                                     ("export_merged", lora.export_merged),
                                     ("sync", lora.sync != "merged")) if v]
        if set_fields:
            raise ConfigError(f"model.lora.{set_fields[0]} is set but model.lora.rank=0 (LoRA off): it "
                              "would be ignored. Fix: model.lora.rank=8 (the adapter's rank with "
                              "model.lora.path), or unset it.")
        return
    if cfg.stage in ("sft", "reward_model"):
        raise ConfigError(f"model.lora.rank={lora.rank} with stage={cfg.stage}: LoRA applies to the RL "
                          "policy (and, with critic.lora, the critic); the SFT and reward-model stages train "
                          "every weight. Fix: model.lora.rank=0 for this stage.")
    if lora.sync not in ("merged", "adapter"):
        raise ConfigError(f"model.lora.sync={lora.sync!r}: expected 'merged' (the engines get W + (alpha/rank) "
                          "B A, the default) or 'adapter' (only the adapter tensors move; vLLM serves them "
                          "through its LoRA support). Fix: model.lora.sync=merged or model.lora.sync=adapter.")
    if lora.sync == "adapter":
        _validate_adapter_sync(cfg)


def _check_lora_values(lora: Any, prefix: str) -> None:
    """The values every LoRA section (model.lora, critic.lora) shares: a rank >= 0 and, with
    adapters on, alpha > 0 and 0 <= dropout < 1."""
    if lora.rank < 0:
        raise ConfigError(f"{prefix}.rank={lora.rank}: expected 0 (full fine-tuning) or a rank >= 1 "
                          f"for LoRA adapters. Fix: {prefix}.rank=8 (or 0 to train every weight).")
    if lora.rank > 0 and (not lora.alpha > 0 or not 0.0 <= lora.dropout < 1.0):
        raise ConfigError(f"{prefix}.alpha={lora.alpha}, {prefix}.dropout={lora.dropout}: expected "
                          f"alpha > 0 and 0 <= dropout < 1. Fix: e.g. {prefix}.alpha=16 {prefix}.dropout=0.")


def _validate_critic_lora(cfg: Any) -> None:
    """critic.lora on its own; against the critic's model in resolve_lora (session.prepare)."""
    lora = cfg.critic.lora
    _check_lora_values(lora, "critic.lora")
    if lora.rank == 0 and list(lora.target_modules):
        raise ConfigError("critic.lora.target_modules is set but critic.lora.rank=0 (LoRA off): it would be "
                          "ignored. Fix: critic.lora.rank=8, or unset it.")
    if lora.rank > 0 and not uses_critic(cfg):
        raise ConfigError(f"critic.lora.rank={lora.rank} but algo.advantage={cfg.algo.advantage} uses no critic: "
                          "it would be ignored. Fix: algo=ppo (GAE with a critic), or critic.lora.rank=0.")


def _validate_adapter_sync(cfg: Any) -> None:
    """model.lora.sync=adapter against the rollout layout it cannot serve (rlhf_dist/weights/adapter.py)."""
    ro = cfg.rollout
    problem = None
    if cfg.model.lora.rank > 512:
        raise ConfigError(f"model.lora.sync=adapter with model.lora.rank={cfg.model.lora.rank}: vLLM serves "
                          "adapters of rank <= 512. Fix: model.lora.rank=512 or less, or model.lora.sync=merged.")
    if ro.tensor_parallel_size > 1:
        problem = (f"rollout.tensor_parallel_size={ro.tensor_parallel_size}: adapter sync verifies the "
                   "adapter slots of one unsharded engine worker; sharded engines are not built")
    elif ro.sync_transport not in ("object_store", "collective"):
        problem = (f"rollout.sync_transport={ro.sync_transport}: that transport feeds vLLM's own weight "
                   "loader, which takes model weights, not adapters; adapter sync runs over "
                   "object_store or collective")
    elif ro.sleep_level == 2:
        problem = ("rollout.sleep_level=2: the engines drop their base weights while the learner trains, "
                   "and an adapter sync never sends them back")
    if problem:
        raise ConfigError(f"model.lora.sync=adapter with {problem}. Fix: model.lora.sync=merged (every "
                          "layout works with it), or change the setting named.")


def _validate_keep_best(cfg: Any) -> None:
    keep, budget = cfg.trainer.keep_best, cfg.trainer.kl_budget
    if keep is not None and (not str(keep).startswith("eval/") or str(keep).count("/") > 1):
        raise ConfigError(f"trainer.keep_best={keep!r} must name a greedy held-out eval metric (eval/<name>), "
                          "e.g. trainer.keep_best=eval/rule_mean (the gold/rule score), eval/model_mean or "
                          "eval/reward_mean; the selection is a greedy pass on its own prompts, so per-set "
                          "metrics (eval/<set>/pass@k) cannot be selected on.")
    # the full recipe serves the reward model it trains; elsewhere these exist only beside a reward model
    if keep in ("eval/rule_mean", "eval/model_mean") and not cfg.reward.model.path and cfg.stage != "full_recipe":
        raise ConfigError(f"trainer.keep_best={keep} is logged only beside a reward model, and reward.model.path "
                          "is not set. Fix: trainer.keep_best=eval/reward_mean, or give reward.model.path.")
    if budget is not None and keep is None:
        raise ConfigError(f"trainer.kl_budget={budget} limits which policy trainer.keep_best keeps, and "
                          "trainer.keep_best is not set. Fix: trainer.keep_best=eval/reward_mean (or another eval metric).")
    if budget is not None and cfg.algo.kl_coef == 0:
        raise ConfigError(f"trainer.kl_budget={budget} needs the KL to the reference, which is not measured with "
                          "algo.kl_coef=0 (no reference model). Fix: algo.kl_coef > 0, or trainer.kl_budget=null.")


def _check_registered(key: str, value: str, registry: dict) -> None:
    if value not in registry:
        raise ConfigError(f"{key}={value!r} is not registered; valid: {sorted(registry)}. "
                          f"Fix: pass {key}=<one of those>.")


def _validate_algo(cfg: Any) -> None:
    from rlhf_dist.algo import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGG_MODES, POLICY_LOSSES, estimator_needs

    algo = cfg.algo
    _check_registered("algo.advantage", algo.advantage, ADVANTAGE_ESTIMATORS)
    _check_registered("algo.policy_loss", algo.policy_loss, POLICY_LOSSES)
    _check_registered("algo.loss_agg", algo.loss_agg, LOSS_AGG_MODES)
    _check_registered("algo.kl_reward_estimator", algo.kl_reward_estimator, KL_ESTIMATORS)
    _check_registered("algo.kl_loss_estimator", algo.kl_loss_estimator, KL_ESTIMATORS)
    if algo.clip_ratio_c is not None and algo.clip_ratio_c <= 1.0:
        raise ConfigError(
            f"algo.clip_ratio_c={algo.clip_ratio_c}: the dual-clip bound must be > 1 (it caps the "
            "loss of negative-advantage tokens at -A * clip_ratio_c; typical 3.0). Fix: "
            "algo.clip_ratio_c=3.0, or algo.clip_ratio_c=null to turn dual-clip off.")
    for key in ("algo.kl_target", "algo.tis_cap", "critic.value_clip", "critic.micro_batch_size",
                "reward.clip", "trainer.kl_budget"):
        value = _get(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value} must be > 0 (or null to turn it off).")
    if estimator_needs(algo.advantage).groups and cfg.rollout.n_samples_per_prompt < 2:
        raise ConfigError(
            f"algo.advantage={algo.advantage} compares samples within a group, but "
            f"rollout.n_samples_per_prompt={cfg.rollout.n_samples_per_prompt}. Expected >= 2 "
            "(typical: 4-16). Fix: rollout.n_samples_per_prompt=8.")
    if uses_critic(cfg) and cfg.critic.world_size < 1:
        raise ConfigError(
            f"algo.advantage={algo.advantage} (algo={algo.name}) needs state values from a critic, "
            f"but critic.world_size={cfg.critic.world_size}. Fix: critic.world_size=2 (and CPUs/GPUs for it: "
            "cluster.cpus_per_critic / cluster.gpus_per_critic).")
    if algo.kl_coef > 0 and not (algo.kl_in_reward or algo.kl_in_loss):
        raise ConfigError(
            f"algo.kl_coef={algo.kl_coef} but both algo.kl_in_reward and algo.kl_in_loss are "
            "false, so the KL would go nowhere. Fix: set one of them true, or algo.kl_coef=0.")
    if algo.kl_target is not None and not algo.kl_coef > 0:
        raise ConfigError("algo.kl_target (adaptive KL) needs algo.kl_coef > 0 as its start value.")
    _validate_dapo(cfg)


def _validate_dapo(cfg: Any) -> None:
    """Dynamic sampling, overlong shaping and truncation masking (docs/reasoning.md)."""
    from rlhf_dist.algo import estimator_needs

    algo, ro = cfg.algo, cfg.rollout
    if algo.dynamic_sampling:
        if not estimator_needs(algo.advantage).groups:
            raise ConfigError(
                f"algo.dynamic_sampling=true drops groups whose rewards are all equal, but "
                f"algo.advantage={algo.advantage} does not compare samples within a group. Expected a "
                "group estimator (grpo, dr_grpo, rloo). Fix: algo=grpo, or algo.dynamic_sampling=false.")
        # (a group estimator already needs rollout.n_samples_per_prompt >= 2: _validate_algo)
        # a step short of groups trains on (kept groups x G) rows, which every rank must share
        # equally: otherwise ranks run different numbers of optimizer steps and the collectives hang
        for key in ("learner.world_size", "critic.world_size"):
            ranks = _get(cfg, key)
            if key == "learner.world_size" or uses_critic(cfg):
                if ro.n_samples_per_prompt % ranks:
                    raise ConfigError(
                        f"algo.dynamic_sampling=true with rollout.n_samples_per_prompt={ro.n_samples_per_prompt} "
                        f"and {key}={ranks}: a step that keeps fewer groups than asked trains on (groups x "
                        f"{ro.n_samples_per_prompt}) rows, which must split evenly over the ranks. Expected "
                        f"n_samples_per_prompt to be a multiple of {ranks}. Fix: e.g. "
                        f"rollout.n_samples_per_prompt={ranks * max(1, ro.n_samples_per_prompt // ranks)}.")
    if algo.max_resample_rounds < 0:
        raise ConfigError(f"algo.max_resample_rounds={algo.max_resample_rounds} must be >= 0 (extra "
                          "generation rounds after the first). Fix: algo.max_resample_rounds=3.")
    if not 0 <= algo.overlong_buffer < ro.max_new_tokens:
        raise ConfigError(
            f"algo.overlong_buffer={algo.overlong_buffer} must be in [0, rollout.max_new_tokens="
            f"{ro.max_new_tokens}): the penalty ramps over the last overlong_buffer tokens before "
            f"the budget. Fix: e.g. algo.overlong_buffer={max(1, ro.max_new_tokens // 4)}, or 0 for off.")
    if algo.overlong_penalty < 0 or not math.isfinite(algo.overlong_penalty):
        raise ConfigError(f"algo.overlong_penalty={algo.overlong_penalty} must be a finite number >= 0 "
                          "(the penalty at rollout.max_new_tokens). Fix: algo.overlong_penalty=1.0.")
    if ro.env and (algo.overlong_buffer > 0 or algo.mask_truncated):
        raise ConfigError(
            f"algo.overlong_buffer={algo.overlong_buffer} / algo.mask_truncated={algo.mask_truncated} "
            f"with rollout.env={ro.env!r}: both are defined on one completion's length against "
            "rollout.max_new_tokens, not on multi-turn episodes. Fix: algo.overlong_buffer=0 "
            "algo.mask_truncated=false.")
    if ro.ignore_eos and algo.mask_truncated:
        raise ConfigError("algo.mask_truncated=true with rollout.ignore_eos=true: every response runs to "
                          "max_new_tokens, so every one would be masked. Fix: rollout.ignore_eos=false.")


def _validate_batches(cfg: Any) -> None:
    rollout_seqs = cfg.trainer.prompts_per_step * cfg.rollout.n_samples_per_prompt
    ranks = cfg.learner.world_size
    mini, micro = cfg.learner.mini_batch_size, cfg.learner.micro_batch_size
    if rollout_seqs % mini:
        raise ConfigError(
            f"One rollout batch has trainer.prompts_per_step x rollout.n_samples_per_prompt = "
            f"{cfg.trainer.prompts_per_step} x {cfg.rollout.n_samples_per_prompt} = {rollout_seqs} "
            f"sequences, which is not a multiple of learner.mini_batch_size={mini}. "
            f"Fix: pick a mini_batch_size that divides {rollout_seqs}.")
    groups = [("learner", ranks, micro)]
    if uses_critic(cfg):
        groups.append(("critic", cfg.critic.world_size, critic_micro_batch_size(cfg)))
    for section, ranks, micro in groups:  # the critic trains on the policy's mini-batches
        if mini % ranks:
            raise ConfigError(
                f"learner.mini_batch_size={mini} does not split evenly over {section}.world_size="
                f"{ranks} ranks. Fix: make mini_batch_size a multiple of {ranks}.")
        per_rank = mini // ranks
        if per_rank % micro:
            raise ConfigError(
                f"Each {section} rank gets learner.mini_batch_size / {section}.world_size = "
                f"{mini}/{ranks} = {per_rank} sequences per optimizer step, which is not a "
                f"multiple of {section}.micro_batch_size={micro}. Fix: "
                f"{section}.micro_batch_size={_divisor(per_rank, micro)}.")
    budget = cfg.learner.max_tokens_per_micro_batch
    response = "rollout.max_episode_tokens" if cfg.rollout.env else "rollout.max_new_tokens"
    longest = cfg.task.max_prompt_len + response_budget(cfg)
    if budget and not budget >= longest:
        raise ConfigError(
            f"learner.max_tokens_per_micro_batch={budget} is smaller than one sequence of maximum "
            f"length: task.max_prompt_len + {response} = {cfg.task.max_prompt_len} + "
            f"{response_budget(cfg)} = {longest} tokens. Fix: learner.max_tokens_per_micro_batch"
            f"={longest} or more (a multiple of it fits that many long sequences), or 0 to use "
            "learner.micro_batch_size rows.")
    if cfg.warmup.steps and cfg.warmup.batch_size % cfg.learner.world_size:
        raise ConfigError(
            f"warmup.batch_size={cfg.warmup.batch_size} does not split over learner.world_size="
            f"{cfg.learner.world_size} ranks. Fix: make it a multiple of {cfg.learner.world_size}.")
    if cfg.trainer.prompts_per_step < cfg.rollout.num_engines:
        raise ConfigError(
            f"trainer.prompts_per_step={cfg.trainer.prompts_per_step} is smaller than "
            f"rollout.num_engines={cfg.rollout.num_engines}: some engines would get no prompts.")


def _divisor(total: int, at_most: int) -> int:
    """Largest divisor of `total` not above `at_most` (for suggestions in messages)."""
    return max(d for d in range(1, min(total, at_most) + 1) if total % d == 0)


def _validate_rollout(cfg: Any) -> None:
    ro, device = cfg.rollout, cfg.cluster.device
    tp = ro.tensor_parallel_size
    from rlhf_dist.weights.transports import get_transport

    get_transport(ro.sync_transport).check_config(device, tp, ro.num_engines, cfg.learner.world_size,
                                                  cfg.learner.zero_stage)
    if device == "cpu" and ro.sleep_level:
        raise ConfigError(
            f"rollout.sleep_level={ro.sleep_level}: vLLM's CPU platform has no sleep mode (vLLM "
            "0.32 refuses enable_sleep_mode there: 'Sleep mode is not supported on current "
            "platform'), so an engine on CPU keeps its weights and KV cache between rollouts. "
            "Fix: rollout.sleep_level=0 (on CPU the KV cache is bounded by rollout.kv_cache_gb).")
    if device == "cpu":
        import os

        cores = os.cpu_count() or 1
        if tp > cores:
            raise ConfigError(
                f"rollout.tensor_parallel_size={tp} but this machine has {cores} CPU cores; each "
                f"shard is a process that needs at least one. Fix: rollout.tensor_parallel_size<={cores}.")
    elif tp > 1 and cfg.cluster.gpus_per_engine != tp:
        raise ConfigError(
            f"rollout.tensor_parallel_size={tp} needs {tp} GPUs per engine, but "
            f"cluster.gpus_per_engine={cfg.cluster.gpus_per_engine}. Fix: add cluster.gpus_per_engine={tp}.")


def _validate_off_policy(cfg: Any) -> None:
    """trainer.async_rollout (one batch in flight) and the TIS correction of pi_old."""
    tr, algo = cfg.trainer, cfg.algo
    if tr.async_rollout and cfg.rollout.sleep_level:
        raise ConfigError(
            f"trainer.async_rollout=true with rollout.sleep_level={cfg.rollout.sleep_level}: the "
            "engines generate the next batch while the learner trains, so they cannot free their "
            "memory then. Fix: rollout.sleep_level=0 (and room for both on the GPU), or "
            "trainer.async_rollout=false.")
    if algo.rollout_correction and algo.recompute_old_logprobs:
        raise ConfigError(
            "algo.rollout_correction=true and algo.recompute_old_logprobs=true both choose log pi_old: "
            "the first from the training forward (one optimizer step per batch), the second from an "
            "extra forward pass. Fix: set one of them false.")
    why = "trainer.async_rollout=true" if tr.async_rollout else "algo.rollout_correction=true"
    if (tr.async_rollout or algo.rollout_correction) and algo.tis_cap is None:
        raise ConfigError(
            f"{why} with algo.tis_cap=null: nothing would correct for the engine's weights (one "
            "update behind with async) differing from the policy trained. Fix: algo.tis_cap=2.0.")
    if old_logprobs_source(cfg) == "current":
        seqs = tr.prompts_per_step * cfg.rollout.n_samples_per_prompt
        mini = cfg.learner.mini_batch_size
        if algo.ppo_epochs != 1 or mini != seqs:
            raise ConfigError(
                f"{why} without algo.recompute_old_logprobs takes log pi_old from the training "
                "forward itself, which is exact only with one optimizer step per batch; got "
                f"algo.ppo_epochs={algo.ppo_epochs} x {seqs} // learner.mini_batch_size={mini} = "
                f"{algo.ppo_epochs * (seqs // mini)} steps for the {seqs} sequences of a step. Fix: "
                f"algo.ppo_epochs=1 learner.mini_batch_size={seqs} (and a learner.micro_batch_size "
                "that divides its per-rank share), or algo.recompute_old_logprobs=true (an extra "
                "forward pass per step).")


def check_tensor_parallel(model_config: dict, tp: int, model_path: str) -> None:
    """A tensor-parallel size must divide the attention (and key/value) head counts."""
    heads = model_config.get("num_attention_heads")
    kv_heads = model_config.get("num_key_value_heads") or heads
    if tp > 1 and heads and (heads % tp or kv_heads % tp):
        raise ConfigError(
            f"rollout.tensor_parallel_size={tp} does not divide the model's attention heads "
            f"({heads} query, {kv_heads} key/value heads, {model_path}); vLLM splits heads across "
            f"shards. Fix: use a tensor_parallel_size that divides {kv_heads}, e.g. "
            f"{_divisor(kv_heads, tp)}.")


def _validate_cluster(cfg: Any) -> None:
    if cfg.cluster.device == "cuda":
        if cfg.cluster.gpus_per_learner <= 0 or cfg.cluster.gpus_per_engine <= 0:
            raise ConfigError(
                "cluster.device=cuda but cluster.gpus_per_learner / gpus_per_engine is 0. "
                "Fix: use cluster=gpu8 (or set both to 1).")
        _check_gpu_shares(cfg)
        _check_nccl_devices(cfg)
    if cfg.learner.backend == "nccl" and cfg.cluster.device != "cuda":
        raise ConfigError("learner.backend=nccl needs cluster.device=cuda; on CPU use gloo or auto.")
    for role in ("engine", "learner", "critic", "aux"):
        value = getattr(cfg.cluster, f"{role}_resources")
        if value is not None and not (isinstance(value, dict) and all(
                isinstance(k, str) and k not in ("CPU", "GPU") and isinstance(v, (int, float))
                and not isinstance(v, bool) and v > 0 for k, v in value.items())):
            raise ConfigError(
                f"cluster.{role}_resources={value!r}: expected custom Ray resources per actor, "
                f"{{name: amount > 0}}, e.g. cluster.{role}_resources={{node_b:1}} (CPUs and GPUs "
                "go in cluster.cpus_per_* / gpus_per_*), or null.")
    _check_cores(cfg)


def _check_cores(cfg: Any) -> None:
    from rlhf_dist.runtime.cpu import available_cores, parse_cores

    cl, ro = cfg.cluster, cfg.rollout
    for role in ("engine", "learner"):
        key = f"cluster.{role}_cores"
        cores = parse_cores(getattr(cl, f"{role}_cores"), key)
        if cores is None:
            continue
        if cl.device != "cpu":
            raise ConfigError(f"{key}={getattr(cl, f'{role}_cores')!r} pins CPU cores, which only CPU "
                              f"nodes use (cluster.device={cl.device}). Fix: {key}=null.")
        here = available_cores()
        if cl.address is None and not set(cores) <= set(here):  # local Ray: this machine's cores
            raise ConfigError(f"{key}={getattr(cl, f'{role}_cores')!r} names cores {sorted(set(cores) - set(here))} "
                              f"that this machine does not have (it has {here}). Fix: pick from those.")
        if role == "engine" and len(cores) < ro.num_engines * ro.tensor_parallel_size:
            raise ConfigError(
                f"{key}={cl.engine_cores!r} gives {len(cores)} core(s) to {ro.num_engines} engine(s) x "
                f"{ro.tensor_parallel_size} worker(s); each engine gets an equal share, at least one core "
                f"per worker. Fix: name more cores, or {key}=null.")


def _check_gpu_shares(cfg: Any) -> None:
    """On cuda every model-holding actor needs a GPU share. With 0, Ray reserves none for it: it
    loads onto whichever GPU it sees first, beside an engine that took 85% of it, or finds none."""
    cl = cfg.cluster
    if uses_reference(cfg) and not cl.gpus_per_aux > 0:
        who, fix = "the reference actor (the KL term is on)", "cluster.gpus_per_aux=0.25 (it can " \
            "share a learner's GPU: bf16 weights, no optimizer), or algo.kl_coef=0"
    elif cfg.reward.model.path and not cl.gpus_per_aux > 0:
        who, fix = "the reward actor (reward.model.path is set)", "cluster.gpus_per_aux=0.25"
    elif uses_critic(cfg) and not cl.gpus_per_critic > 0:
        who, fix = f"the critic ranks (algo.advantage={cfg.algo.advantage})", "cluster.gpus_per_critic=0.75"
    else:
        return
    raise ConfigError(f"cluster.device=cuda, but {who} gets no GPU share, so Ray places its model "
                      f"on no GPU of its own. Fix: {fix}.")


def _check_nccl_devices(cfg: Any) -> None:
    """NCCL refuses two members of one group on one GPU ("Duplicate GPU detected"). Ray packs
    fractional GPU shares onto one device, so a group whose members take half a GPU or less may
    land there: the DeepSpeed ranks of the learner or critic, or the learner's rank 0 and an
    engine in the collective weight group."""
    cl = cfg.cluster
    for role, ranks, share, key in (("learner", cfg.learner.world_size, cl.gpus_per_learner, "learner"),
                                    ("critic", cfg.critic.world_size, cl.gpus_per_critic, "critic")):
        if role == "critic" and not uses_critic(cfg):
            continue
        if ranks > 1 and share <= 0.5:
            raise ConfigError(
                f"{role}.world_size={ranks} with cluster.gpus_per_{key}={share}: Ray may put two {role} "
                "ranks on one GPU, and NCCL refuses two ranks of a group on one device. Fix: "
                f"cluster.gpus_per_{key}=1 (a GPU per rank), or {role}.world_size=1.")
    ro = cfg.rollout
    if ro.sync_transport == "collective" and ro.num_engines > 1 and cl.gpus_per_engine <= 0.5:
        raise ConfigError(
            f"rollout.sync_transport=collective (NCCL) with rollout.num_engines={ro.num_engines} and "
            f"cluster.gpus_per_engine={cl.gpus_per_engine}: Ray may put two engines on one GPU, and NCCL "
            "refuses two members of the weight group on one device. Fix: cluster.gpus_per_engine=1.")
    if ro.sync_transport == "collective" and cl.gpus_per_learner + cl.gpus_per_engine <= 1:
        raise ConfigError(
            f"rollout.sync_transport=collective (NCCL) with cluster.gpus_per_learner={cl.gpus_per_learner} and "
            f"cluster.gpus_per_engine={cl.gpus_per_engine}: Ray may put the learner and an engine on one GPU, "
            "and NCCL refuses two members of the weight group on one device. Fix: rollout.sync_transport=ipc "
            "(one engine on the learner's GPU, cluster=gpu1), or whole GPUs for each (cluster=gpu8).")


def check_override_keys(overrides: list[str]) -> None:
    """Reject CLI overrides of keys the schema does not have, suggesting the closest valid key.

    Hydra would also refuse them, but suggests `+key=value`, which a typed schema rejects too.
    Group choices (`algo=grpo`), Hydra's own keys and `+`/`~` overrides are left to Hydra.
    """
    import dataclasses
    import difflib

    for override in overrides:
        if "=" not in override or override[0] in "+~" or override.startswith("hydra"):
            continue
        key = override.split("=", 1)[0].split("@", 1)[0]
        if key in ("experiment",):
            continue
        node: Any = RLConfig
        parts = key.split(".")
        for depth, part in enumerate(parts):
            fields = {f.name: f for f in dataclasses.fields(node)}
            if part not in fields:
                where = ".".join(parts[:depth]) or "the top level"
                close = difflib.get_close_matches(part, fields, n=1)
                hint = f" Did you mean '{'.'.join(parts[:depth] + close)}'?" if close else ""
                raise ConfigError(
                    f"unknown config key '{key}'.{hint} Valid keys under {where}: "
                    f"{', '.join(sorted(fields))}.")
            factory = fields[part].default_factory  # sections are field(default_factory=Section)
            if factory is dict or fields[part].type in ("Any", Any):  # free-form mapping (task.options,
                break  # eval.sets): any sub-key is allowed
            if depth < len(parts) - 1:
                if not dataclasses.is_dataclass(factory):
                    raise ConfigError(f"config key '{key}': '{part}' is a value, not a section.")
                node = factory


def check_run_dir(run_dir: str, resume: str | None, checkpoint_dir: str | None = None) -> None:
    """A run directory that already holds a run is continued (trainer.resume) or refused, never
    written over: its metrics.jsonl would interleave two runs and its checkpoints mix with new
    ones. Hydra gives every run a fresh timestamped directory, so only an explicit
    trainer.run_dir (or hydra.run.dir) that was used before can hit this."""
    from pathlib import Path

    if resume is not None:
        return
    root = Path(run_dir).expanduser()
    found = [name for name in ("metrics.jsonl", "checkpoints") if (root / name).exists()]
    checkpoints = Path(checkpoint_dir).expanduser() if checkpoint_dir else None
    if checkpoints is not None and checkpoints.is_dir() and any(checkpoints.iterdir()):
        found.append(f"trainer.checkpoint_dir={checkpoints} is not empty")
    if found:
        raise ConfigError(
            f"the run directory {root.absolute()} (trainer.run_dir) already holds a run "
            f"({', '.join(found)}), and a new run would write over it. Fix: trainer.resume=auto to "
            "continue that run from its newest checkpoint, or a new trainer.run_dir (leave it unset "
            "and every run gets a fresh runs/<date>/<time>/).")
