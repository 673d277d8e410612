"""The controller: starts the actors and runs RL steps, one numbered phase at a time.

One step:
  1. generate    rollout engines sample G responses per prompt (vLLM)
  2. score       reward actor scores them; in flight at the same time: reference logprobs, critic
                 values (PPO) and the learner's own old logprobs (algo.recompute_old_logprobs)
  3. advantages  KL penalty in the reward (optional), the configured estimator, whitening: pure
                 torch on the driver (rlhf_dist.algo)
  4. train       policy ranks and critic ranks update concurrently, ppo_epochs x mini-batches
  5. sync        new policy weights are broadcast to every engine, verified, under a deadline

With trainer.async_rollout the engines generate the next batch while phases 2-4 run (launched
before 2, waited for before 5), so from step 2 on each batch comes from weights one update old;
the loss's truncated importance weights (algo.tis_cap) correct for that.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
import zlib
from typing import Any

import torch

from rlhf_dist import checkpoint
from rlhf_dist.rl import launcher
from rlhf_dist.runtime.ds_group import merge_rank_metrics
from rlhf_dist.runtime.group import ActorGroup, actors_rss_mb, wait_all
from rlhf_dist.algo import (
    compute_advantages,
    explained_variance,
    kl_penalty,
    make_kl_controller,
    masked_mean,
    masked_var,
    masked_whiten,
    overlong_penalty,
)
from rlhf_dist.algo.objective import PolicyLossConfig, ValueLossConfig
from rlhf_dist.models.lora import lora_signature
from rlhf_dist.config import (critic_micro_batch_size, old_logprobs_source, response_budget, uses_critic,
                              uses_reference, uses_reference_actor)
from rlhf_dist.data.messages import Sample, Scores
from rlhf_dist.data.batch import Batch, demonstration_batch, samples_batch, shard_minibatches
from rlhf_dist.data.prompts import PromptSampler
from rlhf_dist.validation import validate
from rlhf_dist.errors import ActorDiedError, ConfigError, NonFiniteLossError, RewardSamplesFailedError, RlhfDistError
from rlhf_dist.monitor import RunMonitor
from rlhf_dist.envs.base import load_env
from rlhf_dist.rl.episodes import EpisodeLimits, EpisodeRunner
from rlhf_dist.rl.dynamic_sampling import FillCounts, FillResult, fill_groups
from rlhf_dist.rl.generation import Generation, GenerationBatch
from rlhf_dist.evaluation import EvalSet, eval_set_specs
from rlhf_dist.rl.evaluation import EvalHarness, format_sets
from rlhf_dist.rl.metrics import episode_metrics, rollout_metrics, sample_rows, timed

def prompt_crc(records: list[dict]) -> float:
    """A checksum of the records a step drew, every field (data/prompt_crc: a resumed run must draw
    the same; records with one prompt text, e.g. the guessing game's, differ in their other fields)."""
    return float(zlib.crc32("\n".join(json.dumps(r, sort_keys=True, default=str) for r in records).encode()))


# metrics that each rank computes as its share of a global-normalised sum: summed over ranks
_ADDITIVE = ("loss/", "kl/loss_term", "entropy/", "critic/value_loss")


class RLTrainer:
    def __init__(self, cfg, model_path: str, tokenizer, train_records: list[dict],
                 eval_records: list[dict], reward_spec: str, monitor: RunMonitor,
                 sft_pairs: list[tuple[str, str]] | None = None, select_records: list[dict] | None = None,
                 eval_sets: list[EvalSet] | None = None) -> None:
        self.cfg, self.model_path, self.tokenizer = cfg, model_path, tokenizer
        # what evaluate() scores: eval.sets, held_out (the eval_records) first (session.prepare)
        self.eval_sets = eval_sets or [EvalSet(eval_set_specs(cfg.eval, cfg.rollout.temperature)[0], eval_records)]
        self.harness: EvalHarness | None = None  # start()
        self.select_records = select_records  # trainer.keep_best's own held-out prompts
        self.sft_pairs = sft_pairs or []  # (rendered prompt, completion): the SFT mix's demonstrations
        self._check_sft_mix(cfg.algo)
        self.eval_records, self.reward_spec, self.monitor = eval_records, reward_spec, monitor
        self.sampler = PromptSampler(train_records, cfg.trainer.prompts_per_step, cfg.trainer.seed)
        self.generator = torch.Generator().manual_seed(cfg.trainer.seed)
        self.use_reference, self.use_critic = uses_reference(cfg), uses_critic(cfg)
        self.kl_ctl = make_kl_controller(cfg.algo.kl_coef, cfg.algo.kl_target, cfg.algo.kl_horizon)
        self.history: list[dict[str, float]] = []
        self.bad_steps = self.bad_in_a_row = 0  # updates skipped for a non-finite loss/gradient
        self.skipped_steps = 0  # steps skipped because reward.fn raised (reward.fallback_score=null)
        self.fill_counts = FillCounts()  # dynamic sampling: steps short of groups with signal, steps with none
        self.aux_restarts = 0  # reward/reference actors replaced (with_aux_recovery)
        self.reward_state: dict | None = None  # the reward normaliser's statistics after the last scoring
        self.engines = self.learners = self.reward = self.reference = self.critics = None  # start()
        # weight versions (updates applied since start-up) of the learner and of the engines; a
        # rollout records the engines' at launch, so staleness = policy_version - rollout.version
        self.policy_version = self.engine_version = 0
        self.generation: Generation | None = None  # phase 1 (rlhf_dist.rl.generation), from start()
        # fixed lengths (rollout.ignore_eos): the engine masks EOS until max_new_tokens, so every
        # logprob of the policy (learner, old, reference) is taken without it
        self.banned_token_id = tokenizer.eos_token_id if cfg.rollout.ignore_eos else None

    @property
    def prefetched(self) -> GenerationBatch | None:
        """async_rollout: the next step's batch, already generated (None when there is none)."""
        return self.generation.prefetched if self.generation is not None else None

    @prefetched.setter
    def prefetched(self, rollout: GenerationBatch | None) -> None:
        self.generation.prefetched = rollout

    # ------------------------------------------------------------------ start-up
    def start(self) -> dict[str, float]:
        """Create every actor group and wait until all are ready (rlhf_dist.rl.launcher);
        returns the start-up timings."""
        actors = launcher.start_rl_actors(self.cfg, self.model_path, self.reward_spec,
                                          uses_reference_actor(self.cfg), self.use_critic)
        self.model, self.weights, self.num_params = actors.model, actors.weights, actors.num_params
        self.engines, self.learners, self.reward = actors.engines, actors.learners, actors.reward
        self.reference, self.critics = actors.reference, actors.critics
        self.lora_sync = actors.lora_sync
        ro = self.cfg.rollout
        episodes = None
        if ro.env:  # multi-turn episodes (rlhf_dist.rl.episodes)
            episodes = EpisodeRunner(load_env(ro.env), self.tokenizer, EpisodeLimits(
                ro.max_turns, ro.max_new_tokens, ro.max_episode_tokens, ro.tool_timeout_s))
        self.generation = Generation(
            self.engines, self.tokenizer, self.sampler, ro.n_samples_per_prompt, ro.temperature, ro.top_p,
            ro.max_new_tokens, ro.seed, ro.init_timeout_s, recover=self.with_engine_recovery,
            engine_version=lambda: self.engine_version, episodes=episodes, wake=self.weights.wake_engines)
        self.harness = EvalHarness(self.generation, self.reward, self.cfg.eval.k, self.cfg.reward.timeout_s,
                                   recover=self.with_aux_recovery, log=self.monitor.print)
        return actors.timings

    def use_algo(self, algo) -> None:
        """Switch to another `algo` section between steps, on the actors already started (a sweep
        over estimators, a curriculum). Its needs must be among what start() created: a critic
        only if the run began with one, a reference only if it began with one."""
        cfg = dataclasses.replace(self.cfg, algo=algo)
        validate(cfg)
        self._check_sft_mix(algo)
        for need, missing in (("a critic", uses_critic(cfg) and self.critics is None),
                              ("a reference model", uses_reference_actor(cfg) and self.reference is None)):
            if missing:
                raise ConfigError(f"use_algo: algo (advantage={algo.advantage!r}) needs {need}, and this "
                                  "run started without one; start the trainer with an algo that needs it")
        self.cfg, self.use_critic, self.use_reference = cfg, uses_critic(cfg), uses_reference(cfg)
        self.kl_ctl = make_kl_controller(algo.kl_coef, algo.kl_target, algo.kl_horizon)  # starts afresh

    def _check_sft_mix(self, algo) -> None:
        if algo.sft_coef > 0 and not self.sft_pairs:
            raise ConfigError(f"algo.sft_coef={algo.sft_coef} needs demonstrations and this run has none. "
                              "Fix: sft.train_file=<records>, a built-in task, or algo.sft_coef=0.")

    def _groups(self) -> list[ActorGroup | None]:
        return [self.engines, self.learners, self.reward, self.reference, self.critics]

    # ------------------------------------------------------------------ phases
    def generate(self, records: list[dict], n: int, temperature: float, step: int | None = None,
                 stream: str = "train") -> tuple[list[Sample], list[dict]]:
        """Split prompts across engines; returns (samples, the record each sample answers)."""
        return self.generation.generate(records, n, temperature, step, stream)

    def score_rewards(self, rollout: GenerationBatch) -> Scores:
        """The reward actor's scores of `rollout`'s samples (a dynamic-sampling round's)."""
        texts = [s.text for s in rollout.samples]
        scores = self.with_aux_recovery("scoring", lambda: self.reward.run(
            "score", rollout.sample_records, texts, timeout_s=self.cfg.reward.timeout_s)[0])
        self.reward_state = scores.state or self.reward_state  # what a replaced reward actor restarts from
        return scores

    def score(self, batch: Batch, records: list[dict], texts: list[str], scores: Scores | None = None) -> None:
        """Phase 2: rewards, reference logprobs, critic values and old logprobs, all in flight.
        `scores`: the rewards, when already known (dynamic sampling scored them per round)."""
        cfg = self.cfg
        temperature, micro = cfg.rollout.temperature, cfg.learner.micro_batch_size
        jobs = [] if scores else [("rewards", [self.reward.call("score", records, texts)[0]], self.reward.names)]
        if self.reference is not None:
            jobs.append(("ref_logprobs", self.reference.call("compute_logprobs", batch, temperature, micro,
                                                             cfg.learner.max_tokens_per_micro_batch,
                                                             self.banned_token_id),
                         self.reference.names))
        elif self.use_reference:  # LoRA: the base model, adapters off, on the learner ranks (no actor)
            jobs.append(("ref_logprobs", self.learners.call_on_shards("compute_ref_logprobs", batch, temperature,
                                                                      micro, self.banned_token_id),
                         self.learners.names))
        if self.use_critic:
            jobs.append(("values", self.critics.call_on_shards("compute_values", batch,
                                                   critic_micro_batch_size(cfg)), self.critics.names))
        if cfg.algo.recompute_old_logprobs:
            jobs.append(("old_logprobs", self.learners.call_on_shards("compute_logprobs", batch, temperature,
                                                         micro, self.banned_token_id), self.learners.names))
        refs = [ref for _, job_refs, _ in jobs for ref in job_refs]
        names = [name for _, job_refs, job_names in jobs for name in job_names[: len(job_refs)]]
        timeout = max(cfg.reward.timeout_s, cfg.learner.step_timeout_s)
        results = iter(wait_all(refs, names, "score/reference/values", timeout))
        if scores:
            self._take_rewards(batch, scores)
        for key, job_refs, _ in jobs:
            parts = [next(results) for _ in job_refs]
            if key == "rewards":
                self._take_rewards(batch, parts[0])
            else:  # (B_i, T_i) shards trimmed to their own width: pad back to the batch's T
                width = batch["response_mask"].shape[1]
                batch[key] = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])

    def _take_rewards(self, batch: Batch, scores: Scores) -> None:
        batch["rewards"] = torch.tensor(scores.reward, dtype=torch.float32)
        batch.meta.update(scores.metrics)
        self.reward_state = scores.state or self.reward_state
        if scores.report:
            self.monitor.print(scores.report)
        for part, values in (("rule", scores.rule), ("model", scores.model)):
            if values is not None:
                batch.meta[f"reward/{part}_mean"] = sum(values) / len(values)

    def advantages(self, batch: Batch) -> dict[str, float]:
        """Phase 3: overlong penalty (DAPO, algo.overlong_buffer), per-token KL penalty (if in the
        reward), the estimator, optional whitening."""
        algo, mask = self.cfg.algo, batch["response_mask"]
        old_logprobs = batch.tensors.get("old_logprobs", batch["rollout_logprobs"])
        metrics = {"kl/coef": self.kl_ctl.value}
        if algo.overlong_buffer > 0:  # single-turn: every response token is the policy's
            length_penalty = overlong_penalty(mask.sum(-1), self.cfg.rollout.max_new_tokens,
                                              algo.overlong_buffer, algo.overlong_penalty)  # (B,)
            batch["rewards"] = batch["rewards"] + length_penalty
            metrics["shaping/overlong_penalty_mean"] = length_penalty.mean().item()
            metrics["shaping/overlong_frac"] = (length_penalty < 0).float().mean().item()
        penalty = torch.zeros_like(mask)  # (B, T) beta * KL_t, zero unless the KL is in the reward
        if "ref_logprobs" in batch.tensors:
            token_kl = kl_penalty(old_logprobs, batch["ref_logprobs"], algo.kl_reward_estimator) * mask
            seq_kl = token_kl.sum(-1)  # (B,)
            metrics["kl/mean"] = masked_mean(kl_penalty(old_logprobs, batch["ref_logprobs"], "k3"), mask).item()
            metrics["kl/seq_mean"] = seq_kl.mean().item()
            if algo.kl_in_reward:
                penalty = self.kl_ctl.value * token_kl
                metrics["kl/reward_penalty"] = penalty.sum(-1).mean().item()
            self.kl_ctl.update(seq_kl.mean().item(), len(batch))  # takes effect next step
        advantages, returns = compute_advantages(
            algo.advantage, scores=batch["rewards"], kl_penalty=penalty, response_mask=mask,
            values=batch.tensors.get("values"), group_size=self.cfg.rollout.n_samples_per_prompt,
            gamma=algo.gamma, lam=algo.lam, turn_rewards=batch.tensors.get("turn_rewards"))
        if algo.whiten_advantages:
            advantages = masked_whiten(advantages, mask) * mask
        batch["advantages"], batch["returns"] = advantages, returns
        metrics["advantages/mean"] = masked_mean(advantages, mask).item()
        metrics["advantages/std"] = masked_var(advantages, mask).sqrt().item()
        metrics["returns/mean"] = masked_mean(returns, mask).item()
        if "values" in batch.tensors:
            metrics["critic/explained_variance"] = explained_variance(batch["values"], returns, mask).item()
            metrics["critic/values_mean"] = masked_mean(batch["values"], mask).item()
        return metrics

    def train(self, batch: Batch, step: int, staleness: int = 0) -> dict[str, float]:
        """Phase 4: policy and critic ranks update concurrently on the same mini-batches.
        `staleness`: policy updates the engine that sampled the batch had not seen (async rollout)."""
        cfg, algo = self.cfg, self.cfg.algo
        source = old_logprobs_source(cfg)
        loss = PolicyLossConfig(
            temperature=cfg.rollout.temperature, policy_loss=algo.policy_loss,
            clip_low=algo.clip_low, clip_high=algo.clip_high, clip_ratio_c=algo.clip_ratio_c,
            kl_loss_coef=self.kl_ctl.value if algo.kl_in_loss else 0.0,
            kl_loss_estimator=algo.kl_loss_estimator, entropy_coef=algo.entropy_coef,
            loss_agg=algo.loss_agg, horizon=response_budget(cfg),
            old_logprobs_source=source, tis_cap=algo.tis_cap if source != "rollout" else None,
            same_weights_as_engine=staleness == 0, banned_token_id=self.banned_token_id,
            sft_coef=algo.sft_coef)
        keys = ["input_ids", "attention_mask", "response_mask", "rollout_logprobs", "advantages"]
        keys += [k for k in ("ref_logprobs", "old_logprobs") if k in batch.tensors]
        if algo.mask_truncated:  # DAPO's overlong filtering: cut-off responses out of the loss
            batch = Batch({**batch.tensors, "response_mask": batch["response_mask"] * ~batch["truncated"][:, None]},
                          batch.prompt_width)
        orders = [torch.randperm(len(batch), generator=self.generator) for _ in range(algo.ppo_epochs)]
        budget = cfg.learner.max_tokens_per_micro_batch
        parts = shard_minibatches(batch, keys, orders, cfg.learner.mini_batch_size, len(self.learners))
        sft = self.sft_rows(step, len(parts[0])) if algo.sft_coef > 0 else [None] * len(parts)
        refs = self.learners.call_each("train_step", [
            (part, loss, step, budget, rows) for part, rows in zip(parts, sft)])
        groups = [self.learners]
        if self.use_critic:
            value_loss = ValueLossConfig(clip_range=cfg.critic.value_clip, loss_agg=algo.loss_agg,
                                         horizon=response_budget(cfg),
                                         value_loss_coef=cfg.critic.value_loss_coef)
            critic_keys = ["input_ids", "attention_mask", "response_mask", "values", "returns"]
            refs += self.critics.call_each("train_step", [
                (part, value_loss, step, budget) for part in shard_minibatches(
                    batch, critic_keys, orders, cfg.learner.mini_batch_size, len(self.critics))])
            groups.append(self.critics)
        names = [name for group in groups for name in group.names]
        results = wait_all(refs, names, "train_step", cfg.learner.step_timeout_s)
        merged = merge_rank_metrics(results[: len(self.learners)], _ADDITIVE)
        if self.use_critic:
            merged.update(merge_rank_metrics(results[len(self.learners):], _ADDITIVE))
        return merged

    def sft_rows(self, step: int, num_minibatches: int) -> list[list[tuple[Batch, float]]]:
        """algo.sft_coef: per learner rank, its shard of each mini-batch's algo.sft_batch_size
        demonstrations (drawn with replacement, fixed by seed, step and mini-batch: a resumed run
        draws the same) and their global token count."""
        size, ranks = self.cfg.algo.sft_batch_size, len(self.learners)
        per_rank: list[list[tuple[Batch, float]]] = [[] for _ in range(ranks)]
        for index in range(num_minibatches):
            rng = random.Random(f"sft-mix|{self.cfg.trainer.seed}|{step}|{index}")
            rows = [self.sft_pairs[rng.randrange(len(self.sft_pairs))] for _ in range(size)]
            # fixed lengths (rollout.ignore_eos): the policy never ends a response, so neither do these
            batch = demonstration_batch(self.tokenizer, [p for p, _ in rows], [c for _, c in rows],
                                        with_eos=self.banned_token_id is None)
            tokens = float(batch["response_mask"].sum())
            for rank, shard in enumerate(torch.arange(size).tensor_split(ranks)):
                per_rank[rank].append((batch.select(shard, ["input_ids", "attention_mask", "response_mask"]),
                                       tokens))
        return per_rank

    def with_engine_recovery(self, phase: str, call):
        """Run a phase that needs every engine; if one has died, replace it (same placement
        bundle), give it the current weights by a verified sync, and run the phase again.
        At most trainer.max_engine_restarts replacements over the run (faults/engine_restarts)."""
        def resync(_: int) -> None:
            self.weights.prepare()  # a new member: the collective group is rebuilt
            self.weights.sync()
            self.engine_version = self.policy_version

        return self._with_restarts(phase, call, [self.engines], "max_engine_restarts", lambda: self.engines.restarts,
                                   self.cfg.rollout.init_timeout_s, " and re-sending the weights", resync)

    def with_aux_recovery(self, phase: str, call):
        """Run a phase that needs the reward and reference actors; if one has died, replace it
        (same placement bundle) and run the phase again. They hold nothing the run cannot give
        back: the frozen initial policy, the reward function and model, and the reward
        normaliser's statistics (restored from the copy taken after the last scoring). At most
        trainer.max_aux_restarts replacements over the run (faults/aux_restarts)."""
        def restore(restarted: int) -> None:
            if self.reward_state is not None:  # also the survivors: the retry scores this batch again
                self.reward.wait(self.reward.call("load_state_dict", self.reward_state), "reward state restore", 60)
            self.aux_restarts += restarted

        groups = [g for g in (self.reward, self.reference) if g is not None]
        return self._with_restarts(phase, call, groups, "max_aux_restarts", lambda: self.aux_restarts,
                                   self.cfg.learner.init_timeout_s, "", restore)

    def _with_restarts(self, phase: str, call, groups: list[ActorGroup], limit_key: str, used,
                       ready_timeout_s: float, also: str, after_restart):
        """Run `call`; when it fails (a dead actor shows as ActorDiedError, WeightSyncError or a
        timeout) and actors of `groups` have died, replace each in its placement bundle, wait until
        they are ready, run `after_restart(how many)` and `call` again. Past trainer.<limit_key>
        replacements over the run (`used()` so far), ActorDiedError."""
        while True:
            try:
                return call()
            except RlhfDistError as err:
                dead = [(group, i) for group in groups for i in group.dead()]
                limit = getattr(self.cfg.trainer, limit_key)
                if not dead:
                    raise
                if used() + len(dead) > limit:
                    raise ActorDiedError(f"{err}\n{len(dead)} actor(s) ({', '.join(g.names[i] for g, i in dead)}) "
                                         f"dead after {used()} restart(s) (trainer.{limit_key}={limit}).") from None
                names = ", ".join(group.names[i] for group, i in dead)
                self.monitor.print(f"[fault] {names} died during {phase}; restarting it{also} "
                                   f"({used() + len(dead)}/{limit} restarts)")
                for group, i in dead:
                    group.restart(i)
                for group, i in dead:
                    group.wait([group.actors[i].ready.remote()], f"{group.names[i]} restart", ready_timeout_s)
                after_restart(len(dead))

    def train_or_skip(self, batch: Batch, step: int, staleness: int = 0) -> dict[str, float]:
        """Phase 4, where a non-finite loss or gradient skips the update on every rank (the ranks
        agree and discard the mini-batch's gradients) instead of ending the run, until
        trainer.max_bad_steps come in a row; each offending batch is saved for inspection."""
        try:
            metrics = self.train(batch, step, staleness)
            self.bad_in_a_row = 0
            self.policy_version += 1
        except NonFiniteLossError as err:
            self.bad_steps, self.bad_in_a_row = self.bad_steps + 1, self.bad_in_a_row + 1
            saved = os.path.join(self.cfg.trainer.run_dir, "bad_batches", f"step_{step:08d}.pt")
            os.makedirs(os.path.dirname(saved), exist_ok=True)
            torch.save({"tensors": batch.tensors, "prompt_width": batch.prompt_width}, saved)
            limit = self.cfg.trainer.max_bad_steps
            if self.bad_in_a_row >= limit:
                raise NonFiniteLossError(
                    f"{err}\n{self.bad_in_a_row} steps in a row had to be skipped "
                    f"(trainer.max_bad_steps={limit}), so the run stops. The last batch is saved "
                    f"at {saved} (torch.load(path, weights_only=True)).") from None
            self.monitor.print(f"[skip] step {step}: update skipped ({self.bad_in_a_row}/{limit} in a "
                               f"row), batch saved to {saved}: {str(err).splitlines()[0][:200]}")
            metrics = {}
        return {**metrics, "faults/bad_steps": float(self.bad_steps), "faults/skipped_update": float(not metrics)}

    def sync_weights(self) -> dict[str, float]:
        """Phase 5: new policy weights into every engine, verified (rlhf_dist.weights.sync)."""
        metrics = self.weights.sync()
        self.engine_version = self.policy_version
        return metrics

    # ------------------------------------------------------------------ one step
    def step(self, step: int) -> dict[str, float]:
        """The five phases on one batch. With trainer.async_rollout the batch was generated while
        the previous step trained, and the next one is generated while this step scores and trains
        (rlhf_dist.rl.generation: launched once this step's generation is done, collected in
        end_step, before the sync). With algo.dynamic_sampling, phase 1 scores the rewards of each
        round and generates more until the step has enough groups with signal."""
        cfg, timing = self.cfg, {}
        with timed(timing, "step"):
            with timed(timing, "generate"):  # 1. generate (async: done during the last step)
                pending = self.generation.for_step(step)  # wakes sleeping engines first
            filled = None
            if cfg.algo.dynamic_sampling:  # 1b. rewards per round: keep groups with signal, refill
                try:
                    filled = self.fill_groups(pending, timing)
                except RewardSamplesFailedError as err:  # reward.fallback_score=null: skip this step
                    return self._skip_step(step, err)
                pending = filled.rollout
            self.generation.launch_ahead(step, cfg.trainer.async_rollout and step < cfg.trainer.total_steps)
            self.weights.sleep_engines()  # rollout.sleep_level > 0 (GPU): memory to the learner
            if not pending.samples:  # dynamic sampling: not one group with signal
                return self._empty_step(step, filled)
            batch = samples_batch(pending.samples, self.tokenizer.pad_token_id)
            batch["truncated"] = torch.tensor([s.finish_reason == "length" for s in pending.samples])
            staleness = self._staleness(step, pending)
            with timed(timing, "score"):  # 2. score (+ reference logprobs, critic values, old logprobs)
                try:
                    self.with_aux_recovery("scoring", lambda: self.score(
                        batch, pending.sample_records, [s.text for s in pending.samples],
                        filled.scores if filled else None))
                except RewardSamplesFailedError as err:  # reward.fallback_score=null: skip this step
                    return self._skip_step(step, err)
            with timed(timing, "train"):
                advantage_metrics = self.advantages(batch)  # 3. advantages
                train_metrics = self.train_or_skip(batch, step, staleness)  # 4. train (policy, critic)
            with timed(timing, "generate"):  # async: the next batch done before the engines take weights
                hidden_s = self.generation.end_step()
            with timed(timing, "sync"):  # 5. sync
                sync_metrics = self.with_engine_recovery("weight sync", self.sync_weights)
        if cfg.trainer.async_rollout:
            timing["timing/generate_hidden_s"] = hidden_s  # the next batch's generation the step hid
            timing["async/staleness"] = float(staleness)
        parts = [batch.meta, advantage_metrics, train_metrics, sync_metrics]
        if filled:
            parts.append(self._fill_metrics(step, filled))
        return self._step_metrics(step, pending, batch, timing, parts)

    def fill_groups(self, first: GenerationBatch, timing: dict[str, float]) -> FillResult:
        """algo.dynamic_sampling (rlhf_dist.rl.dynamic_sampling): score each round's rewards, keep
        the groups with signal, generate rounds of new prompts until prompts_per_step are kept."""
        cfg = self.cfg

        def score(rollout: GenerationBatch) -> Scores:
            with timed(timing, "score"):
                return self.score_rewards(rollout)

        def next_round(first_prompt: int) -> GenerationBatch:
            with timed(timing, "generate"):
                return self.generation.another_round(first.step, first_prompt)

        return fill_groups(first, score, next_round, cfg.rollout.n_samples_per_prompt,
                           cfg.trainer.prompts_per_step, cfg.algo.max_resample_rounds)

    def _fill_metrics(self, step: int, filled: FillResult) -> dict[str, float]:
        return self.fill_counts.count(step, filled, self.cfg.rollout.n_samples_per_prompt,
                                      self.cfg.trainer.prompts_per_step, self.monitor.print)

    def _empty_step(self, step: int, filled: FillResult) -> dict[str, float]:
        """Dynamic sampling found no group with signal in any round: nothing to train, so no
        update and nothing to sync (the engines already hold the policy)."""
        metrics = self._fill_metrics(step, filled)
        self.generation.end_step()
        metrics["data/prompt_crc"] = prompt_crc(filled.rollout.records)
        return metrics

    def _staleness(self, step: int, pending: GenerationBatch) -> int:
        """Policy updates the engines that generated `pending` had not seen (0, or 1 with async)."""
        staleness = self.policy_version - pending.version
        if staleness > 1:  # one batch in flight keeps it <= 1
            raise RlhfDistError(f"step {step}: batch {staleness} updates stale, above the 1 of one "
                                "batch in flight; the prefetch logic has a bug.")
        return staleness

    def _skip_step(self, step: int, err: Exception) -> dict[str, float]:
        """A step whose rewards failed (reward.fallback_score=null): no update, so nothing to sync."""
        self.skipped_steps += 1
        self.monitor.print(f"[skip] step {step}: {err}")
        self.generation.end_step()
        return {"faults/skipped_steps": float(self.skipped_steps)}

    def _step_metrics(self, step: int, rollout: GenerationBatch, batch: Batch, timing: dict[str, float],
                      parts: list[dict[str, float]]) -> dict[str, float]:
        """Rewards, lengths, timing, faults, then each phase's own metrics (`parts`; batch.meta: the
        reward's parts); every logger.memory_every steps each process's memory. Every
        logger.sample_every steps a few samples go to the monitor."""
        cfg, samples = self.cfg, rollout.samples
        metrics = rollout_metrics(batch["rewards"], batch["response_mask"], samples,
                                  cfg.rollout.n_samples_per_prompt, timing)
        metrics.update(episode_metrics(samples))
        metrics["faults/engine_restarts"] = float(self.engines.restarts)
        metrics["faults/aux_restarts"] = float(self.aux_restarts)
        # which prompts this step drew (a resumed run must draw the same ones)
        metrics["data/prompt_crc"] = prompt_crc(rollout.records)
        for part in parts:
            metrics.update(part)
        if cfg.logger.memory_every and (step == 1 or step % cfg.logger.memory_every == 0):
            metrics.update(self.memory())
        if step == 1 or step % cfg.logger.sample_every == 0:
            texts = [s.text for s in samples]
            self.monitor.log_samples(step, sample_rows(rollout.sample_records, texts, batch["rewards"],
                                                       cfg.logger.num_samples))
        return metrics

    # ------------------------------------------------------------------ eval
    def evaluate(self, step: int, records: list[dict] | None = None, prefix: str = "eval") -> dict[str, float]:
        """Every eval set (rlhf_dist.rl.evaluation): greedy and sampled passes, scored by each set's
        reward (the run's: its rule and the reward model's raw score, no running normalisation, so
        one scale over the run). With `records`, only a greedy pass over them, named <prefix>/...:
        trainer.keep_best selects on its own prompts ("select/..."), so the eval/ figures of the
        policy it keeps are not flattered by the choice."""
        if records is None:
            sets, per_set = self.eval_sets, True
        else:
            spec = dataclasses.replace(self.eval_sets[0].spec, name=prefix, n=0)
            sets, per_set = [EvalSet(spec, records)], False
        metrics = self.harness.evaluate(sets, prefix, per_set)
        shown = [k for k in metrics if k.count("/") == 1 or k.startswith(f"{prefix}/episode/")]
        self.monitor.log_eval(step, metrics, shown)
        for line in format_sets(step, metrics) if self.monitor.console else []:
            self.monitor.print(line)
        return metrics

    def memory(self) -> dict[str, float]:
        """Resident memory of the driver and every actor process, in MB (memory/<actor>_rss_mb)."""
        import psutil

        rss = actors_rss_mb([g for g in self._groups() if g])
        metrics = {f"memory/{n.replace('[', '').replace(']', '')}_rss_mb": v for n, v in rss.items()}
        metrics["memory/driver_rss_mb"] = psutil.Process().memory_info().rss / 2**20
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int, root: str) -> str:
        """Everything a resumed run needs, written so the directory is complete or absent: every
        learner (and critic) rank's DeepSpeed state, rank 0's HF weights, the driver's state_dict.
        See rlhf_dist/checkpoint.py."""
        start = time.perf_counter()
        final = checkpoint.save(root, step, self._ds_groups(), lambda: self.state_dict(step),
                                {"algo": self.cfg.algo.name, "lora_rank": self.cfg.model.lora.rank,
                                 "lora": lora_signature(self.cfg.model.lora),
                                 "critic_lora": lora_signature(self.cfg.critic.lora)},
                                self.cfg.trainer.keep_last,
                                self.cfg.learner.step_timeout_s)
        self.monitor.print(f"[checkpoint] step {step} -> {final} ({time.perf_counter() - start:.1f}s)")
        return str(final)

    def load_checkpoint(self, path: str) -> int:
        """Restore a checkpoint into the started actors and the driver; returns its step.

        The engines then get the restored weights by a normal (verified) sync.
        """
        state = checkpoint.load(path, self._ds_groups(), self.cfg.learner.step_timeout_s)
        self.load_state_dict(state)
        self.prefetched = None
        self.weights.sync()
        self.engine_version = self.policy_version
        return int(state["step"])

    def _ds_groups(self) -> list[tuple[str, ActorGroup]]:
        """The DeepSpeed groups a checkpoint holds, by directory name."""
        return [("policy", self.learners)] + ([("critic", self.critics)] if self.critics else [])

    def state_dict(self, step: int) -> dict[str, Any]:
        return {"step": step, "sampler": self.generation.sampler_state(), "generator": self.generator.get_state(),
                "kl_ctl": self.kl_ctl.state_dict(), "reward": self.reward.run("state_dict", timeout_s=60)[0],
                "wandb_id": self.monitor.wandb_id or "", "bad_steps": self.bad_steps,
                "dynamic": self.fill_counts.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.generator.set_state(state["generator"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.bad_steps = int(state.get("bad_steps", 0))
        self.fill_counts.load_state_dict(state.get("dynamic", {}))
        self.reward.run("load_state_dict", state["reward"], timeout_s=60)
        self.reward_state = state["reward"]  # what a replaced reward actor starts from

    def shutdown(self) -> None:
        """Kill every actor group started (best effort, also after a failure)."""
        if self.generation is not None and self.generation.episodes is not None:
            self.generation.episodes.close()
        launcher.kill_all(self._groups())

