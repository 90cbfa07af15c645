#!/usr/bin/env bash
# One prepared GPU session: the CUDA smoke test of every method, then the paper-preset
# distillation benchmark (DM/DC/DSA and the meta-learning methods at IPC 1/10/50) with each
# distillation capped at TIME_LIMIT seconds, all jobs at once on the one GPU. Results stream
# to <work>/<group>/results.jsonl as each job lands, so a cut-off run still reports; at the
# end everything is packed into $OUT/sweep.tgz (the device tool returns few files).
#
#   OUT=/tmp/out TIME_LIMIT=240 bash simulations/device_sweep.sh
#   OUT=/tmp/out DEVICE=cpu PRESET=quick PARALLEL=1 TIME_LIMIT=5 bash simulations/device_sweep.sh   # dry run
# PRESET names a file under conf/distill/ (conf/README.md).
set -u
OUT=${OUT:-bench_results/device}
TIME_LIMIT=${TIME_LIMIT:-240}
HARD_LIMIT=${HARD_LIMIT:-520}   # seconds before every job is stopped, evaluation included
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-paper}
PARALLEL=${PARALLEL:-12}
WORK=$(mktemp -d)/sweep
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$WORK/gpu.txt" 2>&1
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" >> "$WORK/gpu.txt" 2>&1

bench() {  # group name, then bench_distill arguments
  local group=$1; shift
  timeout "$HARD_LIMIT" $PY simulations/bench_distill.py --preset "$PRESET" --device "$DEVICE" --eval-seeds 3 \
    --time-limit "$TIME_LIMIT" --out "$WORK/$group" "$@" > "$WORK/$group.log" 2>&1 &
}

timeout 200 $PY simulations/cuda_smoke.py --device "$DEVICE" --out "$WORK/cuda_smoke.jsonl" \
  > "$WORK/cuda_smoke.log" 2>&1 &
bench matching --methods random dm dc dsa --ipc 1 10 50 --parallel "$PARALLEL"
bench meta --methods kip rfad frepo bptt --ipc 1 10 50 --parallel "$PARALLEL" --no-pool
bench frepo_lr --methods frepo --ipc 1 10 --parallel 2 --no-pool --set frepo.lr-img=0.03
wait
nvidia-smi --query-gpu=memory.used --format=csv >> "$WORK/gpu.txt" 2>&1
tar -czf "$OUT/sweep.tgz" -C "$(dirname "$WORK")" sweep
for f in "$WORK"/*.log; do echo "== $f"; tail -n 16 "$f"; done
