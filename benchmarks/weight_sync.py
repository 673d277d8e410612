"""Weight-sync time and bandwidth against model size and bucket size, for each transport.

    python benchmarks/weight_sync.py                                  # 1M .. ~500M, both transports
    python benchmarks/weight_sync.py --sizes 1m,100m --buckets 16,64 --engines 2

For each model size a random Qwen2 is built offline (rlhf_dist.models.tiny, cached), one DeepSpeed
learner rank and `--engines` vLLM engines start on a local Ray, and the learner's weights are
synced into every engine with the same code the trainer runs (rlhf_dist.weights.sync):
a warm-up sync, then `--repeats` timed syncs per (transport, bucket size) without verification,
then one verified sync (its extra time is reported as verify_s). "repack s" is the part of the
engine's load spent re-packing vLLM's CPU linear weights (oneDNN) after the reload. While syncing, each actor's
resident memory is sampled every 20 ms: the table shows the peak above the actor's resting RSS.
Prints a table and writes JSON (default bench_results/weight_sync.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

# name -> (hidden, layers, heads): parameters ~ 13 * layers * hidden^2 (intermediate = 3 * hidden)
SIZES = {"1m": (128, 4, 2), "10m": (256, 12, 4), "100m": (768, 12, 12), "500m": (1536, 16, 12)}
TRANSPORTS = ("object_store", "collective")


def _start_rss_sampler(actor_self):
    import threading

    import psutil

    proc, state = psutil.Process(), {"peak": 0, "run": True}
    state["base"] = proc.memory_info().rss

    def sample():
        while state["run"]:
            state["peak"] = max(state["peak"], proc.memory_info().rss)
            time.sleep(0.02)

    actor_self._rss_sampler = state
    threading.Thread(target=sample, daemon=True).start()


def _stop_rss_sampler(actor_self) -> dict:
    state = actor_self._rss_sampler
    state["run"] = False
    time.sleep(0.05)
    return {"base_mb": state["base"] / 2**20, "peak_above_base_mb": max(0, state["peak"] - state["base"]) / 2**20}


def bench_size(name: str, args) -> list[dict]:
    import ray

    from rlhf_dist.runtime.ds_group import DSGroupSpec, start_ds_group
    from rlhf_dist.runtime.group import ActorGroup
    from rlhf_dist.actors.learner import LearnerActor
    from rlhf_dist.actors.rollout import RolloutActor
    from rlhf_dist.weights.sync import WeightSync
    from rlhf_dist.config import LearnerConfig, RolloutConfig
    from rlhf_dist.models.tiny import ensure_tiny_model

    hidden, layers, heads = SIZES[name]
    model_dir = ensure_tiny_model(Path(os.path.expanduser(args.cache)) / f"bench-qwen2-h{hidden}-l{layers}",
                                  hidden_size=hidden, num_layers=layers, num_heads=heads)
    optim = LearnerConfig().optim
    learners, refs = start_ds_group("learner", LearnerActor, str(model_dir), DSGroupSpec(
        1, 0, 1, optim=asdict(optim), num_cpus=0.4, num_gpus=0,
        mini_batch_size=1, total_optimizer_steps=1, device="cpu", backend="gloo", bf16=False,
        gradient_checkpointing=False, placement_timeout_s=60, init_timeout_s=900))
    engines = ActorGroup("rollout", RolloutActor, args.engines, 0.3, 0, 60, [
        dict(model_path=str(model_dir), max_model_len=64, seed=i,
             cpu_threads_bind="auto" if args.engines == 1 else "nobind") for i in range(args.engines)])
    info = learners.wait(refs, "learner start-up", 900)[0]
    engines.wait(engines.call("ready"), "engine start-up", 900)
    rows = []
    try:
        for bucket_mb in args.buckets:
            for transport in TRANSPORTS:
                ro = RolloutConfig(sync_transport=transport, sync_bucket_mb=bucket_mb, sync_timeout_s=600)
                sync = WeightSync(learners, engines, ro, "cpu", 0)
                sync.prepare()
                sync.sync(verify=False)  # warm-up: first allocations, first object-store puts
                actors = [learners.actors[0], *engines.actors]
                ray.get([a.__ray_call__.remote(_start_rss_sampler) for a in actors])
                times, metrics = [], {}
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    metrics = sync.sync(verify=False)
                    times.append(time.perf_counter() - start)
                rss = ray.get([a.__ray_call__.remote(_stop_rss_sampler) for a in actors])
                start = time.perf_counter()
                verified = sync.sync(verify=True)
                verified_s = time.perf_counter() - start
                sync_s = sorted(times)[len(times) // 2]  # median
                gb = metrics["sync/mb"] / 1024
                rows.append({
                    "model": name, "params_m": info["num_params"] / 1e6, "transport": transport,
                    "bucket_mb": bucket_mb, "buckets": int(metrics["sync/buckets"]), "gb": gb,
                    "sync_s": sync_s, "sync_s_all": times, "gb_per_s": gb * args.engines / sync_s,
                    "send_s": metrics["sync/send_s"], "engine_load_s": metrics["sync/engine_load_s"],
                    "engine_repack_s": metrics["sync/engine_repack_s"],
                    "verify_s": max(0.0, verified_s - sync_s),
                    "verified_tensors": int(verified["sync/verified_tensors"]),
                    "learner_rss_mb": rss[0]["base_mb"], "learner_peak_extra_mb": rss[0]["peak_above_base_mb"],
                    "engine_rss_mb": rss[1]["base_mb"],
                    "engine_peak_extra_mb": max(r["peak_above_base_mb"] for r in rss[1:]),
                })
                print(_row(rows[-1]), flush=True)
    finally:
        engines.kill()
        learners.kill()
    return rows


HEADER = (f"{'model':>6}{'params':>9}{'transport':>14}{'bucket':>8}{'n':>4}{'GB':>7}{'sync s':>9}"
          f"{'GB/s':>7}{'repack s':>9}{'verify s':>9}{'learner +MB':>12}{'engine +MB':>11}")


def _row(r: dict) -> str:
    return (f"{r['model']:>6}{r['params_m']:>8.1f}M{r['transport']:>14}{r['bucket_mb']:>7.0f}M{r['buckets']:>4}"
            f"{r['gb']:>7.3f}{r['sync_s']:>9.3f}{r['gb_per_s']:>7.2f}{r['engine_repack_s']:>9.3f}{r['verify_s']:>9.3f}"
            f"{r['learner_peak_extra_mb']:>12.0f}{r['engine_peak_extra_mb']:>11.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1m,10m,100m,500m", help=f"comma list of {sorted(SIZES)}")
    parser.add_argument("--buckets", default="16,64,256", help="bucket sizes in MB, comma list")
    parser.add_argument("--engines", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", default="~/.cache/rlhf_dist/models")
    parser.add_argument("--out", default="bench_results/weight_sync.json")
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown --sizes {unknown}; expected a comma list of {sorted(SIZES)}")
    args.buckets = [float(b) for b in args.buckets.split(",")]

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    print(HEADER, flush=True)
    rows = []
    for size in sizes:
        rows += bench_size(size, args)
    ray.shutdown()
    print("\n" + HEADER)
    for r in rows:
        print(_row(r))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "engines": args.engines, "repeats": args.repeats,
                               "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                                           "platform": platform.platform()}}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
