#!/usr/bin/env bash
# The main job: sets up .venv (scripts/setup-env.sh) and runs `purekd demo`.
# Arguments go to the demo, e.g. scripts/demo.sh --labels 100 --output-dir /tmp/demo, or
# scripts/demo.sh lm (the language-model demo, `purekd demo lm`; add --quick for a short check),
# scripts/demo.sh on-policy (`purekd demo on-policy`: on-policy against off-policy KD), or
# scripts/demo.sh cross-tokenizer (Gemma 3 270M -> a SmolLM2 student with ULD and GOLD)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-env.sh demo
exec .venv/bin/purekd demo "$@"
