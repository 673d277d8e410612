"""Learner actor: one DeepSpeed data-parallel rank.

`learner.world_size` of these form one process group (gloo on CPU, NCCL on GPU). The controller
hands every rank the same number of equally sized micro-batches per mini-batch, so the ranks step
in lock-step; each micro-batch's loss is normalised by the mini-batch's global token count, so the
update equals the one a single rank would make on the whole mini-batch.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist

from rlhf_dist.algo.objective import policy_objective
from rlhf_dist.data.batch import Batch
from rlhf_dist.distributed.checksum import checksums, fuse_like_engine, layer_key
from rlhf_dist.distributed.deepspeed_config import build_deepspeed_config, lr_lambda
from rlhf_dist.distributed.process_group import free_port, init_learner_process_group, node_ip
from rlhf_dist.errors import NonFiniteLossError
from rlhf_dist.models.hf import DTYPES, load_causal_lm, response_logprobs


class LearnerActor:
    def __init__(self, rank: int, world_size: int, model_path: str, device: str = "cpu") -> None:
        self.rank, self.world_size = rank, world_size
        self.model_path, self.device = model_path, device
        if device == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        self.engine = None
        self.optimizer_steps = 0

    def address(self) -> tuple[str, int]:
        return node_ip(), free_port()

    def init(
        self,
        master_addr: str,
        master_port: int,
        backend: str,
        zero_stage: int,
        micro_batch_size: int,
        grad_accum_steps: int,
        optim: dict[str, Any],
        total_optimizer_steps: int,
        bf16: bool,
        gradient_checkpointing: bool,
        timeout_s: float,
    ) -> dict[str, Any]:
        import deepspeed

        start = time.perf_counter()
        init_learner_process_group(self.rank, self.world_size, master_addr, master_port, backend, timeout_s)
        if self.device == "cuda":
            torch.cuda.set_device(0)
        model = load_causal_lm(self.model_path, "float32", self.device)
        num_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=optim["lr"], betas=tuple(optim["betas"]), eps=optim["eps"],
            weight_decay=optim["weight_decay"],
        )
        schedule = lr_lambda(optim["scheduler"], optim["warmup_steps"], total_optimizer_steps,
                             optim["min_lr_ratio"])
        config = build_deepspeed_config(zero_stage, micro_batch_size, grad_accum_steps,
                                        self.world_size, optim["grad_clip"], bf16)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        )
        self.grad_accum_steps = grad_accum_steps
        self.zero_stage = zero_stage
        return {"rank": self.rank, "init_s": time.perf_counter() - start,
                "num_params": num_params}

    def train_step(self, minibatches: list[tuple[Batch, float, float]], loss_cfg: dict[str, Any],
                   step: int) -> dict[str, float]:
        """One pass over this rank's shards of every mini-batch (all epochs, in order).

        minibatches[i] = (this rank's shard of mini-batch i, global masked tokens, global sequences).
        """
        self.engine.train()
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        first, once = True, {}
        for shard, num_tokens, num_seqs in minibatches:
            micro_batches = shard.chunk(self.grad_accum_steps)
            for micro in micro_batches:
                metrics, stats = self._micro_step(micro, loss_cfg, num_tokens, num_seqs, step, first)
                first = False
                for key, value in metrics.items():
                    if key.startswith("sync/"):
                        once[key] = value  # measured on the first micro-batch only
                    else:
                        sums[key] += value
                for key, value in stats.items():
                    sums[f"policy/{key}"] += value
                    counts[f"policy/{key}"] += 1
            self.optimizer_steps += 1
        num_minibatches = max(1, len(minibatches))
        result = {k: (v / counts[k] if k in counts else v / num_minibatches) for k, v in sums.items()}
        result.update(once)
        result["optim/lr"] = self.engine.get_lr()[0]
        result["optim/grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        return result

    def _micro_step(self, micro: Batch, loss_cfg: dict[str, Any], num_tokens: float,
                    num_seqs: float, step: int, first: bool) -> tuple[dict[str, float], dict[str, float]]:
        micro = micro.trimmed()
        tensors = {k: v.to(self.device) for k, v in micro.tensors.items()}
        logprobs, entropy = response_logprobs(  # entropy is always logged, so always computed
            self.engine.module, tensors["input_ids"], tensors["attention_mask"],
            micro.prompt_width, loss_cfg["temperature"], with_entropy=True,
        )
        loss, metrics, stats = policy_objective(
            logprobs, tensors["rollout_logprobs"], tensors["advantages"], tensors["response_mask"],
            ref_logprobs=tensors.get("ref_logprobs"),
            entropy=entropy,  # enters the loss only when entropy_coef > 0
            policy_loss=loss_cfg["policy_loss"], clip_low=loss_cfg["clip_low"],
            clip_high=loss_cfg["clip_high"], kl_coef=loss_cfg["kl_coef"],
            kl_estimator=loss_cfg["kl_estimator"], entropy_coef=loss_cfg["entropy_coef"],
            loss_agg=loss_cfg["loss_agg"], num_tokens=num_tokens, num_seqs=num_seqs,
        )
        if first:
            # Before any update in this step the learner and the engine that sampled the batch
            # hold the same weights, so their logprobs must agree up to kernel numerics; a large
            # gap means the last weight sync did not reach the engine's compute path.
            gap = (logprobs.detach() - tensors["rollout_logprobs"]).abs() * tensors["response_mask"]
            metrics["sync/rollout_logprob_gap_max"] = gap.max()
        self._check_finite(loss, metrics, step)
        # DeepSpeed divides by grad-accum steps and averages over ranks; undo both so the
        # gradient is that of the global-normalised sum (see module docstring).
        self.engine.backward(loss * self.world_size * self.grad_accum_steps)
        self.engine.step()
        return ({k: float(v) for k, v in metrics.items()}, {k: float(v) for k, v in stats.items()})

    def _check_finite(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], step: int) -> None:
        """All ranks agree before backward, so a NaN on one rank cannot deadlock the others."""
        flag = torch.tensor([float(torch.isfinite(loss).item())], device=loss.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() < 1.0:
            terms = ", ".join(f"{k}={float(v):.4g}" for k, v in metrics.items())
            raise NonFiniteLossError(
                f"non-finite loss at RL step {step} (rank {self.rank}: {terms}). The weights were "
                "not updated with it. Usual causes: a learning rate too high "
                "(learner.optim.lr), rewards with NaN/inf, or bf16 overflow. Lower the LR or "
                "check reward.fn.")

    def publish_weights(self, bucket_mb: float, dtype: str,
                        packed_modules: dict[str, list[str]]) -> dict[str, Any] | None:
        """Put the current weights into the object store as buckets of whole layers.

        Every rank must call this under ZeRO-3 (gathers are collective); below ZeRO-3 only rank 0
        is called. Rank 0 returns {"first_bucket": [(name, tensor), ...], "refs": [ObjectRef of
        each further bucket], "shapes": {engine name: shape}, "bytes": int, "buckets": int};
        other ranks return None.
        """
        import ray

        limit = bucket_mb * 2**20
        refs, shapes, pending, pending_bytes, total, inline = [], {}, [], 0, 0, None

        def flush():
            nonlocal pending, pending_bytes, inline
            if pending and self.rank == 0:
                meta = {name: tensor.to("meta") for name, tensor in pending}
                shapes.update({n: list(t.shape) for n, t in fuse_like_engine(meta, packed_modules).items()})
                if inline is None:
                    inline = pending  # travels inside the publish result: one fetch fewer
                else:
                    refs.append(ray.put(pending))  # ray.put copies: the bucket is a snapshot
            pending, pending_bytes = [], 0

        for params in self._layer_groups():
            with self._gathered([p for _, p in params]):
                if self.rank == 0:
                    for name, param in params:
                        # clone: ZeRO flattens params into one buffer, and pickling a view
                        # would ship the whole buffer once per tensor (measured: 3x slower sync)
                        tensor = param.detach().to(DTYPES[dtype]).cpu().clone()
                        pending.append((name, tensor))
                        pending_bytes += tensor.numel() * tensor.element_size()
                        total += tensor.numel() * tensor.element_size()
            if pending_bytes >= limit:
                flush()
        flush()
        if self.rank != 0:
            return None
        return {"first_bucket": inline or [], "refs": refs, "shapes": shapes, "bytes": total,
                "buckets": len(refs) + (inline is not None)}

    def weight_checksums(self, dtype: str, packed_modules: dict[str, list[str]]) -> dict[str, int] | None:
        """Checksums of the current weights as the engine names them (rank 0; see publish)."""
        sums = {}
        for params in self._layer_groups():
            with self._gathered([p for _, p in params]):
                if self.rank == 0:
                    named = {n: p.detach().to(DTYPES[dtype]) for n, p in params}
                    sums.update(checksums(fuse_like_engine(named, packed_modules)))
        return sums if self.rank == 0 else None

    def _layer_groups(self) -> list[list[tuple[str, torch.nn.Parameter]]]:
        groups: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
        for name, param in self.engine.module.named_parameters():
            groups.setdefault(layer_key(name), []).append((name, param))
        return list(groups.values())

    def _gathered(self, params: list):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, enabled=self.zero_stage == 3)

    def save_pretrained(self, path: str) -> bool:
        """Write the current policy as an HF model dir (rank 0 writes; ZeRO-3 gathers first)."""
        import deepspeed
        from transformers import AutoTokenizer

        params = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.zero_stage == 3):
            if self.rank == 0:
                self.engine.module.save_pretrained(path)
                AutoTokenizer.from_pretrained(self.model_path).save_pretrained(path)
        return self.rank == 0

    def get_weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the full weights (tests)."""
        import deepspeed

        params = dict(self.engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), enabled=self.zero_stage == 3):
            return {n: p.detach().cpu().clone() for n, p in params.items()}
