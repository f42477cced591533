#!/usr/bin/env bash
# Sets up .venv (see scripts/setup.sh) and runs lint, type checks and the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
echo "== ruff"; ruff check asyncflow tests benchmarks
ruff format --check asyncflow tests benchmarks
echo "== mypy"; mypy asyncflow
# docker-compose (Debian's 1.29) validates docker-compose.yml without a Docker engine.
command -v docker-compose >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; }
echo "== pytest"; python -m pytest -q -ra "$@"
