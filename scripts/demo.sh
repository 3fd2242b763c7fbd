#!/usr/bin/env bash
# The main job: the expert-parallel MoE example on CPU (gloo), checked against the torch reference.
source "$(dirname "$0")/_venv.sh"
"$VPY" -m pip install -q -e .
exec "$VPY" examples/ep_moe.py "$@"
