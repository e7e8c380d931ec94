#!/usr/bin/env bash
# benchmarks/gpu/run.sh - the GPU check, run ON the lent GPU machine (after prepare.sh here):
#   1. conversion of the 8,514 downscaled HAM10000 images (16 workers)
#   2. benchmarks/train_throughput.py: real FFCV data vs synthetic input, resnet152,
#      seresnext101_32x4d, vgg16 (224 px, bf16, channels-last, batch 256) [issue 3, section 6]
#   3. the whole path from scratch: split, 5 folds of one backbone, ensemble [issue 5, section 4]
# Everything it prints and the ensemble report land in $OUT. Budget: < 10 minutes.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
D=.device-data/ham10000-200x150
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
t0=$(date +%s)
python3 jobs/convert.py --images $D/images --metadata $D/HAM10000_metadata.csv --out /tmp/ham-ffcv \
  --workers 16 2>&1 | tail -2 | tee "$OUT/convert.txt"
t1=$(date +%s)
timeout 240 python3 benchmarks/train_throughput.py --data /tmp/ham-ffcv --steps 30 --warmup 10 \
  2>&1 | grep -v Warning | tee "$OUT/throughput.txt"
t2=$(date +%s)
timeout 300 python3 jobs/launch.py --folds 5 cluster.kind=local run_dir=/tmp/cv data.dir=/tmp/ham-ffcv \
  data.images=[$D/images] data.metadata=$D/HAM10000_metadata.csv backbones=[resnet18] \
  model.image_size=192 train.batch_size=256 train.epochs=25 train.lr=0.003 data.num_workers=16 \
  2>&1 | tail -20 | tee "$OUT/cv.txt"
t3=$(date +%s)
cp /tmp/cv/ensemble/report.md /tmp/cv/ensemble/metrics.json "$OUT/" 2>/dev/null
echo "wall s: convert $((t1 - t0)) throughput $((t2 - t1)) cv $((t3 - t2))" | tee "$OUT/times.txt"
