#!/usr/bin/env bash
# The GPU check of the fused kernels, ready to run unchanged on a CUDA machine
# (made for an H200 with torch 2.11 + triton 3.6, no network, nothing to install):
#
#     bash ci/gpu_check.sh [OUT_DIR]        # from anywhere; under 5 minutes (see budget below)
#
# 1. the tests, natively (no TRITON_INTERPRET), in parallel shards: the kernel tests
#    tests/test_kernel_*.py except the compile report's test (a CPU-only, ahead-of-time
#    check), and the end-to-end dispatch tests tests/test_dispatch.py (tiny Llama/GPT-2 in
#    kernel mode 'triton' vs the PyTorch path on CUDA tensors, mixed batches, generate,
#    torch.compile, a CUDA-graph capture);
# 2. the benchmark table (ci/gpu_bench.py): merged / unmerged / fused, CUDA graphs;
# 3. ci/gpu_bench_mixed.py (per-row adapters) if present;
# 4. the summary (ci/gpu_summary.py): Markdown tables for the README (test counts per
#    file, every benchmark target with its worst ratio), also in OUT_DIR/summary.md.
# Everything lands in OUT_DIR (default: ./gpu_check_out): gpu_check.log (all output),
# env.json, steps.json (exit status per step), shard_*.log/.txt/.rc and tests_*.xml
# (JUnit), gpu_bench.json, gpu_bench_mixed.json, summary.md. Exit status: 0 all passed
# and all targets met, 1 something failed or missed, 2 no GPU.
#
# Time: the whole script stays within GPU_CHECK_BUDGET_S (default 295 s): the tests get
# at most 100 s (mostly Triton JIT compiles, one per kernel specialization, so they run in
# one shard per CPU core, up to 16, sharing Triton's on-disk cache), the benchmarks what is
# left (at most 120 s and 60 s; gpu_bench.py stops starting points 25 s before its limit).
#
# GPU_CHECK_DRY_RUN=1 checks this script itself on a CPU machine: the same steps through
# Triton's interpreter, the benchmark with --dry-run (tiny shapes), the symlinked package.
set -u
DRY="${GPU_CHECK_DRY_RUN:-0}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/gpu_check_out}"
PY="${PYTHON:-python}"
mkdir -p "$OUT" || exit 1
OUT="$(cd "$OUT" && pwd)"  # absolute: the steps run from another directory
# Results of an earlier run must not be mistaken for this run's.
rm -f "$OUT"/shard_* "$OUT"/tests_*.xml "$OUT"/test_ids.txt "$OUT"/gpu_bench.json \
    "$OUT"/gpu_bench_mixed.json "$OUT"/env.json "$OUT"/steps.json "$OUT"/summary.md
# Everything printed also goes to OUT_DIR/gpu_check.log.
exec > >(tee "$OUT/gpu_check.log") 2>&1
TEE_PID=$!
SHIM=""
# On exit: remove the package shim (if any), then let tee write the last lines before
# the script's own exit (whoever runs it may stop reading when it exits).
cleanup() {
    [ -n "$SHIM" ] && rm -rf "$SHIM"
    exec 1>&- 2>&-
    wait "$TEE_PID" 2>/dev/null
}
trap cleanup EXIT

BENCH_ARGS=()
if [ "$DRY" = "1" ]; then
    BUDGET="${GPU_CHECK_BUDGET_S:-3600}"  # the interpreter is slow; nothing is measured
    TEST_CAP=900
    export TRITON_INTERPRET=1
    BENCH_ARGS=(--dry-run)
    echo "gpu_check: DRY RUN on the CPU (interpreter, tiny benchmark): nothing here is a GPU measurement"
else
    BUDGET="${GPU_CHECK_BUDGET_S:-295}"
    TEST_CAP=100
    unset TRITON_INTERPRET  # the point is to run the kernels natively
fi
left() { echo $((BUDGET - SECONDS)); }
clamp() { local v=$1; [ "$v" -gt "$3" ] && v=$3; [ "$v" -lt "$2" ] && v=$2; echo "$v"; }  # value min max

