#!/usr/bin/env bash
# CONFIG A (EDM2) vs G* (EDM2+) on one CUDA GPU in at most ~8 minutes, at the S size (64x64, base 192, 1000 classes).
# Every measurement ends in a line with the ratio G*/A. Run from anywhere: bash benchmarks/gpu_suite.sh
# It starts with what decides CUDA's default path in training (networks/fastpaths.py): the CUDA tests
# (tests/test_cuda.py) and the training path's images/s beside the reference path's. CUDA training takes the
# training path by default only once those tests pass on a GPU and the training path is at least as fast there.
# Each step has a time limit, so the whole suite stays within its budget even where one step hangs or compiles slowly;
# a step that fails or runs out of time is reported, the others still run, and the exit status counts the failures.
#
# Environment:
#   PYTHON=...             the interpreter (default python3, which holds PyTorch on the lent GPU machines)
#   TRAIN_COMPILE=MODE     also time training under torch.compile in MODE, e.g. reduce-overhead (CUDA graphs);
#                          off by default: compiling both S-size networks' backward takes minutes
#   SMOKE=1 DEVICE=cpu     every step at toy sizes on the CPU in about a minute (tests/test_benchmarks.py runs it so,
#                          so that the first run on a GPU does not fail on an option)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEV=${DEVICE:-cuda}

if [ "${SMOKE:-0}" = 1 ]; then  # toy sizes: checks that every step runs and prints its ratio, measures nothing
    TRAIN="--resolution=8 --channels=8 --channel-mult=1,2 --num-blocks=1 --attn=4 --label-dim=10 --steps=1 --warmup=0"
    TRAIN_BATCHES="2 4"
    INFER="--channels=64 --resolution=8 --label-dim=10 --warmup=0"
    PROTOCOL="--reps=1 --throughput-reps=1"  # (no --compile: minutes on a CPU)
    SWEEP="2 4"
    SAMPLE="--preset=demo --num-images=2 --batch=2 --steps=2"
    LIMIT=300
else
    TRAIN="--resolution=64 --channels=192 --channel-mult=1,2,3,4 --num-blocks=3 --attn=16,8 --label-dim=1000 --steps=10 --warmup=3"
    TRAIN_BATCHES="32 64"
    INFER="--warmup=3"
    PROTOCOL="--compile --reps=20 --throughput-reps=20"
    SWEEP="32 64 128 256 512"
    SAMPLE="--preset=edm2plus-img64-s --num-images=64 --batch=32 --steps=32"
    LIMIT=0
fi
limit() { [ "$LIMIT" -gt 0 ] && echo "$LIMIT" || echo "$1"; }  # a step's time limit in seconds

log=$(mktemp)
trap 'rm -f "$log"' EXIT
failures=0
step() {  # step SECONDS FILTER COMMAND...: run COMMAND with a time limit; show FILTER of its output, or why it failed
    local seconds=$1 filter=$2
    shift 2
    timeout "$seconds" "$@" >"$log" 2>&1
    local rc=$?
    if [ $rc -ne 0 ]; then
        failures=$((failures + 1))
        echo "FAILED (exit $rc$([ $rc -eq 124 ] && echo ": over its ${seconds} s limit")): $*"
        tail -n 5 "$log"
    else
        eval "$filter" <"$log"
    fi
}

if [ "$DEV" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
fi
$PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"

echo; echo "== CUDA tests (tests/test_cuda.py; all skipped without a GPU)"
step "$(limit 240)" 'tail -n 3' $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py

echo; echo "== Training, S size, float16: forward + backward + Adam; training path vs reference path, side by side"
for b in $TRAIN_BATCHES; do
    step "$(limit 50)" 'tail -n 8' $PY benchmarks/train_speed.py $TRAIN --batch="$b" --device="$DEV" --fp16=true
done
if [ -n "${TRAIN_COMPILE:-}" ]; then
    echo; echo "== Training under torch.compile (mode $TRAIN_COMPILE), batch 64"
    step "$(limit 400)" 'tail -n 5' $PY benchmarks/train_speed.py $TRAIN --batch=64 --device="$DEV" --fp16=true \
        --impls=training,compiled --compile-mode="$TRAIN_COMPILE"
fi

echo; echo "== Inference, the paper's protocol: batch 32, torch.compile + TF32 (float16 activations)"
step "$(limit 120)" 'tail -n 9' $PY benchmarks/inference.py --device="$DEV" $INFER $PROTOCOL --impls=fast --batch=32

echo; echo "== Inference batch sweep (inference path, float16): where the card saturates"
for b in $SWEEP; do
    echo "batch $b:"
    step "$(limit 12)" "grep -E '^fast +(A|G\\*) |throughput ratio'" $PY benchmarks/inference.py --device="$DEV" $INFER \
        --impls=fast --reps=0 --throughput-reps=5 --batch="$b"
done

echo; echo "== Sampling: generate_images, S size, 64 images at batch 32, 32 Heun steps; images/s and peak memory"
step "$(limit 60)" 'tail -n 5' $PY benchmarks/sampling.py --device="$DEV" $SAMPLE --impls=fast

echo
if [ $failures -ne 0 ]; then
    echo "$failures step(s) failed"
    exit 1
fi
echo "all steps ran"
