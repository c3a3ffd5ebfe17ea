#!/usr/bin/env bash
# The GPU check of issue 19, in one go (about 6 minutes on one H100/H200):
#   1. the GPU tests: 16-mixed / bf16-mixed fits with the monitor, the background job's and the
#      collection thread's CUDA streams, bf16 banks (tests/monitor/test_gpu.py, test_setups.py);
#   2. bench_engine on the GPU (FG-VCE vs greedy, bf16, 256 queries);
#   3. bench_scale: the 200-class ResNet-50 split at 224 and 448 px (references per class,
#      bank bytes, explanations/s, head evaluations per explanation, peak GPU memory);
#   4. bench_callback on the GPU (validation-epoch overhead, publishing pieces, memory).
# Each step's log goes to $OUT (default /tmp/fgvce_gpu_check); a failed step does not stop the
# others; the exit status is the number of failed steps.
#
#   bash benchmarks/gpu_check.sh            # on a GPU machine
#   bash benchmarks/gpu_check.sh --smoke    # tiny sizes: checks the script itself (CPU too)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fgvce_gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SMOKE=0; [ "${1:-}" = "--smoke" ] && SMOKE=1
python -c "import fgvce_lightning" 2>/dev/null || python -m pip install -q --no-deps -e . \
    || { echo "cannot import or install fgvce_lightning"; exit 1; }
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    DEVICE=cuda; ACCEL=gpu
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
else
    [ $SMOKE = 1 ] || { echo "no CUDA GPU here: run with --smoke to check the script on the CPU"; exit 1; }
    DEVICE=cpu; ACCEL=cpu
fi
failed=0
step() {                                   # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    echo "== $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    [ "$rc" = 0 ] || failed=$((failed + 1))
}
python -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" \
    | tee "$OUT/summary.txt"
if [ $SMOKE = 1 ]; then
    step tests 300 python -m pytest -q -rs tests/monitor/test_gpu.py
    step engine 300 python benchmarks/bench_engine.py --device $DEVICE --queries 8 --train-steps 20 --repeats 1
    step scale 300 python benchmarks/bench_scale.py --device $DEVICE --sizes 64 --queries 2 --classes 2
    step callback 300 python benchmarks/bench_callback.py --accelerator $ACCEL --epochs 2 \
        --fit-epochs 0 --train-epochs 1 --num-train 128 --num-val 128 --max-samples 8
else
    step tests 150 python -m pytest -q -rs tests/monitor/test_gpu.py tests/monitor/test_setups.py
    step engine 60 python benchmarks/bench_engine.py --device cuda --dtype bf16 --queries 256
    step scale 120 python benchmarks/bench_scale.py --device cuda --sizes 224 448 --queries 128 --classes 8
    step callback 150 python benchmarks/bench_callback.py --accelerator gpu --epochs 6 \
        --fit-epochs 3 --fit-repeats 1 --report-html
fi
echo "failed steps: $failed (logs in $OUT)" | tee -a "$OUT/summary.txt"
exit $failed
