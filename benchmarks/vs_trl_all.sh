#!/usr/bin/env bash
# Every vs-TRL figure in the README, one run after another (about 50 minutes on 2 cores):
#   bash benchmarks/vs_trl_all.sh
# On a 2-core machine our side runs one learner rank (a second one halves each rank's threads and
# adds a gradient all-reduce per step; README "Performance"). Results: benchmarks/results/vs_trl_*.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
ours=(learner.world_size=1)
split=(cluster.engine_cores=0 cluster.learner_cores=1)
$py benchmarks/vs_trl.py --model 100m --lengths fixed --steps 4 -- "${ours[@]}"
$py benchmarks/vs_trl.py --model 100m --lengths natural --steps 4 --sides ours,trl -- "${ours[@]}"
$py benchmarks/vs_trl.py --model 100m --lengths fixed --steps 4 --sides ours --tag async -- "${ours[@]}" trainer.async_rollout=true
$py benchmarks/vs_trl.py --model 100m --lengths fixed --steps 4 --sides ours --tag split_sync -- "${ours[@]}" "${split[@]}"
$py benchmarks/vs_trl.py --model 100m --lengths fixed --steps 4 --sides ours --tag split_async -- "${ours[@]}" "${split[@]}" trainer.async_rollout=true
$py benchmarks/vs_trl.py --model 100m --lengths fixed --steps 4 --dtype bfloat16 -- "${ours[@]}"
$py benchmarks/vs_trl.py --model tiny --lengths fixed --steps 10 -- "${ours[@]}"
