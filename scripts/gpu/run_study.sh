#!/bin/bash
# On a GPU machine without internet (a device call, carry: [.gpu]): run (method, seed) pairs of a
# study side by side, each its own process, stop them at a deadline, and leave the small results
# (logs, metrics, configs, representations; no checkpoints) in $OUT/results.tgz.
#   bash scripts/gpu/run_study.sh configs/study/fmnist-gpu-v2.yaml 450 sit:0 repa:0 vrpo-v2:0
# Stage first, here: python scripts/gpu/stage.py --study STUDY --out .gpu
set -u -o pipefail
if [ $# -lt 3 ]; then echo "usage: run_study.sh STUDY_YAML SECONDS METHOD:SEED..." >&2; exit 2; fi
study=$1 budget=$2
shift 2
out=${OUT:-/tmp/vrpo-out}
mkdir -p "$out"
python3 scripts/gpu/unpack.py .gpu /tmp/vrpo-site || exit 1
export PYTHONPATH=$PWD/src:/tmp/vrpo-site VRPO_DATA_ROOT=$PWD/.gpu/data/fashion-mnist PYTHONUNBUFFERED=1
if [ "${CPU_REHEARSAL:-0}" != 1 ]; then  # CPU_REHEARSAL=1: the same path on a CPU, to check it before a lease
  python3 -c "import torch; assert torch.cuda.is_available(), 'run_study: no CUDA device here'; print(torch.cuda.get_device_name())" || exit 1
fi
study_out=$(python3 -c "import sys; from vrpo.study.spec import load_study; print(load_study(sys.argv[1]).out)" "$study") || exit 1
study_out=${study_out/#\~/$HOME}
logs=$study_out/device-logs
mkdir -p "$logs"
start=$(date +%s)
for pair in "$@"; do
  method=${pair%%:*} seed=${pair##*:}
  # stopped at the budget (TERM, then KILL 30 s later): TERM writes a checkpoint at the current step;
  # the log up to the stop comes back, the checkpoints do not (too large), so plan whole runs per call
  timeout --kill-after=30 "$budget" \
    python3 -m vrpo.cli study --config "$study" --methods "$method" --seeds "$seed" >"$logs/$method-seed$seed.txt" 2>&1 &
done
wait
echo "run_study: $# runs in $(( $(date +%s) - start )) s"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >"$logs/nvidia-smi.csv" 2>&1
tar czf "$out/results.tgz" -C "$study_out" --exclude=checkpoints --exclude=tb --exclude='*.safetensors' --exclude='*.npz' .
ls -la "$out"
for pair in "$@"; do tail -n 2 "$logs/${pair%%:*}-seed${pair##*:}.txt"; done
