#!/usr/bin/env bash
# The GPU check of the fused kernels, ready to run unchanged on a CUDA machine lent for a
# few minutes (torch 2.11 + triton 3.6 or today's versions, no network, nothing to install):
#
#     bash ci/gpu_check.sh [--quick | --full | --smoke] [OUT_DIR]   # from anywhere
#
# --quick (the default) stays within 5 minutes (GPU_CHECK_BUDGET_S, default 295 s);
# --full runs every benchmark point (up to 10 minutes); --smoke runs a handful of tests
# and the smallest benchmarks (a check of the script; the test command runs it with
# GPU_CHECK_DRY_RUN=1).
# 1. the tests, natively (no TRITON_INTERPRET), in parallel shards: the kernel tests
#    tests/test_kernel_*.py except the compile report's test (a CPU-only, ahead-of-time
#    check), the end-to-end dispatch tests tests/test_dispatch.py and the CUDA-graph
#    serving tests tests/test_row_adapters.py (capture, 3 assignments, 1 hot-swap);
# 2. the benchmark table (ci/gpu_bench.py): merged / unmerged / fused, CUDA graphs;
# 3. ci/gpu_bench_mixed.py (per-row adapters);
# 4. the summary (ci/gpu_summary.py), rewritten after every step (partial results).
# OUT_DIR (default ./gpu_check_out) ends with at most 8 files, as few come back from a
# lent machine: summary.md (read it first), env.json, steps.json (exit status per step),
# gpu_bench.json, gpu_bench_mixed.json, tests.xml (JUnit, the shards' merged),
# test_ids.txt and gpu_check.log (all output, the shards' logs included). While the tests
# run, the shards write to OUT_DIR/shards/, merged and removed when they end.
# Exit status: 0 all passed and all targets met, 1 something failed or missed, 2 no GPU
# or no usable Python.
#
# The interpreter: $PYTHON, else python, else python3 (said in the log).
# GPU_CHECK_DRY_RUN=1 checks this script itself on a CPU machine: the same steps through
# Triton's interpreter, the benchmarks with --dry-run (tiny shapes).
set -u
DRY="${GPU_CHECK_DRY_RUN:-0}"
MODE=quick
OUT=""
for arg in "$@"; do
    case "$arg" in
        --quick | --full | --smoke) MODE="${arg#--}" ;;
        -h | --help) sed -n '2,/^set -u/p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu_check: unknown option $arg (--quick, --full, --smoke, --help)" >&2; exit 2 ;;
        *) OUT="$arg" ;;
    esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT" || exit 1
OUT="$(cd "$OUT" && pwd)"  # absolute: the shards run from another directory
# Results of an earlier run must not be mistaken for this run's.
rm -rf "$OUT"/shards "$OUT"/tests.xml "$OUT"/test_ids.txt "$OUT"/gpu_bench.json \
    "$OUT"/gpu_bench_mixed.json "$OUT"/env.json "$OUT"/steps.json "$OUT"/summary.md
# Everything printed also goes to OUT_DIR/gpu_check.log.
exec > >(tee "$OUT/gpu_check.log") 2>&1
TEE_PID=$!
# On exit, let tee write the last lines before the script's own exit (whoever runs it
# may stop reading when it exits).
cleanup() {
    exec 1>&- 2>&-
    wait "$TEE_PID" 2>/dev/null
}
trap cleanup EXIT

if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"; why="\$PYTHON"
elif command -v python >/dev/null 2>&1; then
    PY=python; why="python on PATH"
elif command -v python3 >/dev/null 2>&1; then
    PY=python3; why="no python on PATH; python3"
else
    echo "gpu_check: neither python nor python3 is on PATH; set PYTHON=/path/to/python" >&2
    exit 2
fi
echo "gpu_check: interpreter $(command -v "$PY" || echo "$PY") ($why)"
if ! "$PY" -c "import torch, pytest" 2>/dev/null; then
    echo "gpu_check: $PY cannot import torch and pytest:" >&2
    "$PY" -c "import torch, pytest" 2>&1 | tail -n 3 >&2
    echo "gpu_check: set PYTHON to the interpreter that has them" >&2
    exit 2
fi

BENCH_ARGS=()
MIXED_ARGS=()
case "$MODE" in
    quick) BENCH_ARGS=(--quick); MIXED_ARGS=(--rounds 7) ;;
    smoke) BENCH_ARGS=(--quick); MIXED_ARGS=(--rounds 1) ;;
