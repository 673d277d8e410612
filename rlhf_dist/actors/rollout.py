"""Rollout actor: one long-lived vLLM engine that samples responses and takes new weights.

The engine core runs inside this actor's process (VLLM_ENABLE_V1_MULTIPROCESSING=0). With
tensor_parallel_size 1 its single worker is in-process too, so `collective_rpc` passes a
generator and tensors by reference; with more, vLLM's multiprocessing executor starts one worker
process per shard, reached only through the methods of rlhf_dist.weights.vllm_worker.

New weights arrive by the transport named in rollout.sync_transport (rlhf_dist.weights.transports),
whose engine side `weights_call` runs here; every transport streams them into vLLM's own in-place
loader (or, set up by `lora_setup` for model.lora.sync=adapter, install the policy's LoRA adapter,
which every later generate then samples through: rlhf_dist.weights.adapter).
`weight_layout` / `weight_checksums` / `packed_modules` serve the verification.
With `sleep_level` > 0 (GPU) the engine sleeps while the learner trains (`sleep` / `wake_up`).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from rlhf_dist.runtime.cpu import use_cores
from rlhf_dist.runtime.files import ModelSpec, local_model_path
from rlhf_dist.config import RolloutConfig
from rlhf_dist.data.messages import Sample
from rlhf_dist.weights.transports import call_verb, get_transport
from rlhf_dist.weights.adapter import ADAPTER_ID, ADAPTER_NAME, vllm_max_rank
from rlhf_dist.weights.engine_weights import keep_cpu_linear_weights


def whole_prompts_per_step(device: str, max_model_len: int, tensor_parallel_size: int) -> dict[str, Any]:
    """On CPU, no prompt is split across engine steps (chunked prefill off).

    vLLM schedules at most 4096 tokens per step on CPU; a prompt that does not fit is split, its
    sampled token discarded, and its seeded generator rewound by `set_offset`, which a CPU
    torch.Generator refuses ("CPU Generator does not use offset"): any batch of seeded samples over
    4096 prompt tokens failed (long prompts, the second turn of a multi-turn batch). Without
    chunking the scheduler stops at the first prompt that does not fit and takes it next step.
    CUDA generators have offsets: GPUs keep vLLM's default.
    """
    if device != "cpu":
        return {}
    # vLLM's own CPU default (4096 x the tensor-parallel size, vllm/engine/arg_utils.py), raised to
    # one whole prompt when max_model_len is longer (vLLM requires that without chunking)
    return {"enable_chunked_prefill": False,
            "max_num_batched_tokens": max(max_model_len, 4096 * tensor_parallel_size)}


class RolloutActor:
    def __init__(
        self,
        model_path: ModelSpec,
        dtype: str = "float32",
        seed: int = 0,
        max_model_len: int = 512,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.1,
        kv_cache_gb: int | None = 1,
        enforce_eager: bool = True,
        device: str = "cpu",
        cpu_threads_bind: str = "auto",
        cpu_cores: list[int] | None = None,
        threads_share: int = 1,
        sync_transport: str = RolloutConfig.sync_transport,
        sleep_level: int = 0,
        ignore_eos: bool = False,
        lora_rank: int = 0,
    ) -> None:
        model_path = local_model_path(model_path)  # a copy on this node if shipped (runtime.files)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if device == "cpu":
            if kv_cache_gb is not None:
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gb)
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_threads_bind
            use_cores(cpu_cores, threads_share)  # Ray's OMP_NUM_THREADS=1 would decode on one thread
            keep_cpu_linear_weights()
        self.device, self.tensor_parallel_size, self.ignore_eos = device, tensor_parallel_size, ignore_eos
        from vllm import LLM

        # adapter sync (lora_rank > 0): one adapter slot; every generate asks for it after `lora_setup`
        self.lora_request = None
        lora_options = dict(enable_lora=True, max_lora_rank=vllm_max_rank(lora_rank), max_loras=1,
                            max_cpu_loras=1) if lora_rank else {}

        start = time.perf_counter()
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            logprobs_mode="processed_logprobs",  # logprobs of the temperature-scaled distribution
            enable_prefix_caching=False,
            worker_extension_cls="rlhf_dist.weights.vllm_worker.WorkerExtension",
            # one process per shard; vLLM's own choice inside a Ray actor is its Ray executor,
            # which the CPU platform refuses
            distributed_executor_backend="mp" if tensor_parallel_size > 1 else None,
            enable_sleep_mode=sleep_level > 0,
            **whole_prompts_per_step(device, max_model_len, tensor_parallel_size),
            **get_transport(sync_transport).engine_options,  # e.g. vLLM's CUDA-IPC receiver
            **lora_options,
        )
        self.init_s = time.perf_counter() - start
        self.generate_s = 0.0

    def ready(self) -> dict[str, Any]:
        return {"init_s": self.init_s, "pid": os.getpid()}

    def last_generate_s(self) -> float:
        """Seconds the last `generate` spent in vLLM. Called right after it, the call queues behind
        it (an actor runs one call at a time): how long a generation in the background took."""
        return self.generate_s

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int | list[int],
        seeds: list[list[int]] | None = None,
    ) -> list[Sample]:
        """Sample `n` responses per prompt. Returns one Sample each, prompt-major order.

        `seeds[i][j]` seeds sample j of prompt i (rlhf_dist.seeding): each sample is sent as its own
        n=1 request, so every sample has its own random stream (vLLM would seed the children of
        one n=G request with seed + j, shared with the neighbouring prompts' seeds), and a sample
        is a function of (weights, prompt, seed) alone: a resumed run draws what the
        uninterrupted one did. Without seeds, one n-sample request per prompt from the engine's
        own generator. `max_new_tokens` may be one per prompt (multi-turn episodes: what is left of
        each episode's token budget).
        """
        from vllm import SamplingParams, TokensPrompt

        greedy = temperature == 0.0

        limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompt_token_ids)

        def sampling(count, seed, max_tokens):
            return SamplingParams(
                n=count, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                # fixed lengths: EOS is masked until max_new_tokens (as HF's min_new_tokens), not
                # sampled mid-response and kept in the loss
                ignore_eos=self.ignore_eos, min_tokens=max_tokens if self.ignore_eos else 0,
                logprobs=None if greedy else 0)  # 0 = only the sampled token's logprob

        if seeds is not None:
            if len(seeds) != len(prompt_token_ids) or any(len(row) != n for row in seeds):
                raise ValueError(f"generate: need {len(prompt_token_ids)} x {n} seeds, got "
                                 f"{[len(row) for row in seeds]}")
            prompt_token_ids = [ids for ids in prompt_token_ids for _ in range(n)]
            params = [sampling(1, seed, limit) for row, limit in zip(seeds, limits) for seed in row]
        else:
            params = [sampling(n, None, limit) for limit in limits]
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_ids]
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora_request)
        self.generate_s = time.perf_counter() - start
        samples = []
        for request in outputs:
            for completion in request.outputs:
                token_ids = list(completion.token_ids)
                logprobs = (
                    [step[tok].logprob for step, tok in zip(completion.logprobs, token_ids)]
                    if completion.logprobs is not None else [0.0] * len(token_ids)
                )
                samples.append(Sample(token_ids, logprobs, completion.text, completion.finish_reason))
        return samples

    # ------------------------------------------------------------------ weights
    def weights_call(self, transport: str, verb: str, *args: Any) -> Any:
        """The engine side of a weight transport (rlhf_dist.weights.transports): its `verb` in this
        actor, e.g. ("collective", "receive", plan, dtype, timeout_s, verify)."""
        return call_verb(transport, "engine", verb, self, *args)

    def lora_setup(self, config: dict[str, Any]) -> None:
        """Adapter sync (model.lora.sync=adapter): every later sync installs the policy's LoRA
        adapter (PEFT `config`) in the workers, and every generate samples through it. The trainer
        syncs right after set-up (start-up, an engine restart), so no generate comes before an
        adapter is installed; if one did, vLLM would fail to find the adapter rather than sample
        the base model unnoticed."""
        from vllm.lora.request import LoRARequest

        self.llm.collective_rpc("rlhf_lora_setup", args=(config,))
        self.lora_request = LoRARequest(ADAPTER_NAME, ADAPTER_ID, "rlhf_dist:in-memory")

    # vLLM's weight-transfer protocol: the ipc transport's learner side drives these through
    # vLLM's RayVLLMWeightSyncClient, which calls them by name on this actor's handle.
    def init_weight_transfer_engine(self, request) -> None:
        self.llm.init_weight_transfer_engine(request)

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, request) -> None:
        self.llm.update_weights(request)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version)

    # ------------------------------------------------------------------ colocation (GPU)
    def sleep(self, level: int) -> dict[str, Any]:
        """Free GPU memory while the learner trains: level 1 offloads weights, 2 drops them."""
        start = time.perf_counter()
        self.llm.sleep(level=level)
        return {"sleep_s": time.perf_counter() - start}

    def wake_up(self, tags: list[str] | None = None) -> dict[str, Any]:
        """Re-allocate `tags` ("weights" before a sync, "kv_cache" before generating; None = all)."""
        start = time.perf_counter()
        self.llm.wake_up(tags=tags)
        return {"wake_s": time.perf_counter() - start}

    # ------------------------------------------------------------------ verification
    def weight_layout(self) -> list[dict[str, list]]:
        """Per tensor-parallel worker: which rows of the learner's tensors it holds."""
        return self.llm.collective_rpc("rlhf_weight_layout")

    def weight_checksums(self) -> list[dict[str, list[int]]]:
        """Per tensor-parallel worker: checksums of the pieces `weight_layout` names."""
        return self.llm.collective_rpc("rlhf_weight_checksums")

    def packed_modules(self) -> dict[str, list[str]]:
        """The engine model's fusion map (e.g. qkv_proj <- q/k/v), for the learner's checksums."""
        return self.llm.collective_rpc("rlhf_packed_modules")[0]

    def get_weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of every parameter the engine holds (tests and debugging; one worker)."""
        return self._cpu_copy(lambda worker: dict(worker.model_runner.model.named_parameters()))

    def get_adapter(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the LoRA adapter as the engine's kernels read it (adapter sync; tests)."""
        from rlhf_dist.weights.adapter import held_adapter

        return self._cpu_copy(held_adapter)

    def _cpu_copy(self, named_tensors) -> dict[str, torch.Tensor]:
        """CPU copies of the tensors `named_tensors(worker)` names, from the first worker."""
        def read(worker):
            return {n: t.detach().cpu().clone() for n, t in named_tensors(worker).items()}

        return self.llm.collective_rpc(read)[0]