if [ "$DRY" != "1" ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to torch ('$PY -c \"import torch; print(torch.cuda.is_available())\"' is False)." >&2
    echo "gpu_check: run this on a GPU machine; on a CPU use TRITON_INTERPRET=1 python -m pytest -q tests/test_kernel_*.py tests/test_dispatch.py" >&2
    exit 2
fi
GIT_SHA="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
GC_OUT="$OUT" GC_ROOT="$ROOT" GC_DRY="$DRY" GC_GIT="$GIT_SHA" "$PY" - <<'EOF'
import datetime, json, os, platform
import torch
try:
    import triton
    tv = triton.__version__
except Exception as exc:  # noqa: BLE001
    tv = f"missing ({exc})"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    dev = f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB"
else:
    dev = "no CUDA device"
print(f"gpu_check: {dev}; torch {torch.__version__}, triton {tv}, python {platform.python_version()}")
env = {"device": dev if os.environ["GC_DRY"] != "1" else f"{dev} (dry run on the CPU)",
       "torch": torch.__version__, "triton": tv, "python": platform.python_version(),
       "git": os.environ["GC_GIT"], "root": os.environ["GC_ROOT"], "dry_run": os.environ["GC_DRY"] == "1",
       "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
with open(os.path.join(os.environ["GC_OUT"], "env.json"), "w") as f:
    json.dump(env, f, indent=1)
EOF

# tinytune.kernels is the top-level kernels/ directory, mapped by the package install.
# Without an install of this checkout, build a throwaway package tree of symlinks and
# run from there (the checkout's own tinytune/ must not shadow it on sys.path).
RUN_DIR="$ROOT"
if [ "$DRY" = "1" ] || ! (cd /tmp && "$PY" -c "
import os, sys, tinytune.kernels as k
sys.exit(0 if os.path.realpath(os.path.dirname(k.__file__)) == os.path.realpath('$ROOT/kernels') else 1)" 2>/dev/null); then
    SHIM="$(mktemp -d)"
    mkdir "$SHIM/tinytune"
    ln -s "$ROOT"/tinytune/*.py "$SHIM/tinytune/"
    ln -s "$ROOT/kernels" "$SHIM/tinytune/kernels"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    RUN_DIR="$SHIM"
    echo "gpu_check: using a symlinked tinytune package in $SHIM (tinytune is not installed from this checkout, or dry run)"
fi
cd "$RUN_DIR" || exit 1
"$PY" -c "import tinytune.kernels.lora_linear as m; print('gpu_check: kernels from', m.__file__)" || exit 1

status=0
tests_rc=0
echo
if [ "$DRY" = "1" ]; then echo "== 1/3 kernel + dispatch tests (interpreter: dry run) =="; else echo "== 1/3 kernel + dispatch tests (native) =="; fi
TESTS=()
for f in "$ROOT"/tests/test_kernel_*.py "$ROOT"/tests/test_dispatch.py; do
    [ "$(basename "$f")" = "test_kernel_report.py" ] && continue
    TESTS+=("$f")
done
# Natively the time goes into Triton's JIT compiles (one per specialization), so the
# tests run in parallel shards, one per CPU core (the compile cache on disk is shared
# between them). Round-robin over the collection order spreads each file's tests, and
# the end-to-end tests (appended last) one per shard: in a measurement of the kernel
# specializations each test launches (under the interpreter), 16 shards need at most
# 26 distinct ones each, fewer than 8 shards of the kernel tests alone (30).
SHARDS="${GPU_CHECK_SHARDS:-$(nproc 2>/dev/null || echo 8)}"
SHARDS=$(clamp "$SHARDS" 1 16)
T_TESTS=$(clamp $(($(left) - 180)) 30 "$TEST_CAP")
"$PY" -m pytest -q --collect-only -p no:cacheprovider --rootdir "$ROOT" "${TESTS[@]}" 2>/dev/null \
    | grep "::" > "$OUT/test_ids.txt"
NTESTS=$(wc -l < "$OUT/test_ids.txt")
echo "gpu_check: $NTESTS tests in $SHARDS shards, at most $T_TESTS s"
if [ "$NTESTS" -eq 0 ]; then
    echo "gpu_check: no tests collected:"
    "$PY" -m pytest -q --collect-only -p no:cacheprovider --rootdir "$ROOT" "${TESTS[@]}" 2>&1 | tail -n 30
    tests_rc=1
else
    PIDS=()
    for ((i = 0; i < SHARDS; i++)); do
        awk -v n="$SHARDS" -v i="$i" 'NR % n == i' "$OUT/test_ids.txt" \
            | sed -e "s|^\([^/]\)|$ROOT/\1|" > "$OUT/shard_$i.txt"
        (
            mapfile -t IDS < "$OUT/shard_$i.txt"
            if [ "${#IDS[@]}" -eq 0 ]; then echo 0 > "$OUT/shard_$i.rc"; exit 0; fi
            # SIGINT first: pytest then stops and still writes its JUnit file (partial results).
            timeout -s INT -k 5 "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" --durations=5 \
                --junitxml "$OUT/tests_$i.xml" "${IDS[@]}" > "$OUT/shard_$i.log" 2>&1
            echo $? > "$OUT/shard_$i.rc"
        ) &
        PIDS+=($!)
    done
    wait "${PIDS[@]}"  # not a bare wait: that would also wait for the log's tee
    for ((i = 0; i < SHARDS; i++)); do
        rc=$(cat "$OUT/shard_$i.rc" 2>/dev/null || echo 99)
        tail -n 1 "$OUT/shard_$i.log" 2>/dev/null | sed "s/^/shard $i: /"
        if [ "$rc" -ne 0 ]; then
            tests_rc=1
            [ "$rc" -eq 124 ] && echo "gpu_check: shard $i TIMED OUT after $T_TESTS s"
            echo "gpu_check: shard $i exit status $rc; its failures:"
            grep -E "^(FAILED|ERROR)|Error|error" "$OUT/shard_$i.log" | head -n 20
        fi
    done
    echo "gpu_check: tests $([ $tests_rc -eq 0 ] && echo passed || echo FAILED) after ${SECONDS} s (logs: $OUT/shard_*.log)"
fi
[ "$tests_rc" -ne 0 ] && status=1
T_AFTER_TESTS=$SECONDS

echo
MIXED="$ROOT/ci/gpu_bench_mixed.py"
T_MIXED=0
[ -f "$MIXED" ] && T_MIXED=60
T_BENCH=$(clamp $(($(left) - T_MIXED - 5)) 45 120)
echo "== 2/3 benchmark: merged vs unmerged vs fused (bf16, CUDA graphs; at most $T_BENCH s) =="
timeout "$T_BENCH" "$PY" "$ROOT/ci/gpu_bench.py" --deadline-s $((T_BENCH - 25)) --out "$OUT/gpu_bench.json" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"}
bench_rc=$?
echo "gpu_check: gpu_bench exit status $bench_rc$([ $bench_rc -eq 124 ] && echo ' (timed out)')"
[ "$bench_rc" -ne 0 ] && status=1

mixed_rc='"absent"'
if [ -f "$MIXED" ]; then
    T_MIXED=$(clamp "$(left)" 20 60)
    echo
    echo "== 3/3 benchmark: per-row adapters (ci/gpu_bench_mixed.py; at most $T_MIXED s) =="
    # Pass only the options that script declares (it is written separately).
    MARGS=()
    grep -q -- '"--out"' "$MIXED" && MARGS+=(--out "$OUT/gpu_bench_mixed.json")
    if [ "$DRY" = "1" ]; then
        if grep -q -- '"--dry-run"' "$MIXED"; then MARGS+=(--dry-run); else MARGS=(SKIP); fi
    fi
    if [ "${MARGS[0]:-}" = "SKIP" ]; then
        echo "gpu_check: gpu_bench_mixed.py has no --dry-run: skipped in a dry run"
        mixed_rc='"skipped"'
    else
        timeout "$T_MIXED" "$PY" "$MIXED" ${MARGS[@]+"${MARGS[@]}"}
        mixed_rc=$?
        echo "gpu_check: gpu_bench_mixed exit status $mixed_rc$([ $mixed_rc -eq 124 ] && echo ' (timed out)')"
        [ "$mixed_rc" -ne 0 ] && status=1
    fi
else
    echo
    echo "== 3/3 ci/gpu_bench_mixed.py not present: skipped =="
fi

printf '{"tests": %s, "gpu_bench": %s, "gpu_bench_mixed": %s, "status": %s, "seconds": %s, "seconds_after_tests": %s}\n' \
    "$tests_rc" "$bench_rc" "$mixed_rc" "$status" "$SECONDS" "$T_AFTER_TESTS" > "$OUT/steps.json"
echo
echo "== summary (also in $OUT/summary.md) =="
"$PY" "$ROOT/ci/gpu_summary.py" "$OUT" || echo "gpu_check: the summary failed (see above)"
echo
echo "gpu_check: done in ${SECONDS} s, exit status $status; results in $OUT"
exit $status
