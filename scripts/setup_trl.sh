#!/usr/bin/env bash
# Sets up .venv-trl: a separate venv with TRL (GRPOTrainer), used only by
# benchmarks/bench_vs_trl.py --trl-python .venv-trl/bin/python for the comparison run.
# Idempotent: a stamp skips work already done. Never touches .venv.
#   torch is pinned to 2.13.0 so pip takes the local CPU wheel (a plain `torch` would pull the
#   multi-GB CUDA build); transformers is pinned to the project's version so both sides load the
#   models with the same code.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
TRL_VERSION=1.16.0
TORCH_VERSION=2.13.0
TRANSFORMERS_VERSION=${TRANSFORMERS_VERSION:-5.19.0}
stamp=.venv-trl/.trl-setup
want=$(cat scripts/setup_trl.sh | sha256sum | cut -c1-16)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi
[[ -x .venv-trl/bin/python ]] || "$PY" -m venv .venv-trl
pip=(.venv-trl/bin/python -m pip)
"${pip[@]}" install -q --upgrade pip
"${pip[@]}" install -q "torch==$TORCH_VERSION"
# torch repeated so the resolver can never swap it for another build; psutil for peak memory.
"${pip[@]}" install -q "trl==$TRL_VERSION" "transformers==$TRANSFORMERS_VERSION" \
  "torch==$TORCH_VERSION" psutil
# Not needed for text-only GRPO; a CUDA build of these would break `import transformers`.
"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv-trl/bin/python - <<'PY'
import torch, transformers, trl  # noqa: F401  (fail here, not mid-benchmark)
from trl import GRPOConfig, GRPOTrainer  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(
    f"trl setup: trl {trl.__version__}, transformers {transformers.__version__}, "
    f"torch {torch.__version__}"
)
PY
echo "$want" > "$stamp"
