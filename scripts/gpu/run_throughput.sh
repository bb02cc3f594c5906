#!/bin/bash
# On a GPU machine (a device call; nothing to carry, the random latents are made there): the
# training step of SiT-B/2 and SiT-XL/2 on ImageNet-256 latent shapes in fp32, bf16 and bf16 +
# torch.compile, then sampling images/s at batch 64 and 512, one JSON line per measurement in
# $OUT/throughput.jsonl, written as each is taken (a deadline keeps what was measured).
#   bash scripts/gpu/run_throughput.sh 480                      # everything, about 8 minutes
#   bash scripts/gpu/run_throughput.sh 240 --archs SiT-B/2      # extra arguments go to the benchmark
# Rehearse here first: CPU_REHEARSAL=1 OUT=/tmp/out bash scripts/gpu/run_throughput.sh 120 --archs SiT-T/8 \
#   --batch 8 --resolution 8 --steps 2 --sample-batches 4,8 --sample-num 8 --sampler-steps 2
set -u -o pipefail
budget=${1:-480}
shift || true
out=${OUT:-/tmp/vrpo-out}
mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
if [ "${CPU_REHEARSAL:-0}" != 1 ]; then
  python3 -c "import torch; assert torch.cuda.is_available(), 'run_throughput: no CUDA device here'; print(torch.cuda.get_device_name())" || exit 1
fi
start=$(date +%s)
# per-device batch 64 (REPA's 256 is 32 a GPU on 8): XL/2 at 256 a device does not fit without activation checkpointing
timeout --kill-after=20 "$budget" python3 benchmarks/gpu_throughput.py --batch 64 --out "$out/throughput.jsonl" "$@"
echo "run_throughput: exit $? after $(( $(date +%s) - start )) s"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >"$out/nvidia-smi.csv" 2>&1 || true
