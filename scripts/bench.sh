#!/usr/bin/env bash
# Every benchmark, one ratio table: sets up .venv and runs benchmarks/run_all.py.
# Arguments go to it, e.g. scripts/bench.sh --quick
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-env.sh test,dev,demo,integrations,docs
exec .venv/bin/python -m benchmarks.run_all "$@"
