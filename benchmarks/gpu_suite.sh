#!/usr/bin/env bash
# CONFIG A (EDM2) vs G* (EDM2+) on one CUDA GPU in at most ~6 minutes, at the S size (64x64, base 192, 1000 classes).
# Every measurement ends in a line with the ratio G*/A. Run from anywhere: bash benchmarks/gpu_suite.sh
# Each step has a time limit, so the whole suite stays within its budget even where one step hangs or compiles slowly.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
S="--resolution=64 --channels=192 --channel-mult=1,2,3,4 --num-blocks=3 --attn=16,8 --label-dim=1000"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
$PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"

echo; echo "== Training, S size, float16: forward + backward + Adam; default (training) path vs reference path"
for b in 32 64; do
    timeout 50 $PY benchmarks/train_speed.py $S --batch=$b --steps=10 --warmup=3 --device=cuda --fp16=true | tail -n 8
done

echo; echo "== Inference, the paper's protocol: batch 32, torch.compile + TF32 (float16 activations)"
timeout 120 $PY benchmarks/inference.py --device=cuda --compile --impls=fast --reps=20 --throughput-reps=20 \
    --warmup=3 --batch=32 | tail -n 9

echo; echo "== Inference batch sweep (inference path, float16): where the card saturates"
for b in 32 64 128 256 512; do
    echo "batch $b:"
    timeout 12 $PY benchmarks/inference.py --device=cuda --impls=fast --reps=0 --throughput-reps=5 --warmup=2 \
        --batch=$b | grep -E '^fast +(A|G\*) |throughput ratio'
done

echo; echo "== Sampling: generate_images, S size, 64 images at batch 32, 32 Heun steps; images/s and peak memory"
timeout 60 $PY benchmarks/sampling.py --device=cuda --preset=edm2plus-img64-s --num-images=64 --batch=32 --steps=32 \
    --impls=fast | tail -n 5
