#!/bin/sh
# Every GPU check in one device call (the device machine has torch and timm, not the geo stack):
#   sh bench/gpu_session.sh "$OUT"
# 1. DINOv3 ViT-L/16 inference, ours fused (+ CUDA graphs) vs timm, correctness first (bench/gpu_backbones.py)
# 2. DINO pretraining step throughput, ViT-S/16, eager / compiled / compiled + fused (bench/gpu_pretrain.py)
OUT=${1:-/tmp/gpu_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
PYTHONPATH=. timeout 250 python3 bench/gpu_backbones.py --only-fused --cudagraphs --out "$OUT" > "$OUT/backbones.log" 2>&1
echo "gpu_backbones exit $?" >> "$OUT/backbones.log"
PYTHONPATH=. timeout 280 python3 bench/gpu_pretrain.py --out "$OUT" > "$OUT/pretrain.log" 2>&1
echo "gpu_pretrain exit $?" >> "$OUT/pretrain.log"
tail -n 20 "$OUT/backbones.log" "$OUT/pretrain.log"
