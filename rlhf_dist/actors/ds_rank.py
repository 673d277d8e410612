"""One DeepSpeed data-parallel rank: what the policy learner and the critic have in common.

`world_size` ranks form one process group (gloo on CPU, NCCL on GPU). The controller hands every
rank an equal shard of each mini-batch; every rank cuts it into the same number of micro-batches
(fixed-size, or by a token budget with the count agreed between ranks), so the ranks step in
lock-step; each micro-batch's loss is normalised by the mini-batch's global token (or sequence)
count, so the update equals the one a single rank would make on the whole mini-batch.

Subclasses say which model they train (`build_model`) and add their own verbs; the set-up, the
micro-batch loop, the finiteness checks and weight access live here once.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from typing import Any, Callable

import torch
import torch.distributed as dist

from rlhf_dist.runtime.cpu import use_cores
from rlhf_dist.runtime.ds_group import STATS_WEIGHT
from rlhf_dist.runtime.files import ModelSpec, local_model_path, read_dir
from rlhf_dist.data.batch import Batch
from rlhf_dist.distributed.deepspeed_config import build_deepspeed_config, lr_lambda
from rlhf_dist.distributed.process_group import free_port, init_learner_process_group, node_ip
from rlhf_dist.weights.plan import gathered
from rlhf_dist.errors import NonFiniteLossError
from rlhf_dist.models.hf import disable_dropout
from rlhf_dist.models.lora import LoraSpec, add_adapters

# (micro-batch, global tokens, global sequences) -> (loss, additive metrics, averaged stats).
# The training forward must call the DeepSpeed engine, not `ds_engine.module`: ZeRO-3 advances its
# micro-step counter in `engine.forward`, and without it every micro-batch's gradient overwrites
# the previous one instead of accumulating (found by tests/ray/test_learner_dist.py).
MicroLoss = Callable[[Batch, float, float], tuple[torch.Tensor, dict, dict]]
# A second loss on other rows, in the same optimizer step (the policy's SFT-mix term): this rank's
# shard of each mini-batch's extra rows with their global token count, and its micro-batch loss.
ExtraRows = tuple[list[tuple[Batch, float]], Callable[[Batch, float], tuple[torch.Tensor, dict]]]


class DeepSpeedRank:
    role = "learner"  # names the rank in messages: "learner", "critic", "sft", "reward_model"
    stage = "RL"  # names the stage in messages: "RL", "SFT", "reward-model"

    def __init__(self, rank: int, world_size: int, model_path: ModelSpec, device: str = "cpu",
                 cpu_cores: list[int] | None = None, lora: LoraSpec | None = None,
                 lora_path: ModelSpec | None = None) -> None:
        self.rank, self.world_size = rank, world_size
        self.model_path, self.device = local_model_path(model_path), device
        # LoRA (model.lora): adapters on the model, the only parameters trained (rlhf_dist/models/lora.py)
        if lora is not None and lora_path is not None:  # the adapter dir as this node reads it
            lora = dataclasses.replace(lora, path=local_model_path(lora_path))
        self.lora = lora
        if device == "cpu":  # the ranks share the node's cores (or cluster.learner_cores)
            use_cores(cpu_cores, world_size)
        self.ds_engine = None
        self.zero_stage = 0  # set by init
        self.optimizer_steps = 0
        self._skipped_steps = 0  # DeepSpeed's count of steps it skipped (non-finite gradients)

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    @property
    def load_device(self) -> str:
        """Where `build_model` loads the weights: the CPU, unless ZeRO-3 partitions them onto the
        device while loading. DeepSpeed casts the model (bf16) before it moves it to the GPU, so
        the module's fp32 load never lands on a GPU a colocated engine has sized its memory on;
        the optimizer's fp32 master copy still does (about 6 bytes per parameter in all)."""
        return self.device if self.zero_stage == 3 else "cpu"

    def address(self) -> tuple[str, int]:
        return node_ip(), free_port()

    def init(self, master_addr: str, master_port: int, backend: str, zero_stage: int,
             micro_batch_size: int, grad_accum_steps: int, optim: dict[str, Any],
             total_optimizer_steps: int, bf16: bool, gradient_checkpointing: bool,
             timeout_s: float, seed: int = 0) -> dict[str, Any]:
        import deepspeed

        start = time.perf_counter()
        # anything built at random (a critic's or reward model's new scalar head) is the same in
        # every run of the same seed: a resumed run must match an uninterrupted one
        torch.manual_seed(seed)
        init_learner_process_group(self.rank, self.world_size, master_addr, master_port, backend, timeout_s)
        if self.device == "cuda":
            torch.cuda.set_device(0)
        self.zero_stage = zero_stage
        config = build_deepspeed_config(zero_stage, micro_batch_size, grad_accum_steps,
                                        self.world_size, optim["grad_clip"], bf16)
        with zero3_loading(config) if zero_stage == 3 else nullcontext():
            model = disable_dropout(self.build_model())
        if self.lora is not None:  # after disable_dropout: the adapters keep model.lora.dropout
            torch.manual_seed(seed)  # A's random init: the same on every rank and in every run
            model = add_adapters(model, self.lora)
            if gradient_checkpointing:  # the frozen embeddings' output must carry a gradient
                model.enable_input_require_grads()
        trainable = [p for p in model.parameters() if p.requires_grad]
        num_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        # what this rank holds right after loading: ~num_params / world_size under ZeRO-3
        local_params = sum(p.numel() + (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0)
                           for p in model.parameters())
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        optimizer = torch.optim.AdamW(  # with LoRA: the adapters only, so moments exist for them only
            trainable, lr=optim["lr"], betas=tuple(optim["betas"]), eps=optim["eps"],
            weight_decay=optim["weight_decay"])
        schedule = lr_lambda(optim["scheduler"], optim["warmup_steps"], total_optimizer_steps,
                             optim["min_lr_ratio"])
        self.ds_engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        self.grad_accum_steps, self.zero_stage = grad_accum_steps, zero_stage
        return {"rank": self.rank, "init_s": time.perf_counter() - start, "num_params": num_params,
                "local_params": local_params,
                "trainable_params": sum(getattr(p, "ds_numel", p.numel()) for p in trainable)}

    # ------------------------------------------------------------------ training loop
    def run_minibatches(self, minibatches: list[tuple[Batch, float, float]], micro_loss: MicroLoss,
                        step: int, prefix: str = "", max_tokens: int = 0,
                        extra: ExtraRows | None = None) -> dict[str, float]:
        """One pass over this rank's shards of every mini-batch (all epochs, in order).

        minibatches[i] = (this rank's shard of mini-batch i, global masked tokens, global
        sequences). Additive metrics are summed within a mini-batch and averaged over mini-batches;
        stats are averaged over micro-batches (`*_max` / `*_min` keep the extreme).
        Micro-batches: see `_micro_batches`. Whatever their number, the optimizer steps once per
        mini-batch: the accumulation boundary is set at its last micro-batch.
        `extra` = (shards, loss): after mini-batch i's micro-batches, shards[i] (cut into
        grad_accum_steps micro-batches) adds its loss's gradient to the same optimizer step.
        """
        self.ds_engine.train()
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        extremes: dict[str, float] = {}
        grad_norms, padded, real, forwards = [], 0, 0, 0
        zero0_norm, response_tokens = None, 0
        try:
            for index, (shard, num_tokens, num_seqs) in enumerate(minibatches):
                micros = self._micro_batches(shard, max_tokens)
                extra_micros = []
                if extra is not None:
                    extra_shard, extra_tokens = extra[0][index]
                    # every row, in at most grad_accum_steps parts (the same count on every rank:
                    # the shards are equal), none empty
                    rows = torch.arange(len(extra_shard)).tensor_split(min(self.grad_accum_steps, len(extra_shard)))
                    extra_micros = [extra_shard.select(part).trimmed() for part in rows]
                for micro in extra_micros:  # the extra rows' loss joins this mini-batch's step
                    self.ds_engine.set_gradient_accumulation_boundary(False)
                    loss, metrics = extra[1](micro, extra_tokens)
                    self._check_finite(loss, metrics, step)
                    self.ds_engine.backward(loss * self.world_size, scale_wrt_gas=False)
                    self.ds_engine.step()  # not a boundary: DeepSpeed only counts the micro-step
                    _accumulate(sums, counts, extremes, metrics, {}, 0)
                    forwards += 1
                for i, micro in enumerate(micros):
                    self.ds_engine.set_gradient_accumulation_boundary(i == len(micros) - 1)
                    loss, metrics, stats = micro_loss(micro, num_tokens, num_seqs)
                    self._check_finite(loss, metrics, step)
                    # DeepSpeed averages over ranks: undo it so the gradient is that of the
                    # global-normalised sum (module docstring); no division by the micro-batch count.
                    self.ds_engine.backward(loss * self.world_size, scale_wrt_gas=False)
                    if self.ds_engine.is_gradient_accumulation_boundary():
                        zero0_norm = self._zero0_grad_norm(step)
                    self.ds_engine.step()
                    tokens = int(micro["response_mask"].sum()) if "response_mask" in micro.tensors else len(micro)
                    _accumulate(sums, counts, extremes, metrics, stats, tokens)
                    response_tokens += tokens
                    micro_padded, micro_real = micro.token_counts()
                    padded, real, forwards = padded + micro_padded, real + micro_real, forwards + 1
                grad_norms.append(self._grad_norm_after_step(step, zero0_norm))
                self.optimizer_steps += 1
        except NonFiniteLossError:
            # every rank gets here together (the checks all-reduce). ZeRO 1-3: DeepSpeed skipped
            # the step and reset its buffers; ZeRO-0: drop the partial gradients here. Either way
            # the next step starts as if this mini-batch had never been seen.
            if self.zero_stage == 0:
                self.ds_engine.module.zero_grad(set_to_none=True)
            raise
        num_minibatches = max(1, len(minibatches))
        result = {k: (v / max(counts[k], 1) if k in counts else v / num_minibatches) for k, v in sums.items()}
        result.update(extremes)
        result["optim/lr"] = self.ds_engine.get_lr()[0]
        result["optim/grad_norm"] = sum(grad_norms) / max(1, len(grad_norms))
        result["optim/grad_norm_max"] = max(grad_norms, default=0.0)
        result["perf/padded_tokens_per_rank"] = float(padded)  # rows x trimmed width, all passes
        result["perf/forwards_per_rank"] = float(forwards)
        result[STATS_WEIGHT] = float(response_tokens)  # weights this rank's stats in merge_rank_metrics
        result["perf/padded_token_frac"] = 1.0 - real / max(1, padded)
        if self.device == "cuda":  # freed activations back to the GPU: a colocated engine wakes next
            torch.cuda.empty_cache()
        return {k if k.startswith(prefix) else f"{prefix}{k}": v for k, v in result.items()}

    def _micro_batches(self, shard: Batch, max_tokens: int) -> list[Batch]:
        """`grad_accum_steps` equal parts of the shard, or with `max_tokens` > 0 parts of at most
        that many padded tokens (rows grouped by length, `Batch.split_by_tokens`), as many on
        every rank as the rank that needs most: ZeRO gathers and reduces collectively each pass."""
        if not max_tokens:
            return [micro.trimmed() for micro in shard.chunk(self.grad_accum_steps)]
        micros = shard.split_by_tokens(max_tokens)
        num = torch.tensor([len(micros)], device=self.device)
        dist.all_reduce(num, op=dist.ReduceOp.MAX)
        return micros if len(micros) == int(num) else shard.split_by_tokens(max_tokens, int(num))

    def _check_finite(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], step: int) -> None:
        """All ranks agree before backward, so a NaN on one rank cannot deadlock the others."""
        flag = torch.tensor([float(torch.isfinite(loss).item())], device=loss.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() < 1.0:
            if self.zero_stage > 0:
                # Let DeepSpeed skip the step its own way, which also resets its partial-gradient
                # buffers: end the mini-batch here with this non-finite loss (every rank, so the
                # overflow check that spans the ranks sees it) and step.
                self.ds_engine.set_gradient_accumulation_boundary(True)
                self.ds_engine.backward(loss * float("nan"), scale_wrt_gas=False)
                self.ds_engine.step()
                self._skipped_steps = getattr(self.ds_engine, "skipped_steps", 0)  # expected
            terms = ", ".join(f"{k}={float(v):.4g}" for k, v in metrics.items())
            raise NonFiniteLossError(
                f"non-finite {self.role} loss at {self.stage} step {step} (rank {self.rank}: {terms}). The "
                "weights were not updated with it. Usual causes: a learning rate too high "
                f"({self.role}.optim.lr), rewards with NaN/inf, or bf16 overflow. Lower the LR or "
                "check reward.fn.")

    def _zero0_grad_norm(self, step: int) -> float | None:
        """ZeRO-0: the global pre-clip gradient norm, from the all-reduced `.grad`s, before the
        step. DeepSpeed computes it while clipping but drops it in fp32 (`get_global_grad_norm()`
        is None), and ZeRO-0 applies NaN/inf gradients (ZeRO 1-3 skip such a step): a non-finite
        norm stops the step here. ZeRO 1-3: None (DeepSpeed's own norm is used)."""
        if self.zero_stage != 0:
            return None
        grads = [p.grad for p in self.ds_engine.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0).float().reshape(1)
        finite = torch.isfinite(norm).float()
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1.0:
            self._raise_non_finite_gradient(step)
        return norm.item()

    def _grad_norm_after_step(self, step: int, zero0_norm: float | None) -> float:
        """The global pre-clip gradient norm of the step just taken; ZeRO 1-3 skip a non-finite one."""
        norm = self.ds_engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else zero0_norm
        skipped = getattr(self.ds_engine, "skipped_steps", 0)
        newly_skipped, self._skipped_steps = skipped > self._skipped_steps, skipped
        if norm is None:
            raise RuntimeError(f"DeepSpeed reported no gradient norm under ZeRO-{self.zero_stage}")
        if newly_skipped or not torch.isfinite(torch.tensor(norm)):
            self._raise_non_finite_gradient(step)
        return norm

    def _raise_non_finite_gradient(self, step: int) -> None:
        raise NonFiniteLossError(
            f"non-finite {self.role} gradient at {self.stage} step {step} (rank {self.rank}) although the "
            "loss was finite; the update was not applied. Usual causes: a learning rate too high "
            f"({self.role}.optim.lr), extreme importance ratios, or bf16 overflow.")

    # ------------------------------------------------------------------ weights
    def get_weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the full weights (tests)."""
        params = dict(self.ds_engine.module.named_parameters())
        with gathered(list(params.values()), self.zero_stage):
            return {n: p.detach().cpu().clone() for n, p in params.items()}

    def save_pretrained(self, path: str) -> bool:
        """Write the model as an HF dir with the tokenizer (rank 0 writes; ZeRO-3 gathers first);
        with LoRA the adapter alone, in PEFT format (adapter_config.json + weights)."""
        from transformers import AutoTokenizer

        with gathered(list(self.ds_engine.module.parameters()), self.zero_stage):
            if self.rank == 0:
                self.ds_engine.module.save_pretrained(path)
                AutoTokenizer.from_pretrained(self.model_path).save_pretrained(path)
        return self.rank == 0

    def save_state(self, path: str) -> dict[str, Any]:
        """DeepSpeed's own checkpoint of this rank: model, optimizer and LR-scheduler state
        (every rank calls it; each writes its own shard files under `path`)."""
        start = time.perf_counter()
        # LoRA: the adapters and their moments only; the frozen base is the model dir itself
        self.ds_engine.save_checkpoint(path, tag="state", client_state={"optimizer_steps": self.optimizer_steps},
                                       exclude_frozen_parameters=self.lora is not None)
        return {"rank": self.rank, "save_s": time.perf_counter() - start}

    def load_state(self, path: str) -> dict[str, Any]:
        """Restore `save_state`: weights, optimizer moments, LR schedule position (every rank)."""
        start = time.perf_counter()
        loaded, client = self.ds_engine.load_checkpoint(path, tag="state", load_optimizer_states=True,
                                                        load_lr_scheduler_states=True,
                                                        load_module_strict=self.lora is None)
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed state under {path} (tag 'state') for {self.role} rank {self.rank}")
        self.optimizer_steps = int(client.get("optimizer_steps", 0))
        self._skipped_steps = getattr(self.ds_engine, "skipped_steps", 0)
        return {"rank": self.rank, "load_s": time.perf_counter() - start}

    def read_dir(self, path: str) -> dict[str, bytes]:
        """The files of a directory this rank wrote (`save_pretrained`), for the driver's node."""
        return read_dir(path)

    def forward_batch(self, batch: Batch, micro_batch_size: int, forward) -> torch.Tensor:
        """`batched_forward` with this rank's model in eval mode (no update happens here)."""
        from rlhf_dist.models.hf import batched_forward

        self.ds_engine.eval()
        return batched_forward(batch, micro_batch_size, forward)


def _accumulate(sums: dict, counts: dict, extremes: dict, metrics: dict, stats: dict, tokens: int) -> None:
    """Add one micro-batch's additive metrics and stats to the running totals. Stats are masked
    means over the micro-batch's response tokens: weighted by `tokens`, their mean is that over
    every token of the pass, whatever the micro-batch sizes."""
    for key, value in metrics.items():
        sums[key] += float(value)
    for key, value in stats.items():
        value = float(value)
        if key.endswith(("_max", "_min")):
            pick = max if key.endswith("_max") else min
            extremes[key] = pick(extremes.get(key, value), value)
        else:
            sums[key] += value * tokens
            counts[key] += tokens


@contextmanager
def zero3_loading(ds_config: dict):
    """While open, transformers' `from_pretrained` builds the model under `deepspeed.zero.Init`
    and loads the checkpoint into partitioned parameters: no rank ever holds the whole model.

    This is what `transformers.integrations.HfDeepSpeedConfig` does, which transformers reads
    only through `is_zero3()` and `.config`; that class needs `accelerate`, this does not.
    """
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    class _Zero3Config:
        config = ds_config

        def is_zero3(self) -> bool:
            return True

    holder = _Zero3Config()  # transformers keeps a weak reference: hold it while loading
    set_hf_deepspeed_config(holder)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
