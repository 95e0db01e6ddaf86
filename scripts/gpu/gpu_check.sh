#!/usr/bin/env bash
# Every GPU measurement and check the CUDA path needs, in one call of under 9 minutes on a GPU machine.
#
# Here, on the development machine (once per checkout: the GPU image has torch and Triton but
# not hydra/omegaconf, and nothing can be fetched there):
#     scripts/gpu/gpu_check.sh prepare    # wheels into .whl/ (git-ignored through .git/info/exclude)
# Then, on the GPU machine, with .whl/ beside the checkout, in one run of at most 520 s:
#     bash scripts/gpu/gpu_check.sh
# It prints, in this order (each step time-capped so a stall cannot use up the time on the GPU):
#   1. gradients of hrnn-dct and of the default model (clock_event: the gated kernels), B=100,
#      T=784, in each precision against float64 (bars: the default < 1e-2, ieee < 1e-5);
#   2. at T = 784, batch 100 and 1000: the recurrence alone against cuDNN's LSTM, steps captured
#      in one CUDA graph, then the bench: every config, each precision, peak GPU memory, the
#      speed-ups over cuDNN LSTM and the bar lines (2x at B=100, 4x at B=1000);
#   3. scripts/gpu/cuda_check.py: four models from the CLI on CUDA, resume, numerics of both kernel
#      families and of the loop, the default experiment's train_step_s;
#   4. the bench at T = 200 and 2000 (default precision);
#   5. the kernels' batch tile x warps sweep at T=784 (for the defaults in hrnn/ops/gpu.py).
# Logs and JSON go to $OUT, if set, or ./gpu_check_out.
set -uo pipefail
cd "$(dirname "$0")/../.."

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

# About 450 s of steps, the most important first: the call needs timeout_s 520 (start and
# transfers are not in it).
step precision 60 $PY scripts/bench/bench_cuda.py --check --no-bench --json "$OUT/precision.json"
step bench784 150 $PY scripts/bench/bench_cuda.py --steps 784 --repeat 5 --ops --graph --json "$OUT/bench784.json"
step cuda_check 150 $PY scripts/gpu/cuda_check.py --out "$OUT" --runs /tmp/hrnn_cuda_runs --steps 20 \
    --models hrnn-dct,clock_event,event-hard,cwrnn
step bench_other 80 $PY scripts/bench/bench_cuda.py --steps 200 2000 --repeat 5 --precisions '' \
    --only hrnn-dct,hrnn-binary,hrnn-clock_event,hrnn-event,cwrnn,lstm,gru,rnn
step sweep 60 $PY scripts/bench/bench_cuda.py --sweep --no-bench --repeat 5
