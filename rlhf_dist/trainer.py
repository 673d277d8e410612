"""The controller: starts the actors and runs RL steps, one numbered phase at a time.

One step:
  1. generate   rollout engines sample G responses per prompt (vLLM)
  2. score      reward actor scores them; reference actor computes log pi_ref (concurrently)
  3. advantages group baselines (or other estimator), computed here: cheap, pure torch
  4. train      learner ranks run ppo_epochs x mini-batches of clipped-ratio + KL updates
  5. sync       new weights are broadcast to every engine, verified, under a deadline
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import Any

import torch

from rlhf_dist.actors.group import ActorGroup, wait_all
from rlhf_dist.actors.learner import LearnerActor
from rlhf_dist.actors.reference import ReferenceActor
from rlhf_dist.actors.reward import RewardActor
from rlhf_dist.actors.rollout import RolloutActor
from rlhf_dist.algo import compute_advantages, count_normalizers
from rlhf_dist.data.batch import Batch, collate_rollouts
from rlhf_dist.data.prompts import PromptSampler
from rlhf_dist.distributed.checksum import diff_checksums
from rlhf_dist.errors import WeightSyncError
from rlhf_dist.monitor import RunMonitor


class RLTrainer:
    def __init__(self, cfg, model_path: str, tokenizer, train_records: list[dict],
                 eval_records: list[dict], reward_spec: str, monitor: RunMonitor) -> None:
        self.cfg, self.model_path, self.tokenizer = cfg, model_path, tokenizer
        self.eval_records, self.reward_spec, self.monitor = eval_records, reward_spec, monitor
        self.sampler = PromptSampler(train_records, cfg.trainer.prompts_per_step, cfg.trainer.seed)
        self.generator = torch.Generator().manual_seed(cfg.trainer.seed)
        self.use_reference = cfg.algo.kl_coef > 0
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ start-up
    def start(self) -> dict[str, float]:
        """Create every actor group; engines, reference and learners load concurrently."""
        cfg, cl = self.cfg, self.cfg.cluster
        start = time.perf_counter()
        device = cl.device
        num_engines = cfg.rollout.num_engines
        cores = os.cpu_count() or 1
        bind = "auto" if num_engines == 1 or device != "cpu" else "nobind"
        engine_kwargs = dict(
            model_path=self.model_path, dtype=cfg.rollout.dtype,
            max_model_len=cfg.rollout.max_new_tokens + 256,
            tensor_parallel_size=cfg.rollout.tensor_parallel_size,
            gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
            kv_cache_gb=cfg.rollout.kv_cache_gb, enforce_eager=cfg.rollout.enforce_eager,
            device=device, cpu_threads_bind=bind,
        )
        self.engines = ActorGroup(
            "rollout", RolloutActor, num_engines, cl.cpus_per_engine, cl.gpus_per_engine,
            cl.placement_timeout_s,
            [dict(engine_kwargs, seed=cfg.rollout.seed + i) for i in range(num_engines)])
        self.learners = ActorGroup(
            "learner", LearnerActor, cfg.learner.world_size, cl.cpus_per_learner,
            cl.gpus_per_learner, cl.placement_timeout_s,
            [dict(rank=r, world_size=cfg.learner.world_size, model_path=self.model_path, device=device)
             for r in range(cfg.learner.world_size)])
        self.reward = ActorGroup("reward", RewardActor, 1, cl.cpus_per_aux, 0.0,
                                 cl.placement_timeout_s, [dict(fn_spec=self.reward_spec)])
        self.reference = None
        if self.use_reference:
            self.reference = ActorGroup(
                "reference", ReferenceActor, 1, cl.cpus_per_aux, cl.gpus_per_aux,
                cl.placement_timeout_s,
                [dict(model_path=self.model_path, dtype=cfg.model.dtype, device=device,
                      num_threads=cores)])
        init_refs = self._init_learners()  # all groups load concurrently; then wait for each
        engine_info = _wait_ready(self.engines, cfg.rollout.init_timeout_s)
        _wait_ready(self.reward, 120.0)
        if self.reference is not None:
            _wait_ready(self.reference, cfg.learner.init_timeout_s)
        learner_info = self.learners.wait(init_refs, "learner start-up (DeepSpeed init)",
                                          cfg.learner.init_timeout_s)
        self.packed_modules = self.engines.run("packed_modules", timeout_s=60)[0]
        self.num_params = learner_info[0]["num_params"]
        return {"startup/total_s": time.perf_counter() - start,
                "startup/engine_init_s": max(e["init_s"] for e in engine_info),
                "startup/learner_init_s": max(l["init_s"] for l in learner_info)}

    def _init_learners(self) -> list:
        cfg = self.cfg
        master_addr, master_port = self.learners.run("address", timeout_s=60)[0]
        backend = cfg.learner.backend
        if backend == "auto":
            backend = "nccl" if cfg.cluster.device == "cuda" else "gloo"
        per_rank = cfg.learner.mini_batch_size // cfg.learner.world_size
        grad_accum = per_rank // cfg.learner.micro_batch_size
        seqs = cfg.trainer.prompts_per_step * cfg.rollout.n_samples_per_prompt
        total_optimizer_steps = cfg.trainer.total_steps * cfg.algo.ppo_epochs * (seqs // cfg.learner.mini_batch_size)
        return self.learners.call(
            "init", master_addr, master_port, backend, cfg.learner.zero_stage,
            cfg.learner.micro_batch_size, grad_accum, asdict(cfg.learner.optim),
            total_optimizer_steps, cfg.model.dtype == "bfloat16",
            cfg.model.gradient_checkpointing, cfg.learner.init_timeout_s)

    # ------------------------------------------------------------------ phases
    def generate(self, records: list[dict], n: int, temperature: float) -> tuple[list[dict], list[dict]]:
        """Split prompts across engines; returns (samples, the record each sample answers)."""
        ro = self.cfg.rollout
        prompt_ids = [self.tokenizer(r["prompt"])["input_ids"] for r in records]
        parts = _split(list(range(len(records))), len(self.engines))
        refs = self.engines.call_each(
            "generate",
            [([prompt_ids[i] for i in part], n, temperature, ro.top_p, ro.max_new_tokens) for part in parts])
        results = self.engines.wait(refs, "generate", ro.init_timeout_s)
        samples = [s for engine_samples in results for s in engine_samples]
        order = [i for part in parts for i in part for _ in range(n)]  # prompt-major, G contiguous
        for sample, i in zip(samples, order):
            sample["prompt_ids"] = prompt_ids[i]
        return samples, [records[i] for i in order]

    def score_and_reference(self, batch: Batch, records: list[dict], texts: list[str]) -> None:
        """Phase 2: rewards and reference logprobs in flight at the same time."""
        reward_ref = self.reward.call("score", records, texts)
        refs, names = [reward_ref[0]], [self.reward.names[0]]
        if self.reference is not None:
            refs += self.reference.call("compute_logprobs", batch, self.cfg.rollout.temperature,
                                        self.cfg.learner.micro_batch_size)
            names.append(self.reference.names[0])
        results = wait_all(refs, names, "score/reference", self.cfg.reward.timeout_s)
        batch["rewards"] = torch.tensor(results[0], dtype=torch.float32)
        if self.reference is not None:
            ref = results[1]
            padded = torch.zeros_like(batch["rollout_logprobs"])
            padded[:, : ref.shape[1]] = ref
            batch["ref_logprobs"] = padded

    def train(self, batch: Batch, step: int) -> dict[str, float]:
        """Phase 4: shuffle, cut into mini-batches, hand each rank its equal share of each."""
        cfg = self.cfg
        ranks, mini = cfg.learner.world_size, cfg.learner.mini_batch_size
        keys = ["input_ids", "attention_mask", "response_mask", "rollout_logprobs", "advantages"]
        keys += ["ref_logprobs"] if "ref_logprobs" in batch.tensors else []
        per_rank: list[list] = [[] for _ in range(ranks)]
        for _ in range(cfg.algo.ppo_epochs):
            order = torch.randperm(len(batch), generator=self.generator)
            for start in range(0, len(batch), mini):
                rows = order[start : start + mini]
                num_tokens, num_seqs = count_normalizers(batch["response_mask"][rows])
                for rank, shard_rows in enumerate(rows.chunk(ranks)):
                    per_rank[rank].append((batch.select(shard_rows, keys), float(num_tokens), float(num_seqs)))
        loss_cfg = dict(
            temperature=cfg.rollout.temperature, policy_loss=cfg.algo.policy_loss,
            clip_low=cfg.algo.clip_low, clip_high=cfg.algo.clip_high, kl_coef=cfg.algo.kl_coef,
            kl_estimator=cfg.algo.kl_estimator, entropy_coef=cfg.algo.entropy_coef,
            loss_agg=cfg.algo.loss_agg)
        refs = self.learners.call_each("train_step", [(part, loss_cfg, step) for part in per_rank])
        results = self.learners.wait(refs, "train_step", cfg.learner.step_timeout_s)
        merged = {}
        for key in results[0]:
            values = [r[key] for r in results]
            # additive terms (global-normalised) sum over ranks; rank-local stats average
            additive = key.startswith(("loss/", "kl/", "entropy/"))
            merged[key] = sum(values) if additive else sum(values) / len(values)
            if key.endswith("_max"):
                merged[key] = max(values)
        return merged

    def sync_weights(self) -> dict[str, float]:
        """Phase 5: learner -> object store buckets -> every engine's in-place reload.

        With verification, the learner hashes its weights while the engines load them, and each
        engine hashes what it holds afterwards; any difference stops the run.
        """
        ro = self.cfg.rollout
        # ZeRO-3 gathers are collective, so every rank joins; otherwise rank 0 holds everything
        ranks = self.learners.actors if self.cfg.learner.zero_stage == 3 else self.learners.actors[:1]
        names = self.learners.names[: len(ranks)]
        refs = [r.publish_weights.remote(ro.sync_bucket_mb, ro.dtype, self.packed_modules) for r in ranks]
        # engines get the publish ref itself (in a list, so Ray does not resolve it here) and
        # start loading as soon as it resolves; the learner hashes its weights meanwhile
        loads = self.engines.call("load_published", [refs[0]], ro.sync_timeout_s, ro.verify_sync)
        if ro.verify_sync:
            sum_refs = [r.weight_checksums.remote(ro.dtype, self.packed_modules) for r in ranks]
        published = wait_all(refs, names, "weight publish", ro.sync_timeout_s)[0]
        results = self.engines.wait(loads, "weight sync", ro.sync_timeout_s)
        metrics = {"sync/buckets": float(published["buckets"]), "sync/mb": published["bytes"] / 2**20,
                   "sync/engine_load_s": max(r["load_s"] for r in results),
                   "sync/engine_verify_s": max(r.get("verify_s", 0.0) for r in results)}
        if ro.verify_sync:
            expected = wait_all(sum_refs, names, "weight checksums", ro.sync_timeout_s)[0]
            for name, result in zip(self.engines.names, results):
                problems = diff_checksums(expected, result["checksums"])
                if problems:
                    raise WeightSyncError(
                        f"{name} holds different weights than the learner after sync "
                        f"({len(problems)} tensors differ): " + "; ".join(problems[:5]))
            metrics["sync/verified_tensors"] = float(len(expected))
        return metrics

    # ------------------------------------------------------------------ one step
    def step(self, step: int) -> dict[str, float]:
        cfg, t0 = self.cfg, time.perf_counter()
        records = self.sampler.next_batch()
        # 1. generate
        samples, sample_records = self.generate(records, cfg.rollout.n_samples_per_prompt,
                                                cfg.rollout.temperature)
        batch = collate_rollouts([s["prompt_ids"] for s in samples], [s["token_ids"] for s in samples],
                                 [s["logprobs"] for s in samples], self.tokenizer.pad_token_id)
        t1 = time.perf_counter()
        # 2. score + reference logprobs
        texts = [s["text"] for s in samples]
        self.score_and_reference(batch, sample_records, texts)
        t2 = time.perf_counter()
        # 3. advantages
        advantages, _ = compute_advantages(
            cfg.algo.advantage, rewards=batch["rewards"], response_mask=batch["response_mask"],
            group_size=cfg.rollout.n_samples_per_prompt, norm_by_std=cfg.algo.norm_adv_by_std)
        batch["advantages"] = advantages
        # 4. train
        train_metrics = self.train(batch, step)
        t3 = time.perf_counter()
        # 5. sync
        sync_metrics = self.sync_weights()
        t4 = time.perf_counter()
        metrics = self._step_metrics(batch, samples, t0, t1, t2, t3, t4)
        metrics.update(train_metrics)
        metrics.update(sync_metrics)
        if step == 1 or step % cfg.logger.sample_every == 0:
            self.monitor.log_samples(step, _sample_rows(sample_records, texts, batch["rewards"],
                                                        cfg.logger.num_samples))
        return metrics

    def _step_metrics(self, batch: Batch, samples: list[dict], t0, t1, t2, t3, t4) -> dict[str, float]:
        rewards, lengths = batch["rewards"], batch["response_mask"].sum(-1)
        group = rewards.view(-1, self.cfg.rollout.n_samples_per_prompt)
        truncated = sum(s["finish_reason"] == "length" for s in samples) / len(samples)
        return {
            "reward/mean": rewards.mean().item(), "reward/std": rewards.std().item(),
            "reward/max": rewards.max().item(), "reward/min": rewards.min().item(),
            "reward/frac_groups_all_equal": (group.std(-1) == 0).float().mean().item(),
            "response/length_mean": lengths.mean().item(), "response/length_max": lengths.max().item(),
            "response/truncated_frac": truncated,
            "timing/generate_s": t1 - t0, "timing/score_s": t2 - t1, "timing/train_s": t3 - t2,
            "timing/sync_s": t4 - t3, "timing/step_s": t4 - t0,
            "throughput/tokens_per_s": lengths.sum().item() / (t4 - t0),
        }

    # ------------------------------------------------------------------ eval
    def evaluate(self, step: int) -> dict[str, float]:
        """Greedy decoding on the held-out prompts, scored by the same reward function."""
        start = time.perf_counter()
        samples, records = self.generate(self.eval_records, 1, 0.0)
        texts = [s["text"] for s in samples]
        rewards = torch.tensor(self.reward.run("score", records, texts, timeout_s=self.cfg.reward.timeout_s)[0])
        metrics = {
            "eval/reward_mean": rewards.mean().item(),
            "eval/solved_frac": (rewards >= 1.0 - 1e-6).float().mean().item(),
            "eval/length_mean": sum(len(s["token_ids"]) for s in samples) / len(samples),
            "eval/time_s": time.perf_counter() - start,
        }
        self.monitor.log_eval(step, metrics)
        return metrics

    def shutdown(self) -> None:
        for group in ("engines", "learners", "reward", "reference"):
            actors = getattr(self, group, None)
            if actors is not None:
                try:
                    actors.kill()
                except Exception:  # noqa: BLE001 - best-effort cleanup after a failure
                    pass


def _wait_ready(group: ActorGroup, timeout_s: float) -> list:
    return group.wait(group.call("ready"), f"{group.name} start-up", timeout_s)


def _split(items: list, parts: int) -> list[list]:
    """Contiguous, near-equal parts (sizes differ by at most one)."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def _sample_rows(records: list[dict], texts: list[str], rewards: torch.Tensor, num: int) -> list[dict[str, Any]]:
    step = max(1, len(texts) // num)
    return [{"prompt": records[i]["prompt"], "completion": texts[i], "reward": float(rewards[i])}
            for i in range(0, len(texts), step)][:num]
