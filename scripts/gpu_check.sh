#!/usr/bin/env bash
# Everything issue 16's "done when" needs from one GPU lease, in one call of under 8 minutes.
#
# Here, on the development machine (once per checkout: the GPU image has torch and Triton but
# not hydra/omegaconf, and nothing can be fetched there):
#     scripts/gpu_check.sh prepare        # wheels into .whl/ (git-ignored through .git/info/exclude)
# Then, through the device tool, in one call with carry [".whl"] and timeout_s 540:
#     bash scripts/gpu_check.sh
# It prints, in this order (each step time-capped so a stall cannot eat the lease):
#   1. gradients of hrnn-dct (B=100, T=784) in each precision against float64 (bars: the
#      default < 1e-2, ieee < 1e-5);
#   2. the bench: every config at T = 200, 784, 2000 x batch 100, 1000, peak GPU memory, the
#      speed-ups over cuDNN LSTM and the done-when lines (2x at B=100, 4x at B=1000, T=784);
#   3. the kernels' batch tile x warps sweep at T=784 (for the defaults in hrnn/triton_core.py);
#   4. scripts/cuda_check.py: every model from the CLI on CUDA, resume, numerics of the Triton
#      path and of the loop, the default experiment's train_step_s.
# Logs and JSON go to $OUT (the device tool brings them back) or ./gpu_check_out.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
    set -e
    exclude="$(git rev-parse --git-common-dir)/info/exclude"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    mkdir -p .whl
    PIP=${PIP:-.venv/bin/pip}; [ -x "$PIP" ] || PIP="python3 -m pip"
    $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl hydra-core==1.3.8 omegaconf==2.3.1
    $PIP wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3   # sdist only on PyPI: built here, pure Python
    ls .whl
    exit 0
fi

OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "${SITE:=/tmp/site}" .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:$SITE"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch, triton, hydra; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'hydra', hydra.__version__)" || exit 1

step() {  # step NAME SECONDS CMD...: run, tee the log into $OUT, report the exit status
    local name=$1 limit=$2; shift 2
    echo; echo "=== $name (at most ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s"
}

# About 460 s of steps: the call needs timeout_s 540 (start and transfers are not in it).
step precision 60 $PY scripts/bench_cuda.py --check --no-bench --json "$OUT/precision.json"
step bench 180 $PY scripts/bench_cuda.py --repeat 5 --json "$OUT/bench.json"
step sweep 50 $PY scripts/bench_cuda.py --sweep --no-bench --repeat 5 --json "$OUT/sweep.json"
step cuda_check 170 $PY scripts/cuda_check.py --out "$OUT" --runs /tmp/hrnn_cuda_runs --steps 20