esac
if [ "$DRY" = "1" ]; then
    BUDGET="${GPU_CHECK_BUDGET_S:-3600}"  # the interpreter is slow; nothing is measured
    TEST_CAP=900
    export TRITON_INTERPRET=1
    BENCH_ARGS+=(--dry-run)
    MIXED_ARGS+=(--dry-run)
    echo "gpu_check: DRY RUN on the CPU (interpreter, tiny benchmark): nothing here is a GPU measurement"
else
    BUDGET="${GPU_CHECK_BUDGET_S:-$([ "$MODE" = full ] && echo 590 || echo 295)}"
    TEST_CAP=$([ "$MODE" = full ] && echo 200 || echo 100)
    unset TRITON_INTERPRET  # the point is to run the kernels natively
fi
echo "gpu_check: mode $MODE, budget $BUDGET s"
left() { echo $((BUDGET - SECONDS)); }
clamp() { local v=$1; [ "$v" -gt "$3" ] && v=$3; [ "$v" -lt "$2" ] && v=$2; echo "$v"; }  # value min max

if [ "$DRY" != "1" ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
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

# Run from the checkout: tinytune/kernels is a symlink to the top-level kernels/ folder,
# so the checkout's own package is complete, installed or not.
cd "$ROOT" || exit 1
"$PY" -c "
import os, sys, tinytune.kernels.lora_linear as m
print('gpu_check: kernels from', m.__file__)
sys.exit(0 if os.path.realpath(os.path.dirname(m.__file__)) == os.path.realpath('kernels') else 1)" || {
    echo "gpu_check: tinytune.kernels does not come from this checkout's kernels/ (is tinytune/kernels a symlink?)"; exit 1; }
summary() {  # partial results: the summary as it stands (steps.json so far)
    "$PY" "$ROOT/ci/gpu_summary.py" "$OUT" > /dev/null || echo "gpu_check: the summary failed"
}
steps() {
    printf '{"mode": "%s", "tests": %s, "gpu_bench": %s, "gpu_bench_mixed": %s, "status": %s, "seconds": %s, "seconds_after_tests": %s}\n' \
        "$MODE" "$tests_rc" "$bench_rc" "$mixed_rc" "$status" "$SECONDS" "$T_AFTER_TESTS" > "$OUT/steps.json"
    summary
}

status=0
tests_rc='"running"'
bench_rc='"not run"'
mixed_rc='"not run"'
T_AFTER_TESTS=null
steps
echo
if [ "$DRY" = "1" ]; then echo "== 1/3 kernel + dispatch tests (interpreter: dry run) =="; else echo "== 1/3 kernel + dispatch tests (native) =="; fi
TESTS=()
# test_row_adapters.py: CUDA-graph capture of a whole forward, replayed after each
# set_row_adapters() and a hot-swap (and reduce-overhead compile with real graphs).
for f in tests/test_kernel_*.py tests/test_dispatch.py tests/test_row_adapters.py; do
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
"$PY" -m pytest -q --collect-only -p no:cacheprovider "${TESTS[@]}" 2>/dev/null | grep "::" > "$OUT/test_ids.txt"
if [ "$MODE" = smoke ]; then  # the first test of each file, one shard
    awk -F'::' '!seen[$1]++' "$OUT/test_ids.txt" > "$OUT/test_ids.tmp" && mv "$OUT/test_ids.tmp" "$OUT/test_ids.txt"
    SHARDS=1
fi
NTESTS=$(wc -l < "$OUT/test_ids.txt")
echo "gpu_check: $NTESTS tests in $SHARDS shards, at most $T_TESTS s"
tests_rc=0
SH="$OUT/shards"
mkdir -p "$SH"
if [ "$NTESTS" -eq 0 ]; then
    echo "gpu_check: no tests collected:"
    "$PY" -m pytest -q --collect-only -p no:cacheprovider "${TESTS[@]}" 2>&1 | tail -n 30
    tests_rc=1
