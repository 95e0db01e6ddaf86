#!/usr/bin/env bash
# Every GPU measurement and check the CUDA path needs, in one call of under 10 minutes on a GPU machine.
#
# Here, on the development machine (once per checkout: the GPU image has torch and Triton but
# not hydra/omegaconf, and nothing can be fetched there):
#     scripts/gpu/gpu_check.sh prepare    # wheels into .whl/ (git-ignored through .git/info/exclude)
# Then, on the GPU machine, with .whl/ beside the checkout, in one run of at most 590 s:
#     bash scripts/gpu/gpu_check.sh
# Each step is time-capped (a stall cannot use up the time on the GPU) and writes its own log into
# $OUT as it goes (step 3 its JSON too, after each result), so a cut run keeps what it measured.
# In this order:
#   0. in the background, at low priority: the C++ extension for this machine's torch (the CPU
#      side of step 4), waited for before any timing;
#   1. gradients of hrnn-dct and of the default model (clock_event: the gated kernels), B=100,
#      T=784, in each precision against float64 (bars: the default < 1e-2, ieee < 1e-5); then
#      tests/test_gluon.py, whose GPU tests check both ops' Gluon kernels against the reference;
#   2. scripts/gpu/kernel_times.py: the recurrence alone, forward and backward, each kernel variant;
#   3. at T = 784, batch 100 and 1000: the recurrence alone against cuDNN's LSTM, steps captured
#      in one CUDA graph, then the bench: the configs in the default precision and the others,
#      the default model in each precision with each gate layout, peak GPU memory, the speed-ups
#      over cuDNN's LSTM and the bar lines;
#   4. scripts/gpu/cuda_check.py: first the default experiment's step on CUDA and on 2 CPU threads,
#      then four models from the CLI on CUDA, resume, numerics of both kernel families and of the loop;
#   5. the bench at T = 200 and 2000 (default precision);
#   6. Nsight Compute on the four kernels at B = 100 (the default variants): speed of light, warp
#      states (what the warps wait on), scheduler and source counters.
# Eight files come back from a device call: the seven logs and bench784.json.
# The batch tile x warps sweep (bench_cuda.py --sweep) is not in it: a call of its own.
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

# About 450 s of steps at most (about 340 s measured), the most important first: the call needs
# timeout_s 480 (start and transfers are not in it).
(nice -n 19 timeout 150 $PY setup.py -q build_ext --inplace > /tmp/build_ext.log 2>&1; echo "exit $?" >> /tmp/build_ext.log) &
build=$!
step precision 90 bash -c "$PY scripts/bench/bench_cuda.py --check --no-bench; $PY -m pytest -q -p no:cacheprovider tests/test_gluon.py"
echo; echo "=== waiting for the C++ extension's build"; wait $build; tail -n 3 /tmp/build_ext.log
step kernels 60 $PY scripts/gpu/kernel_times.py
step bench784 70 $PY scripts/bench/bench_cuda.py --steps 784 --repeat 5 --ops --graph --gate-layouts \
    --only hrnn-dct,hrnn-clock_event,hrnn-event,lstm,rnn --precisions tf32x3,tf32,bf16 --json "$OUT/bench784.json"
step cuda_check 120 $PY scripts/gpu/cuda_check.py --out /tmp/cuda_check --runs /tmp/hrnn_cuda_runs --steps 20 \
    --models hrnn-dct,clock_event,event-hard,cwrnn
step bench_other 45 $PY scripts/bench/bench_cuda.py --steps 200 2000 --repeat 5 --precisions '' \
    --only hrnn-dct,hrnn-clock_event,hrnn-event,cwrnn,lstm,rnn
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
step ncu 90 "${NCU:-ncu}" --clock-control none -k 'regex:leaky|gated' --launch-count 12 \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section SourceCounters \
    $PY scripts/gpu/kernel_times.py --profile --batch 100 --warmup 1
