"""Rollout actor: one long-lived vLLM engine that samples responses and takes new weights.

The engine runs inside this actor's process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so
`collective_rpc` reaches the worker directly and weight tensors are passed by reference.
New weights arrive as a list of Ray object refs (buckets of whole decoder layers) and are streamed
into vLLM's own in-place loader, `model_runner.reload_weights`, one bucket at a time.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from rlhf_dist.errors import WeightSyncError


def _keep_cpu_linear_weights() -> None:
    """On CPU, vLLM packs linear weights into oneDNN/SGL handles and frees `layer.weight`.

    An in-place reload does not rebuild those handles (measured with vLLM 0.32: after
    `reload_weights` the engine kept computing with the old packed weights while generating),
    so we keep `layer.weight` and rebuild the handles from it after every reload
    (`_refresh_cpu_gemm_handles`). This also lets the checksum read the weights the engine uses.
    Costs one extra copy of the linear weights in RAM; GPU engines are unaffected.
    """
    from vllm.model_executor.layers import utils as layer_utils

    original = layer_utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "_rlhf_keeps_weights", False):
        return

    def dispatch_keeping_weight(layer, remove_weight):
        return original(layer, remove_weight=False)

    dispatch_keeping_weight._rlhf_keeps_weights = True
    layer_utils.dispatch_cpu_unquantized_gemm = dispatch_keeping_weight


def _refresh_cpu_gemm_handles(model) -> int:
    """Re-create every packed CPU GEMM handle from the layer's current weight."""
    from vllm.model_executor.layers import utils as layer_utils

    refreshed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and weight is not None and weight.dim() == 2 and weight.numel():
            layer_utils.dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            refreshed += 1
    return refreshed


class RolloutActor:
    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        seed: int = 0,
        max_model_len: int = 512,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.1,
        kv_cache_gb: int | None = 1,
        enforce_eager: bool = True,
        device: str = "cpu",
        cpu_threads_bind: str = "auto",
    ) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if device == "cpu":
            if kv_cache_gb is not None:
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gb)
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_threads_bind
            _keep_cpu_linear_weights()
        self.device = device
        from vllm import LLM

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
        )
        self.init_s = time.perf_counter() - start

    def ready(self) -> dict[str, Any]:
        return {"init_s": self.init_s, "pid": os.getpid()}

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
    ) -> list[dict[str, Any]]:
        """Sample `n` responses per prompt. Returns one dict per sample, prompt-major order."""
        from vllm import SamplingParams, TokensPrompt

        greedy = temperature == 0.0
        params = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_new_tokens,
            logprobs=None if greedy else 0,  # 0 = only the sampled token's logprob
        )
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        samples = []
        for request in outputs:
            for completion in request.outputs:
                token_ids = list(completion.token_ids)
                logprobs = (
                    [step[tok].logprob for step, tok in zip(completion.logprobs, token_ids)]
                    if completion.logprobs is not None else [0.0] * len(token_ids)
                )
                samples.append({
                    "token_ids": token_ids,
                    "logprobs": logprobs,
                    "text": completion.text,
                    "finish_reason": completion.finish_reason,
                })
        return samples

    def load_weights(self, bucket_refs: list, timeout_s: float,
                     verify_shapes: dict[str, list[int]] | None = None,
                     first_bucket: list | None = None) -> dict[str, Any]:
        """Stream weight buckets from the object store into the live engine, in place.

        `bucket_refs` is a list (so Ray does not resolve it on call): each bucket is fetched with
        its own deadline while vLLM consumes the previous one. With `verify_shapes` (the
        learner's tensor shapes under engine names) the result carries the engine's checksums.
        """
        import ray

        start = time.perf_counter()
        received = {"buckets": 0, "tensors": 0, "bytes": 0}

        def buckets():
            if first_bucket:
                yield first_bucket
            for index, ref in enumerate(bucket_refs):
                try:
                    yield ray.get(ref, timeout=timeout_s)
                except ray.exceptions.GetTimeoutError:
                    raise WeightSyncError(
                        f"weight bucket {index + 1}/{len(bucket_refs)} did not arrive within "
                        f"{timeout_s:.0f} s (rollout.sync_timeout_s)") from None

        def stream():
            for bucket in buckets():
                received["buckets"] += 1
                for name, tensor in bucket:
                    received["tensors"] += 1
                    received["bytes"] += tensor.numel() * tensor.element_size()
                    yield name, tensor

        def reload(worker, weights, on_cpu):
            worker.model_runner.reload_weights(weights_iterator=weights)
            if on_cpu:
                _refresh_cpu_gemm_handles(worker.model_runner.model)

        self.llm.collective_rpc(reload, args=(stream(), self.device == "cpu"))
        result = {"load_s": time.perf_counter() - start, **received}
        if verify_shapes is not None:
            start = time.perf_counter()
            result["checksums"] = self.weight_checksums(verify_shapes)
            result["verify_s"] = time.perf_counter() - start
        return result

    def load_published(self, published_ref: list, timeout_s: float, verify: bool) -> dict[str, Any]:
        """`load_weights` from a learner's `publish_weights` result, given as [ObjectRef].

        The controller hands the engine the publish call's ref before that call finishes, so the
        engine starts loading the moment the buckets exist: no controller round trip between.
        """
        import ray

        try:
            published = ray.get(published_ref[0], timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise WeightSyncError(f"the learner did not publish weights within {timeout_s:.0f} s "
                                  "(rollout.sync_timeout_s)") from None
        return self.load_weights(published["refs"], timeout_s, published["shapes"] if verify else None,
                                 first_bucket=published["first_bucket"])

    def weight_checksums(self, shapes: dict[str, list[int]]) -> dict[str, int]:
        from rlhf_dist.distributed.checksum import engine_checksums

        def compute(worker):
            return engine_checksums(dict(worker.model_runner.model.named_parameters()), shapes)

        return self.llm.collective_rpc(compute)[0]

    def packed_modules(self) -> dict[str, list[str]]:
        """The engine model's fusion map (e.g. qkv_proj <- q/k/v), for the learner's checksums."""

        def read(worker):
            return dict(getattr(worker.model_runner.model, "packed_modules_mapping", {}) or {})

        return self.llm.collective_rpc(read)[0]

    def get_weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of every parameter the engine holds (tests and debugging)."""

        def read(worker):
            return {n: p.detach().cpu().clone() for n, p in worker.model_runner.model.named_parameters()}

        return self.llm.collective_rpc(read)[0]
