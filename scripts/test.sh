#!/usr/bin/env bash
# The test command: sets up .venv (scripts/setup-env.sh) and runs the default test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/losses -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-env.sh test,dev,demo,integrations,docs
exec .venv/bin/python -m pytest "$@"
