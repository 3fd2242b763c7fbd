# Sourced by demo.sh / test.sh: make .venv (keeping a torch that is already installed, e.g. on a GPU box).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    # --system-site-packages lets a machine's preinstalled torch (CUDA build) be reused instead of replaced.
    "$PY" -m venv --system-site-packages .venv
fi
VPY="$ROOT/.venv/bin/python"
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    "$VPY" -m pip install -q "torch==2.13.0"
fi
