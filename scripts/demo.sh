#!/usr/bin/env bash
# The main job: the expert-parallel MoE example at 2 CPU ranks (gloo), checked against the torch reference.
source "$(dirname "$0")/_venv.sh"
"$VPY" -m pip install -q -e .
# One thread per rank: the two ranks share the machine's cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# A torch reused from the system site-packages has no .venv/bin/torchrun; the module is the same launcher.
if [ -x "$ROOT/.venv/bin/torchrun" ]; then
    TORCHRUN=("$ROOT/.venv/bin/torchrun")
else
    TORCHRUN=("$VPY" -m torch.distributed.run)
fi
exec "${TORCHRUN[@]}" --standalone --nproc-per-node 2 examples/ep_moe.py "$@"
