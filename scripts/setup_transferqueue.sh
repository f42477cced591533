#!/usr/bin/env bash
# Sets up .venv-tq: a separate venv with TransferQueue 0.1.11 (and Ray), used only by
# benchmarks/bench_transfer.py --tq-python .venv-tq/bin/python for the comparison run.
# Idempotent: a stamp skips work already done. Never touches .venv.
#   torch is pinned to 2.13.0 so pip takes the local CPU wheel (a plain `torch` would pull the
#   multi-GB CUDA build); tensordict 0.15.x accepts it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
TQ_VERSION=0.1.11
TORCH_VERSION=2.13.0
stamp=.venv-tq/.tq-setup
want=$(cat scripts/setup_transferqueue.sh | sha256sum | cut -c1-16)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi
[[ -x .venv-tq/bin/python ]] || "$PY" -m venv .venv-tq
pip=(.venv-tq/bin/python -m pip)
"${pip[@]}" install -q --upgrade pip
"${pip[@]}" install -q "torch==$TORCH_VERSION"
# torch repeated so the resolver can never swap it for another build.
"${pip[@]}" install -q "transferqueue==$TQ_VERSION" "torch==$TORCH_VERSION"
.venv-tq/bin/python - <<'PY'
import ray, tensordict, torch, transfer_queue  # noqa: F401  (fail here, not mid-benchmark)
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(
    f"transferqueue setup: transfer_queue {transfer_queue.__version__}, torch {torch.__version__}, "
    f"tensordict {tensordict.__version__}, ray {ray.__version__}"
)
PY
echo "$want" > "$stamp"
