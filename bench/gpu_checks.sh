#!/usr/bin/env bash
# The CUDA checks of the kernels issue in one go, for a machine with a GPU (no network needed):
#   1. bench/gemm_kernels.py: FP8 GEMM TFLOPS (4096^3, DeepSeek-V3 expert shapes) vs bf16 matmul and _scaled_mm,
#      grouped experts vs a per-expert loop;
#   2. the gpu-marked tests: the model, an FP8 training step and rollout log-probs on CUDA (tests/model/test_cuda.py),
#      and every Triton kernel on CUDA against its torch reference (tests/kernels);
#   3. bench/fp8_train.py: FP8 vs bf16 training of the tiny model on the GPU.
# Usage: bash bench/gpu_checks.sh [LOG_DIR]      (logs default to ./gpu_checks)
# Works from a plain checkout: without an installed dsalign, it links the folders into a temporary namespace
# package (the GPU image may lack ray/deepspeed, which these checks do not import).
set -u
LOG=${1:-gpu_checks}
mkdir -p "$LOG"
if ! python3 -c "import dsalign.kernels" 2>/dev/null; then
    NS=$(mktemp -d)
    mkdir -p "$NS/dsalign"
    for d in model kernels alignment rewards pipelines; do ln -s "$PWD/$d" "$NS/dsalign/$d"; done
    export PYTHONPATH="$NS${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$LOG/env.txt"
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to LOG/NAME.log, report the exit status
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$LOG/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s (limit $limit s)"
    tail -n "${TAIL:-40}" "$LOG/$name.log"
}
# the model on CUDA first (the broadest check), then every kernel case; tests run one tile config per kernel
# (tests/conftest.py sets DSALIGN_AUTOTUNE=0), the benchmark tunes them all
step model_tests "${MODEL_S:-150}" python3 -m pytest -m gpu tests/model/test_cuda.py -q -s -rs -p no:cacheprovider \
    --timeout 120
step gemm_kernels "${BENCH_S:-200}" python3 bench/gemm_kernels.py
step kernel_tests "${TEST_S:-240}" python3 -m pytest -m gpu tests/kernels -q -rs -p no:cacheprovider --timeout 120
step fp8_train "${TRAIN_S:-120}" env DSALIGN_AUTOTUNE=0 python3 bench/fp8_train.py --steps 200
