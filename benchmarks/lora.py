"""Full fine-tuning against LoRA on one learner rank and one vLLM engine: memory, step, sync.

    python benchmarks/lora.py                          # the ~100M Qwen2: full, LoRA rank 8 and 32, each
                                                       # LoRA rank with merged and with adapter sync
    python benchmarks/lora.py --size 10m --modes full,8,8a

Modes: `full`; `<rank>` = LoRA with merged sync; `<rank>a` = LoRA with adapter sync
(model.lora.sync=adapter: only A and B move, the engine serves them through vLLM's LoRA kernels).

For each mode a DeepSpeed learner rank (ZeRO-0, fp32, AdamW) and one engine start on a local Ray
with the same code the trainer runs; the learner takes `--steps` policy steps on a random batch
(`--seqs` sequences of 8 prompt + `--response` response tokens), timed, with its resident memory
sampled every 20 ms (peak RSS of the rank process, model + gradients + optimizer + activations);
then `--repeats` weight syncs (collective transport) are timed, and a verified one checks them;
then the engine generates `--gen-seqs` x `--response` tokens, `--repeats` times (median tokens/s:
what serving through the adapter costs). The reference a LoRA run does not start is measured once: a
ReferenceActor's RSS after loading the same model. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from weight_sync import SIZES, _start_rss_sampler, _stop_rss_sampler  # noqa: E402


def _optimizer_state_mb(actor_self) -> float:
    import torch

    optimizer = actor_self.ds_engine.optimizer
    optimizer = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's wrapper, if any
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if torch.is_tensor(t)) / 2**20


def _rss_mb(actor_self) -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _batch(seqs: int, response: int):
    import torch

    from rlhf_dist.data.batch import collate_sequences

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 98, (8,), generator=gen).tolist() for _ in range(seqs)]
    responses = [torch.randint(3, 98, (response,), generator=gen).tolist() for _ in range(seqs)]
    batch = collate_sequences(prompts, responses, [[-4.6] * response for _ in range(seqs)], pad_id=0)
    batch["advantages"] = torch.randn(seqs, generator=gen)[:, None] * batch["response_mask"]
    return batch


def bench_mode(mode: str, model_dir: Path, args) -> dict:
    import ray

    from rlhf_dist.actors.learner import LearnerActor
    from rlhf_dist.actors.rollout import RolloutActor
    from rlhf_dist.algo.objective import PolicyLossConfig
    from rlhf_dist.config import LearnerConfig, RolloutConfig
    from rlhf_dist.models.lora import DEFAULT_TARGETS, LoraSpec
    from rlhf_dist.runtime.ds_group import DSGroupSpec, start_ds_group
    from rlhf_dist.runtime.group import ActorGroup
    from rlhf_dist.weights.sync import WeightSync

    adapter = mode.endswith("a")
    rank = 0 if mode == "full" else int(mode.removesuffix("a"))
    lora = LoraSpec(rank, 2.0 * rank, 0.0, DEFAULT_TARGETS["qwen2"], sync="adapter" if adapter else "merged") if rank else None
    engines = ActorGroup("rollout", RolloutActor, 1, 0.3, 0, 60, [dict(
        model_path=str(model_dir), max_model_len=64, lora_rank=rank if adapter else 0)])
    engines.wait(engines.call("ready"), "engine start-up", 900)
    learners, refs = start_ds_group("learner", LearnerActor, str(model_dir), DSGroupSpec(
        1, 0, args.seqs, mini_batch_size=args.seqs, optim=asdict(LearnerConfig().optim), num_cpus=0.4,
        num_gpus=0, total_optimizer_steps=args.steps, lora=lora, init_timeout_s=900))
    try:
        info = learners.wait(refs, "learner start-up", 900)[0]
        learner = learners.actors[0]
        rest_mb = ray.get(learner.__ray_call__.remote(_rss_mb))
        ray.get(learner.__ray_call__.remote(_start_rss_sampler))
        batch, loss = _batch(args.seqs, args.response), PolicyLossConfig(temperature=1.0)
        step_s = []
        for step in range(1, args.steps + 1):
            start = time.perf_counter()
            learners.run("train_step", [(batch, float(batch["response_mask"].sum()), float(args.seqs))], loss,
                         step, timeout_s=900)
            step_s.append(time.perf_counter() - start)
        rss = ray.get(learner.__ray_call__.remote(_stop_rss_sampler))
        optim_mb = ray.get(learner.__ray_call__.remote(_optimizer_state_mb))
        sync = WeightSync(learners, engines, RolloutConfig(sync_transport="collective", sync_timeout_s=600), "cpu", 0)
        sync.prepare()
        sync.sync(verify=False)  # warm-up
        times, metrics = [], {}
        for _ in range(args.repeats):
            start = time.perf_counter()
            metrics = sync.sync(verify=False)
            times.append(time.perf_counter() - start)
        verified = sync.sync(verify=True)
        prompts = [list(range(3, 11))] * args.gen_seqs
        engines.run("generate", prompts, 1, 1.0, 1.0, args.response, timeout_s=900)  # warm-up
        gen_tok_s = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            samples = engines.run("generate", prompts, 1, 1.0, 1.0, args.response, timeout_s=900)[0]
            gen_tok_s.append(sum(len(s.token_ids) for s in samples) / (time.perf_counter() - start))
    finally:
        engines.kill()
        learners.kill()
    adapter_mb = info["trainable_params"] * 4 / 2**20 if lora else None
    name = "full" if lora is None else f"lora r{rank} {'adapter' if adapter else 'merged'}"
    return {"mode": name, "gen_tok_s": statistics.median(gen_tok_s), "gen_tok_s_all": gen_tok_s, "params_m": info["num_params"] / 1e6,
            "trainable_m": info["trainable_params"] / 1e6, "learner_rest_mb": rest_mb,
            "learner_peak_mb": rss["base_mb"] + rss["peak_above_base_mb"], "optimizer_state_mb": optim_mb,
            "step_s": statistics.median(step_s[1:] or step_s), "step_s_all": step_s,
            "sync_mb": metrics["sync/mb"], "sync_s": statistics.median(times), "sync_s_all": times,
            "adapter_mb": adapter_mb, "verified_tensors": int(verified["sync/verified_tensors"])}


def reference_rss_mb(model_dir: Path) -> float:
    """What a LoRA run saves by not starting the reference actor: its RSS with the model loaded."""
    import ray

    from rlhf_dist.actors.reference import ReferenceActor
    from rlhf_dist.runtime.group import ActorGroup

    group = ActorGroup("reference", ReferenceActor, 1, 0.1, 0, 60, [dict(model_path=str(model_dir))])
    try:
        group.wait(group.call("ready"), "reference start-up", 600)
        return ray.get(group.actors[0].__ray_call__.remote(_rss_mb))
    finally:
        group.kill()


HEADER = (f"{'mode':>18}{'trainable':>11}{'learner MB':>11}{'peak MB':>9}{'optim MB':>9}{'step s':>8}"
          f"{'sync MB':>9}{'sync s':>8}{'adapter MB':>11}{'gen tok/s':>10}")


def _row(r: dict) -> str:
    adapter = f"{r['adapter_mb']:>11.2f}" if r["adapter_mb"] is not None else f"{'-':>11}"
    return (f"{r['mode']:>18}{r['trainable_m']:>10.2f}M{r['learner_rest_mb']:>11.0f}{r['learner_peak_mb']:>9.0f}"
            f"{r['optimizer_state_mb']:>9.1f}{r['step_s']:>8.2f}{r['sync_mb']:>9.2f}{r['sync_s']:>8.3f}{adapter}"
            f"{r['gen_tok_s']:>10.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="100m", choices=sorted(SIZES))
    parser.add_argument("--modes", default="full,8,8a,32,32a",
                        help="comma list: full, LoRA ranks (merged sync), ranks + 'a' (adapter sync)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seqs", type=int, default=16)
    parser.add_argument("--response", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gen-seqs", type=int, default=64, help="sequences per timed generate")
    parser.add_argument("--cache", default="~/.cache/rlhf_dist/models")
    parser.add_argument("--out", default="bench_results/lora.json")
    args = parser.parse_args()

    import ray

    from rlhf_dist.models.tiny import ensure_tiny_model

    hidden, layers, heads = SIZES[args.size]
    model_dir = ensure_tiny_model(Path(os.path.expanduser(args.cache)) / f"bench-qwen2-h{hidden}-l{layers}",
                                  hidden_size=hidden, num_layers=layers, num_heads=heads)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    print(HEADER, flush=True)
    rows = []
    for mode in args.modes.split(","):
        rows.append(bench_mode(mode, model_dir, args))
        print(_row(rows[-1]), flush=True)
    reference_mb = reference_rss_mb(model_dir)
    ray.shutdown()
    print(f"\nreference actor RSS (not started with LoRA, model.lora.reference_from_base): {reference_mb:.0f} MB")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "reference_actor_rss_mb": reference_mb, "args": vars(args),
                               "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                                           "platform": platform.platform()}}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