else
    PIDS=()
    for ((i = 0; i < SHARDS; i++)); do
        awk -v n="$SHARDS" -v i="$i" 'NR % n == i' "$OUT/test_ids.txt" > "$SH/shard_$i.txt"
        (
            mapfile -t IDS < "$SH/shard_$i.txt"
            if [ "${#IDS[@]}" -eq 0 ]; then echo 0 > "$SH/shard_$i.rc"; exit 0; fi
            # SIGINT first: pytest then stops and still writes its JUnit file (partial results).
            timeout -s INT -k 5 "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider --durations=5 \
                --junitxml "$SH/tests_$i.xml" "${IDS[@]}" > "$SH/shard_$i.log" 2>&1
            echo $? > "$SH/shard_$i.rc"
        ) &
        PIDS+=($!)
    done
    wait "${PIDS[@]}"  # not a bare wait: that would also wait for the log's tee
    for ((i = 0; i < SHARDS; i++)); do
        rc=$(cat "$SH/shard_$i.rc" 2>/dev/null || echo 99)
        tail -n 1 "$SH/shard_$i.log" 2>/dev/null | sed "s/^/shard $i: /"
        if [ "$rc" -ne 0 ]; then
            tests_rc=1
            [ "$rc" -eq 124 ] && echo "gpu_check: shard $i TIMED OUT after $T_TESTS s"
            echo "gpu_check: shard $i exit status $rc; its failures:"
            grep -E "^(FAILED|ERROR)|Error|error" "$SH/shard_$i.log" | head -n 20
        fi
    done
    # Few files come back from a lent machine: the shards' JUnit files become one
    # tests.xml, and their logs go into this log.
    "$PY" - "$SH" "$OUT/tests.xml" <<'PYEOF'
import sys, xml.etree.ElementTree as ET
from pathlib import Path
merged = ET.Element("testsuites")
for f in sorted(Path(sys.argv[1]).glob("tests_*.xml")):
    try:
        root = ET.parse(f).getroot()
    except Exception as exc:  # its tests are then reported as without a result
        print(f"gpu_check: unreadable JUnit file {f.name}: {exc}")
        continue
    merged.extend(root.iter("testsuite") if root.tag == "testsuites" else [root])
ET.ElementTree(merged).write(sys.argv[2], encoding="utf-8", xml_declaration=True)
PYEOF
    for ((i = 0; i < SHARDS; i++)); do
        echo "---- shard $i log ----"
        cat "$SH/shard_$i.log" 2>/dev/null
    done
    echo "gpu_check: tests $([ $tests_rc -eq 0 ] && echo passed || echo FAILED) after ${SECONDS} s"
fi
[ -f "$OUT/tests.xml" ] && rm -rf "$SH"
[ "$tests_rc" -ne 0 ] && status=1
T_AFTER_TESTS=$SECONDS
steps

echo
T_MIXED=$([ "$MODE" = full ] && echo 120 || echo 60)
T_BENCH=$(clamp $(($(left) - T_MIXED - 5)) 45 "$([ "$MODE" = full ] && echo 300 || echo 120)")
echo "== 2/3 benchmark: merged vs unmerged vs fused (bf16, CUDA graphs; at most $T_BENCH s) =="
timeout "$T_BENCH" "$PY" ci/gpu_bench.py --deadline-s $((T_BENCH - 25)) --out "$OUT/gpu_bench.json" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"}
bench_rc=$?
echo "gpu_check: gpu_bench exit status $bench_rc$([ $bench_rc -eq 124 ] && echo ' (timed out)')"
[ "$bench_rc" -ne 0 ] && status=1
steps

T_MIXED=$(clamp "$(left)" 20 "$T_MIXED")
echo
echo "== 3/3 benchmark: per-row adapters (ci/gpu_bench_mixed.py; at most $T_MIXED s) =="
timeout "$T_MIXED" "$PY" ci/gpu_bench_mixed.py --out "$OUT/gpu_bench_mixed.json" ${MIXED_ARGS[@]+"${MIXED_ARGS[@]}"}
mixed_rc=$?
echo "gpu_check: gpu_bench_mixed exit status $mixed_rc$([ $mixed_rc -eq 124 ] && echo ' (timed out)')"
[ "$mixed_rc" -ne 0 ] && status=1
steps

echo
echo "== summary (also in $OUT/summary.md) =="
cat "$OUT/summary.md" 2>/dev/null || echo "gpu_check: no summary (see above)"
echo
echo "gpu_check: done in ${SECONDS} s, exit status $status; results in $OUT ($(ls "$OUT" | wc -l) files)"
exit $status
