#!/usr/bin/env bash
# The GPU benchmarks in one call within a time budget (see benchmarks/README.md, "On a GPU"): installs
# the wheels in wheels/ offline if any, then runs each benchmark within its share of the budget and
# writes NAME.log, NAME.json and summary.txt under $OUT (default out/gpu).
#
#   bash benchmarks/run_on_gpu.sh [BUDGET_SECONDS [EXTRA ARGS...]]
#
# BUDGET_SECONDS (default 540) bounds the whole script, install included; EXTRA ARGS go to every benchmark
# (e.g. `--quick --cpu` for a dry run without a GPU). On a machine without a package index, wheels/ holds
# every package it lacks (diffusers, prodigyopt, toml), downloaded beforehand with `pip download`.
# PYTHON (default python3) runs the benchmarks. Exit status 1 when a benchmark failed or was killed.
set -u -o pipefail
cd "$(dirname "$0")/.."
budget=${1:-540}
if ! [[ $budget =~ ^[0-9]+$ ]]; then
    echo "error: BUDGET_SECONDS must be a whole number of seconds, got '$budget'" >&2
    exit 2
fi
shift $(( $# > 0 ? 1 : 0 ))
extra=("$@")
out=${OUT:-out/gpu}
py=${PYTHON:-python3}
start=$SECONDS
status=0
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PIP_ROOT_USER_ACTION=ignore

if compgen -G "wheels/*.whl" >/dev/null; then
    # --target keeps the image's own packages untouched; --no-deps: everything else is already there
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/urae-wheels \
        wheels/*.whl || { echo "error: installing wheels/*.whl failed" >&2; exit 2; }
    export PYTHONPATH=/tmp/urae-wheels${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$py" -c "import diffusers" 2>/dev/null; then
    echo "error: diffusers is not importable; pip install -r requirements.txt, or put its wheel in wheels/ (benchmarks/README.md, 'On a GPU')" >&2
    exit 2
fi
{
    echo "budget ${budget} s; extra args: ${extra[*]:-none}"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null \
        || echo "no nvidia-smi"
    "$py" -c "import torch, diffusers; print('torch', torch.__version__, '| diffusers', diffusers.__version__)"
} | tee "$out/summary.txt"

# bench NAME SECONDS COMMAND...: run COMMAND with its share of the budget (SECONDS, capped by what is left).
# The benchmark gets `--budget-seconds` (its share less a margin for start-up and the final report) and
# `--json $out/NAME.json`, and is killed at the end of its share; it writes its JSON after every
# measurement, so a killed run keeps what it measured. A benchmark with under 30 s left is skipped.
bench() {
    local name=$1 share=$2
    shift 2
    local left=$(( budget - (SECONDS - start) ))
    (( share > left )) && share=$left
    if (( share < 30 )); then
        echo "$name: skipped, ${left} s of the budget left" | tee -a "$out/summary.txt"
        return
    fi
    local t0=$SECONDS
    timeout -k 5 "$share" "$@" --budget-seconds $(( share - 20 )) --json "$out/$name.json" "${extra[@]}" 2>&1 \
        | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    (( rc == 0 )) || status=1
    echo "$name: exit $rc after $(( SECONDS - t0 )) s$( (( rc == 124 || rc == 137 )) && echo ' (killed at its share)')" \
        | tee -a "$out/summary.txt"
}

# urae.memory's CUDA path: side-stream copies with injected delays, exact pinned bytes, a capped-GPU trainer step
left=$(( budget - (SECONDS - start) ))
if (( left >= 60 )) && [[ " ${extra[*]-} " != *" --cpu "* ]]; then
    t0=$SECONDS
    timeout -k 5 $(( left < 180 ? left : 180 )) "$py" -m pytest tests/test_memory_cuda.py -q -p no:cacheprovider 2>&1 \
        | tee "$out/memory_cuda.log"
    rc=${PIPESTATUS[0]}
    (( rc == 0 )) || status=1
    echo "memory_cuda: exit $rc after $(( SECONDS - t0 )) s" | tee -a "$out/summary.txt"
fi

# One line per benchmark, most important first (at most 3: $OUT brings back 8 files, 2 per benchmark + summary).
# BENCHES picks them (default: infer): BENCHES=speed runs the speed-option rows (cache, backend, compile at
# 2048² and 4096²; pass --sizes 2048 or --sizes 4096 to give one size the whole budget).
for b in ${BENCHES:-infer}; do
    case $b in
        infer) bench infer 480 "$py" benchmarks/bench_infer_gpu.py ;;
        speed) bench speed 520 "$py" benchmarks/bench_infer_gpu.py --speed ;;
        *) echo "error: unknown benchmark '$b' in BENCHES (infer, speed)" >&2; exit 2 ;;
    esac
done

echo "total $(( SECONDS - start )) s of ${budget} s" | tee -a "$out/summary.txt"
exit $status
