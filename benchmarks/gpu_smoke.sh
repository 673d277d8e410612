#!/usr/bin/env bash
# The first run on a GPU machine, in under 10 minutes: what works there, said check by check.
#   bash benchmarks/gpu_smoke.sh            (after `bash launch/install.sh gpu`)
# 1. the GPU tests (tests/gpu): the learner's CUDA path against plain torch (ZeRO 0/2/3, bf16),
#    NCCL between processes (2 GPUs), the NCCL deadline, CUDA IPC between processes, checksums
# 2. with vLLM and Ray installed: cluster=gpu1 (engine and learner on one GPU, CUDA IPC weight
#    hand-off, sleep mode) for 3 steps, every sync verified
# 3. with 2 or more GPUs: a collective (NCCL) sync into a separate engine, 3 steps, verified
# Each check prints PASS or FAIL with its log; the script exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
[ -x "$py" ] || py=python3
out=$(mktemp -d)
failed=0
check() {  # name, command...
  local name=$1; shift
  if "$@" >"$out/$name.log" 2>&1; then echo "PASS  $name"; else echo "FAIL  $name  (log: $out/$name.log)"; failed=1; fi
}
gpus=$("$py" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$gpus" -lt 1 ]; then echo "no CUDA device visible to torch: nothing to check"; exit 1; fi
echo "$gpus GPU(s); logs in $out"
check gpu-tests "$py" -m pytest -q -m gpu tests/gpu -p no:cacheprovider
if "$py" -c "import vllm, ray" 2>/dev/null; then
  check gpu1-ipc-sleep "$py" -m rlhf_dist.main cluster=gpu1 experiment=smoke trainer.total_steps=3 \
    rollout.verify_sync=true logger.wandb.mode=disabled "hydra.run.dir=$out/gpu1"
  if [ "$gpus" -ge 2 ]; then
    check collective-nccl "$py" -m rlhf_dist.main cluster=gpu8 cluster.address=null rollout.num_engines=1 \
      experiment=smoke trainer.total_steps=3 rollout.sync_transport=collective rollout.verify_sync=true learner.world_size=1 \
      algo.kl_coef=0 logger.wandb.mode=disabled "hydra.run.dir=$out/nccl"
  else
    echo "SKIP  collective-nccl (needs 2 GPUs: NCCL refuses two members of a group on one device)"
  fi
else
  echo "SKIP  gpu1-ipc-sleep, collective-nccl (vLLM or Ray not installed: bash launch/install.sh gpu)"
fi
exit $failed
