#!/usr/bin/env bash
# Every vs-TRL and async figure in docs/performance.md, one run after another (about 45 minutes on 2 cores):
#   bash benchmarks/vs_trl_all.sh
# On a 2-core machine our side runs one learner rank with ZeRO-0 (a second rank halves each rank's
# threads and adds a gradient all-reduce per step; ZeRO partitioning has nothing to split over one
# rank): docs/performance.md. Results: benchmarks/results/vs_trl_* and async_vs_sync.*
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
ours=(learner.world_size=1 learner.zero_stage=0)
split=(cluster.engine_cores=0 cluster.learner_cores=1)
# learning per sample, synchronous vs overlapped, on the default job (one optimizer step per batch)
$py benchmarks/learning_curves.py --variants sync,async --steps 80 --out benchmarks/results/async_vs_sync.json \
  -- learner.mini_batch_size=768
$py benchmarks/vs_trl.py --model 100m --lengths fixed --steps 4 -- "${ours[@]}"
$py benchmarks/vs_trl.py --model 100m --lengths natural --steps 4 --sides ours,trl -- "${ours[@]}" \
  learner.max_tokens_per_micro_batch=2048
$py benchmarks/vs_trl.py --model 100m --lengths fixed --steps 4 --dtype bfloat16 -- "${ours[@]}"
$py benchmarks/vs_trl.py --model 100m --lengths fixed --steps 4 --sides ours --tag async -- "${ours[@]}" trainer.async_rollout=true
$py benchmarks/vs_trl.py --model 100m --lengths fixed --steps 4 --sides ours --tag split_sync -- "${ours[@]}" "${split[@]}"
$py benchmarks/vs_trl.py --model 100m --lengths fixed --steps 4 --sides ours --tag split_async -- "${ours[@]}" "${split[@]}" trainer.async_rollout=true
$py benchmarks/vs_trl.py --model tiny --lengths fixed --steps 10 -- "${ours[@]}"
