#!/usr/bin/env bash
# Issue 14, item 5: the GPU checks as one script, for a session that is lent a CUDA device (not yet run on one).
# Needs the project installed (README); writes each benchmark's output under $OUT. About 10 min on one H100.
#   bash benchmarks/device_check.sh
set -u
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"
# CUDA smoke tests: int8 targets decoded on the device + training steps; bf16 extraction on the GPU
python -m pytest -q -rs tests/test_reader_cuda.py tests/test_teacher_precision.py 2>&1 | tail -5 | tee "$OUT/smoke.txt"
# JPEG decode: PIL per CPU-second vs nvJPEG (is decode the wall at 1,500 images/s?)
python -m benchmarks.bench_decode --images 512 --batch 128 2>&1 | tee "$OUT/decode.txt"
# Extraction: 3 ViT-B/16 teachers in bf16 on the GPU (goal >= 1,500 images/s)
python -m benchmarks.bench_extract --images 1024 --batch 128 --workers 12 --repeats 2 --precision bf16 \
  --out "$OUT/extract" 2>&1 | tail -15 | tee "$OUT/extract.txt"
# Training from a local store in bf16 (goal >= 10,000 images/s: images_per_s.store in the JSON)
python -m benchmarks.bench_distill --images 2048 --batch 512 --steps 8 --rounds 2 --online-steps 2 --workers 8 \
  --mixed-precision bf16 --out "$OUT/distill" 2>&1 | tail -15 | tee "$OUT/distill.txt"
