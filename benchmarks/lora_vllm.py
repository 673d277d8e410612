"""What vLLM's own LoRA path does on this machine: does the engine serve a PEFT adapter, can an
adapter be replaced in memory (what an adapter-only weight sync would do), and what does serving
through the LoRA kernels cost in generation speed against a plain (merged) model.

    python benchmarks/lora_vllm.py                    # the default tiny Qwen2 (0.44M), rank 8
    python benchmarks/lora_vllm.py --size 100m --rank 8

One engine (vLLM in this process, `enable_lora=True`, fp32), no Ray. Steps: a rank-r adapter on
every projection with random B saved in PEFT format; sample with a `LoRARequest` and score the
same tokens with the peft model in torch (the logprob gap); replace the adapter's tensors in
memory through `collective_rpc` (`LoRAModel.from_lora_tensors` + the worker's adapter manager,
no file) and measure the gap again against the new tensors; then tokens/s of the same sampling
without a LoRA request and with one. Prints the numbers and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from weight_sync import SIZES  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _gap(outputs, model) -> float:
    """Largest |engine logprob - torch logprob| over every sampled token."""
    import torch

    worst = 0.0
    for out in outputs:
        for completion in out.outputs:
            ids = torch.tensor([list(out.prompt_token_ids) + list(completion.token_ids)])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)  # (L, V)
            start = len(out.prompt_token_ids) - 1
            for t, token in enumerate(completion.token_ids):
                worst = max(worst, abs(logprobs[start + t, token].item() - completion.logprobs[t][token].logprob))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=["tiny", *sorted(SIZES)])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--cache", default="~/.cache/rlhf_dist/models")
    parser.add_argument("--out", default="bench_results/lora_vllm.json")
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker in this process: collective_rpc(fn)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from rlhf_dist.models.tiny import ensure_tiny_model

    cache = Path(os.path.expanduser(args.cache))
    hidden, layers, heads = SIZES.get(args.size, (128, 2, 2))
    model_dir = str(ensure_tiny_model(cache / f"bench-qwen2-h{hidden}-l{layers}", hidden_size=hidden,
                                      num_layers=layers, num_heads=heads))
    adapter_dir = str(cache / f"bench-lora-h{hidden}-l{layers}-r{args.rank}")
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # B = 0 would make the adapter a no-op
    peft_model.save_pretrained(adapter_dir)
    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, enable_lora=True, max_lora_rank=args.rank,
              max_loras=1, gpu_memory_utilization=0.1, max_model_len=128, seed=0)
    prompts = ["rev abcd=", "rev hello=", "rev xyz=", "rev lora="]
    sampling = SamplingParams(n=4, temperature=1.0, max_tokens=8, logprobs=0, seed=1)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir).eval()
    result = {"size": args.size, "rank": args.rank, "model_dir": model_dir}
    result["gap_adapter_from_dir"] = _gap(llm.generate(prompts, sampling, lora_request=LoRARequest("a", 1, adapter_dir)), model)
    result["gap_no_request_vs_base"] = _gap(llm.generate(prompts, sampling),
                                            AutoModelForCausalLM.from_pretrained(model_dir).eval())

    with torch.no_grad():  # new adapter tensors, as after an update
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.05)
    tensors = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())

    def install(worker, lora_id=1):  # replace adapter 1 in memory: no file, the same id
        from vllm.lora.peft_helper import PEFTHelper

        manager = worker.model_runner.lora_manager
        helper = PEFTHelper.from_dict(dict(config, vllm_max_position_embeddings=manager.max_position_embeddings))
        lora = manager._lora_model_cls.from_lora_tensors(lora_id, tensors, helper, device="cpu",
                                                          dtype=manager.lora_config.lora_dtype,
                                                          model_vocab_size=manager.vocab_size)
        manager._adapter_manager.remove_adapter(lora_id)
        return manager._adapter_manager.add_adapter(lora)

    start = time.perf_counter()
    assert llm.collective_rpc(install) == [True]
    result["install_in_memory_s"] = time.perf_counter() - start
    result["adapter_mb"] = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
    replaced = llm.generate(prompts, sampling, lora_request=LoRARequest("a", 1, adapter_dir))
    result["gap_after_in_memory_replace"] = _gap(replaced, model)
    # against the adapter before the replace: large, so the engine did take the new tensors
    result["gap_after_replace_vs_old_adapter"] = _gap(
        replaced, PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir).eval())

    speed = SamplingParams(n=16, temperature=1.0, max_tokens=args.tokens, seed=2, ignore_eos=True)
    for name, request in (("plain", None), ("lora", LoRARequest("a", 1, adapter_dir))):
        llm.generate(prompts, speed, lora_request=request)  # warm-up
        start = time.perf_counter()
        outputs = llm.generate(prompts, speed, lora_request=request)
        tokens = sum(len(c.token_ids) for out in outputs for c in out.outputs)
        result[f"{name}_tok_per_s"] = tokens / (time.perf_counter() - start)
    for key, value in result.items():
        print(f"{key:>30}: {value:.3g}" if isinstance(value, float) else f"{key:>30}: {value}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
