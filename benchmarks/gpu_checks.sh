#!/usr/bin/env bash
# Everything about the cupy backend that needs a GPU, for one call of the device tool:
#   tests     the GPU tests (test_cupy_backend.py on the real GPU, the CPU-side cupy tests, and the op and
#             mixer conformance suites, which cover every available backend: on a GPU, the cupy one too);
#   sanitize  compute-sanitizer memcheck and racecheck on tiny runs of every kernel;
#   bench     benchmarks/retention_gpu.py (after installing the carried wheels: fla-core in .whl/).
#
#   bash benchmarks/gpu_checks.sh [all | tests | sanitize | bench ...]      (default: all, in that order)
#
# The stages share a time budget (BUDGET_S, default 570 s, inside the device tool's 600 s per command):
# tests get at most 300 s, the sanitizer 90 s, the benchmark what is left. A stage cut short says so,
# and the benchmark's JSON keeps every measurement made before the cut ("complete": false); run
# `bash benchmarks/gpu_checks.sh bench` in a second call for the rest.
#
# Logs and the JSON go to $OUT (what the device tool brings back; copy them into benchmarks/results/).
# Before the call, on the machine with this checkout (.whl/ is git-ignored), once:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform any -d .whl fla-core==0.6.0
# and call the device tool with carry [".whl"]. Exit status: the tests' (0 when not run).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-570}
START=$SECONDS
stages=("$@")
[ ${#stages[@]} -eq 0 ] || [ "${stages[0]}" = all ] && stages=(tests sanitize bench)
tests_status=0

stamp() { date -u +%Y-%m-%dT%H:%M:%SZ; }
left() { echo $((BUDGET_S - (SECONDS - START))); }
cap() { local l; l=$(left); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }  # min(cap, time left)
report_cut() { [ "$1" -eq 124 ] && echo "!! $2 stopped at its time limit ($3 s)"; }

{
    echo "started $(stamp); stages: ${stages[*]}"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
    nvcc --version | tail -n 2 || true
    "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, torch.version.cuda)'
    "$PY" -c 'import cupy; print("cupy", cupy.__version__)' || echo "cupy: not importable"
    "$PY" -m mixers list
} 2>&1 | tee "$OUT/env.txt"

for stage in "${stages[@]}"; do
    case "$stage" in
    tests)
        limit=$(cap 300)
        # one worker per test file when pytest-xdist is there (the device image has it)
        parallel=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n 5 --dist loadfile")
        echo "== tests $(stamp), limit ${limit}s ${parallel:+(xdist: $parallel)}"
        # shellcheck disable=SC2086
        timeout "$limit" "$PY" -m pytest -q -ra -p no:cacheprovider --durations=15 $parallel \
            tests/test_cupy_backend.py tests/test_cupy_compile.py tests/test_cupy_emulated.py \
            tests/test_op_conformance.py tests/test_mixer_conformance.py 2>&1 | tee "$OUT/gpu_tests.log"
        tests_status=${PIPESTATUS[0]}
        report_cut "$tests_status" tests "$limit" | tee -a "$OUT/gpu_tests.log"
        echo "tests exit status: $tests_status" | tee -a "$OUT/gpu_tests.log"
        ;;
    sanitize)
        sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
        {
            for tool in memcheck racecheck; do
                limit=$(cap 45)
                echo "== compute-sanitizer ($sanitizer) $tool $(stamp), limit ${limit}s"
                timeout "$limit" "${sanitizer:-compute-sanitizer}" --tool "$tool" --error-exitcode 99 \
                    "$PY" benchmarks/retention_gpu.py --sanitize
                status=$?
                report_cut "$status" "$tool" "$limit"
                echo "$tool exit status: $status"
            done
        } 2>&1 | tee "$OUT/sanitizer.log"
        ;;
    bench)
        if compgen -G ".whl/*.whl" >/dev/null; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
                .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site" && echo "installed: $(ls .whl)"
        else
            echo "no carried wheels in .whl/: the benchmark runs without flash-linear-attention"
        fi 2>&1 | tee -a "$OUT/env.txt"
        [ -d /tmp/site ] && export PYTHONPATH="$PYTHONPATH:/tmp/site"
        limit=$(cap 100000)
        echo "== benchmark $(stamp), limit ${limit}s"
        timeout "$limit" "$PY" benchmarks/retention_gpu.py --out "$OUT" 2>&1 | tee "$OUT/benchmark.log"
        report_cut "${PIPESTATUS[0]}" benchmark "$limit" | tee -a "$OUT/benchmark.log"
        ;;
    *)
        echo "unknown stage $stage (all, tests, sanitize, bench)"
        exit 2
        ;;
    esac
done

echo "finished $(stamp) after $((SECONDS - START)) s; tests exit status $tests_status"
exit "$tests_status"
