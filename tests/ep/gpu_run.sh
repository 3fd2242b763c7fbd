#!/usr/bin/env bash
# Everything of the EP work that needs GPUs, in one go; results under $OUT (default bench_out/ep_gpu).
#   bash tests/ep/gpu_run.sh
# 1. tests/ep with -m "gpu or multigpu" (one-GPU NCCL group; all GPUs under torchrun when >= 2)
# 2. examples/ep_moe.py over NCCL on every GPU (bf16, then FP8 dispatch, then the batched backend)
# 3. scripts/bench_ep.py over NCCL: the sweep and the DeepSeek-V3 decode / prefill presets
# 4. the same sweep on CPU (gloo, 2 ranks) for comparison
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-bench_out/ep_gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
RUN=("$PY" -m torch.distributed.run --standalone --nproc-per-node)
status=0
step() { echo "== $*" | tee -a "$OUT/summary.txt"; }
record() { local rc=$?; echo "   rc=$rc" | tee -a "$OUT/summary.txt"; [ $rc -eq 0 ] || status=1; }

"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count(), torch.cuda.get_device_name(0))" > "$OUT/env.txt" 2>&1
step "pytest tests/ep -m 'gpu or multigpu' ($NGPU GPUs)"
"$PY" -m pytest -q tests/ep -m "gpu or multigpu" --junitxml="$OUT/pytest_ep_gpu.xml" > "$OUT/pytest_ep_gpu.txt" 2>&1; record
tail -5 "$OUT/pytest_ep_gpu.txt"

NP=$(( NGPU >= 1 ? NGPU : 1 ))
for variant in "" "--fp8 --hidden 1024 --intermediate 384" "--batched"; do
    step "example ep_moe.py over nccl, $NP ranks $variant"
    "${RUN[@]}" "$NP" examples/ep_moe.py --backend nccl --tokens 1024 --iters 20 $variant >> "$OUT/example_nccl.txt" 2>&1; record
done
tail -4 "$OUT/example_nccl.txt"

step "bench_ep.py sweep over nccl, $NP ranks"
"${RUN[@]}" "$NP" scripts/bench_ep.py --backend nccl --tokens 1,8,32,128,512,2048,8192 --hidden 2048,7168 --iters 20 --out "$OUT" > "$OUT/bench_nccl_sweep.txt" 2>&1; record
step "bench_ep.py DeepSeek-V3 presets over nccl, $NP ranks"
"${RUN[@]}" "$NP" scripts/bench_ep.py --backend nccl --preset deepseek-v3-decode --preset deepseek-v3-prefill --iters 20 --out "$OUT" > "$OUT/bench_nccl_presets.txt" 2>&1; record
step "bench_ep.py sweep over gloo, 2 CPU ranks"
"${RUN[@]}" 2 scripts/bench_ep.py --backend gloo --tokens 1,32,512 --hidden 2048 --iters 5 --out "$OUT" > "$OUT/bench_gloo_sweep.txt" 2>&1; record
cat "$OUT"/bench_*.txt | grep -v "^W" | tail -30
echo "results in $OUT (status $status)"
exit $status
