#!/usr/bin/env bash
# Set up .venv and run the test suite (GPU tests skip cleanly without CUDA).
source "$(dirname "$0")/_venv.sh"
"$VPY" -m pip install -q -e ".[test]"
exec "$VPY" -m pytest -q "$@"
