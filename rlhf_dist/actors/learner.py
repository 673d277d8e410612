"""Learner actor: one DeepSpeed rank of the policy. Thin verbs over `DeepSpeedRank`.

`train_step` runs the policy objective (rlhf_dist.algo.objective) over this rank's shards;
`compute_logprobs` gives the learner's own log pi_old before an update (algo.recompute_old_logprobs);
`weight_plan` / `weights_call` / `weight_checksums` hand the weights to the rollout engines
(rlhf_dist.weights: the bucket plan, a transport's learner side, the checksums to verify against).
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_dist.actors.ds_rank import DeepSpeedRank
from rlhf_dist.algo.masked import aggregate_loss
from rlhf_dist.algo.objective import PolicyLossConfig, policy_objective, rollout_correction
from rlhf_dist.data.batch import Batch
from rlhf_dist.models.lora import reference_off
from rlhf_dist.weights.adapter import AdapterPublisher
from rlhf_dist.weights.merged import MergedLoraPublisher
from rlhf_dist.weights.plan import BucketPlan, WeightPublisher
from rlhf_dist.weights.transports import call_verb
from rlhf_dist.models.hf import load_causal_lm, response_logprobs


MERGE_BUCKET_MB = 256.0  # gathered at once while exporting a merged model


class LearnerActor(DeepSpeedRank):
    role = "learner"

    def build_model(self) -> torch.nn.Module:
        return load_causal_lm(self.model_path, "float32", self.load_device)

    def init(self, *args, **kwargs) -> dict[str, Any]:
        info = super().init(*args, **kwargs)
        # with LoRA the engines get merged weights under the base model's names (weights/merged.py)
        # or, with model.lora.sync=adapter, the adapter tensors only (weights/adapter.py)
        publisher = WeightPublisher if self.lora is None else (
            AdapterPublisher if self.lora.sync == "adapter" else MergedLoraPublisher)
        self.publisher = publisher(self.ds_engine.module, self.rank, self.zero_stage)
        return info

    def compute_logprobs(self, batch: Batch, temperature: float, micro_batch_size: int,
                         banned_token_id: int | None = None) -> torch.Tensor:
        """log pi_theta of every response token of this rank's shard, before any update."""
        def forward(input_ids, attention_mask, prompt_width):
            return response_logprobs(self.ds_engine.module, input_ids.to(self.device),
                                     attention_mask.to(self.device), prompt_width, temperature,
                                     banned_token_id=banned_token_id)[0]

        return self.forward_batch(batch, micro_batch_size, forward)

    def compute_ref_logprobs(self, batch: Batch, temperature: float, micro_batch_size: int,
                             banned_token_id: int | None = None) -> torch.Tensor:
        """log pi_ref of this rank's shard: with LoRA the reference is the base model, i.e. this
        model with its adapters off (model.lora.reference_from_base), so no reference actor."""
        if self.lora is None:
            raise RuntimeError("compute_ref_logprobs needs LoRA adapters (model.lora.rank > 0): without "
                               "them the learner's model is the trained policy, not the reference")
        with reference_off(self.ds_engine.module):
            return self.compute_logprobs(batch, temperature, micro_batch_size, banned_token_id)

    def train_step(self, minibatches: list[tuple[Batch, float, float]], loss: PolicyLossConfig,
                   step: int, max_tokens: int = 0,
                   sft: list[tuple[Batch, float]] | None = None) -> dict[str, float]:
        """ppo_epochs x mini-batches of policy updates on this rank's shards.

        `max_tokens` > 0: micro-batches by padded-token budget instead of fixed size
        (`DeepSpeedRank.run_minibatches`). `sft`: this rank's shard of each mini-batch's
        demonstrations and their global token count; loss.sft_coef times their token-mean NLL
        joins that mini-batch's update (the SFT mix, logged as loss/sft)."""
        objective = loss.objective_kwargs()
        # before this step's first update the learner holds the weights the engine sampled with
        # (unless the batch was sampled a step ahead, async)
        check_gap = loss.same_weights_as_engine

        def micro_loss(micro: Batch, num_tokens: float, num_seqs: float):
            nonlocal check_gap
            tensors = {k: v.to(self.device) for k, v in micro.tensors.items()}
            mask = tensors["response_mask"]
            logprobs, entropy = response_logprobs(  # through the engine: ZeRO-3 counts micro-steps there
                self.ds_engine, tensors["input_ids"], tensors["attention_mask"],
                micro.prompt_width, loss.temperature, with_entropy=True,
                entropy_grad=loss.entropy_coef > 0,  # else a metric only: no (B, T, V) graph
                banned_token_id=loss.banned_token_id)
            old_logprobs, is_weights, is_stats = rollout_correction(
                logprobs, tensors["rollout_logprobs"], mask, loss.old_logprobs_source,
                tensors.get("old_logprobs"), loss.tis_cap)
            loss_value, metrics, stats = policy_objective(
                logprobs, old_logprobs, tensors["advantages"], mask,
                ref_logprobs=tensors.get("ref_logprobs"), entropy=entropy, is_weights=is_weights,
                num_tokens=num_tokens, num_seqs=num_seqs, **objective)
            stats = {f"policy/{k}": v for k, v in {**stats, **is_stats}.items()}
            if check_gap:
                # same weights as the engine: logprobs agree up to kernel numerics; a large gap
                # means the last weight sync did not reach the engine
                gap = (logprobs.detach() - tensors["rollout_logprobs"]).abs() * mask
                stats["sync/rollout_logprob_gap_max"] = gap.max()
                check_gap = False
            return loss_value, metrics, stats

        def sft_loss(micro: Batch, num_tokens: float):
            tensors = {k: v.to(self.device) for k, v in micro.tensors.items()}
            logprobs, _ = response_logprobs(self.ds_engine, tensors["input_ids"], tensors["attention_mask"],
                                            micro.prompt_width)
            nll = aggregate_loss(-logprobs, tensors["response_mask"], "token_mean", num_tokens=num_tokens)
            return loss.sft_coef * nll, {"loss/sft": nll.detach()}

        extra = (sft, sft_loss) if sft else None
        return self.run_minibatches(minibatches, micro_loss, step, max_tokens=max_tokens, extra=extra)

    # ------------------------------------------------------------------ weights -> engines
    def weight_plan(self, bucket_mb: float, dtype: str) -> BucketPlan:
        return self.publisher.plan(bucket_mb, dtype)

    def engine_lora_config(self) -> dict[str, Any] | None:
        """With adapter sync, the PEFT config the engines serve the adapter with; else None."""
        return self.publisher.engine_lora_config()

    def weights_call(self, transport: str, verb: str, *args: Any) -> Any:
        """The learner side of a weight transport (rlhf_dist.weights.transports): its `verb` on
        this rank's weights, e.g. ("collective", "send", plan, dtype, timeout_s). Under ZeRO-3
        every rank is called (the gathers are collective); only rank 0 sends."""
        return call_verb(transport, "learner", verb, self.publisher, *args)

    def published_weights(self) -> dict[str, torch.Tensor] | None:
        """Every tensor as the engines get it (merged weights with LoRA, or only A and scaled B with
        model.lora.sync=adapter), in fp32 on rank 0 (tests)."""
        plan = self.publisher.plan(float("inf"), "float32")
        tensors = {n: t.clone() for bucket in self.publisher.buckets(plan, "float32") for n, t in bucket}
        return tensors if self.rank == 0 else None

    def save_merged(self, path: str) -> bool:
        """model.lora.export_merged: the base model with the adapter merged in, as a full HF dir
        that model.path accepts (rank 0 writes; under ZeRO-3 every rank joins the gathers)."""
        from transformers import AutoTokenizer

        publisher = MergedLoraPublisher(self.ds_engine.module, self.rank, self.zero_stage)
        plan = publisher.plan(MERGE_BUCKET_MB, "float32")
        merged = {n: t.clone() for bucket in publisher.buckets(plan, "float32") for n, t in bucket}
        if self.rank == 0:
            model = load_causal_lm(self.model_path, "float32")
            missing, unexpected = model.load_state_dict(merged, strict=False)
            if unexpected or any(not n.endswith("lm_head.weight") for n in missing):  # lm_head: tied
                raise RuntimeError(f"merged export: names the base model lacks {unexpected}, misses {missing}")
            model.save_pretrained(path)
            AutoTokenizer.from_pretrained(self.model_path).save_pretrained(path)
        return self.rank == 0

    def weight_checksums(self, plan: BucketPlan, dtype: str, packed_modules: dict[str, list[str]],
                         layouts: list[dict]) -> list[dict[str, list[int]]] | None:
        return self.publisher.checksums(plan, dtype, packed_modules, layouts)
