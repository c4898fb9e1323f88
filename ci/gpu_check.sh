#!/usr/bin/env bash
# The GPU check of the fused kernels, ready to run unchanged on a CUDA machine
# (made for an H200 with torch 2.11 + triton 3.6, no network, nothing to install):
#
#     bash ci/gpu_check.sh [OUT_DIR]        # from anywhere; about 2-4 minutes
#
# 1. the kernel tests, natively (no TRITON_INTERPRET): tests/test_kernel_*.py except the
#    compile report's test (a CPU-only, ahead-of-time check);
# 2. the benchmark table (ci/gpu_bench.py): merged / unmerged / fused, CUDA graphs;
# 3. ci/gpu_bench_mixed.py (per-row adapters) if present.
# Results land in OUT_DIR (default: ./gpu_check_out). Exit status: 0 all passed and all
# targets met, 1 something failed or missed, 2 no GPU.
#
# GPU_CHECK_DRY_RUN=1 checks this script itself on a CPU machine: the same steps through
# Triton's interpreter, the benchmark with --dry-run (tiny shapes), the symlinked package.
set -u
DRY="${GPU_CHECK_DRY_RUN:-0}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/gpu_check_out}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
BENCH_ARGS=()
if [ "$DRY" = "1" ]; then
    export TRITON_INTERPRET=1
    BENCH_ARGS=(--dry-run)
    echo "gpu_check: DRY RUN on the CPU (interpreter, tiny benchmark): nothing here is a GPU measurement"
else
    unset TRITON_INTERPRET  # the point is to run the kernels natively
fi

if [ "$DRY" != "1" ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to torch ('$PY -c \"import torch; print(torch.cuda.is_available())\"' is False)." >&2
    echo "gpu_check: run this on a GPU machine; on a CPU use TRITON_INTERPRET=1 python -m pytest -q tests/test_kernel_*.py" >&2
    exit 2
fi
"$PY" - <<'EOF'
import torch, platform
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
EOF

# tinytune.kernels is the top-level kernels/ directory, mapped by the package install.
# Without an install of this checkout, build a throwaway package tree of symlinks and
# run from there (the checkout's own tinytune/ must not shadow it on sys.path).
RUN_DIR="$ROOT"
if [ "$DRY" = "1" ] || ! (cd /tmp && "$PY" -c "
import os, sys, tinytune.kernels as k
sys.exit(0 if os.path.realpath(os.path.dirname(k.__file__)) == os.path.realpath('$ROOT/kernels') else 1)" 2>/dev/null); then
    SHIM="$(mktemp -d)"
    trap 'rm -rf "$SHIM"' EXIT
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
echo
if [ "$DRY" = "1" ]; then echo "== 1/3 kernel tests (interpreter: dry run) =="; else echo "== 1/3 kernel tests (native) =="; fi
TESTS=()
for f in "$ROOT"/tests/test_kernel_*.py; do
    [ "$(basename "$f")" = "test_kernel_report.py" ] && continue
    TESTS+=("$f")
done
# Natively the time goes into Triton's JIT compiles (one per specialization), so the
# tests run in parallel shards (the compile cache on disk is shared between them).
SHARDS="${GPU_CHECK_SHARDS:-8}"
"$PY" -m pytest -q --collect-only -p no:cacheprovider --rootdir "$ROOT" "${TESTS[@]}" 2>/dev/null \
    | grep "::" > "$OUT/test_ids.txt"
NTESTS=$(wc -l < "$OUT/test_ids.txt")
echo "gpu_check: $NTESTS tests in $SHARDS shards"
if [ "$NTESTS" -eq 0 ]; then
    echo "gpu_check: no kernel tests collected:"
    "$PY" -m pytest -q --collect-only -p no:cacheprovider --rootdir "$ROOT" "${TESTS[@]}" 2>&1 | tail -n 30
    status=1
else
    for ((i = 0; i < SHARDS; i++)); do
        awk -v n="$SHARDS" -v i="$i" 'NR % n == i' "$OUT/test_ids.txt" \
            | sed -e "s|^\([^/]\)|$ROOT/\1|" > "$OUT/shard_$i.txt"
        (
            mapfile -t IDS < "$OUT/shard_$i.txt"
            if [ "${#IDS[@]}" -eq 0 ]; then echo 0 > "$OUT/shard_$i.rc"; exit 0; fi
            timeout 220 "$PY" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" \
                --junitxml "$OUT/kernel_tests_$i.xml" "${IDS[@]}" > "$OUT/shard_$i.log" 2>&1
            echo $? > "$OUT/shard_$i.rc"
        ) &
    done
    wait
    for ((i = 0; i < SHARDS; i++)); do
        rc=$(cat "$OUT/shard_$i.rc" 2>/dev/null || echo 99)
        tail -n 1 "$OUT/shard_$i.log" 2>/dev/null | sed "s/^/shard $i: /"
        if [ "$rc" -ne 0 ]; then
            status=1
            echo "gpu_check: shard $i exit status $rc; its failures:"
            grep -E "^(FAILED|ERROR)|Error|error" "$OUT/shard_$i.log" | head -n 20
        fi
    done
    echo "gpu_check: kernel tests $([ $status -eq 0 ] && echo passed || echo FAILED) (logs: $OUT/shard_*.log)"
fi

echo
echo "== 2/3 benchmark: merged vs unmerged vs fused (bf16, CUDA graphs) =="
timeout 240 "$PY" "$ROOT/ci/gpu_bench.py" --out "$OUT/gpu_bench.json" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"}
rc=$?
echo "gpu_check: gpu_bench exit status $rc"
[ "$rc" -ne 0 ] && status=1

MIXED="$ROOT/ci/gpu_bench_mixed.py"
if [ -f "$MIXED" ]; then
    echo
    echo "== 3/3 benchmark: per-row adapters (ci/gpu_bench_mixed.py) =="
    # Pass only the options that script declares (it is written separately).
    MARGS=()
    grep -q -- '"--out"' "$MIXED" && MARGS+=(--out "$OUT/gpu_bench_mixed.json")
    if [ "$DRY" = "1" ]; then
        if grep -q -- '"--dry-run"' "$MIXED"; then MARGS+=(--dry-run); else MARGS=(SKIP); fi
    fi
    if [ "${MARGS[0]:-}" = "SKIP" ]; then
        echo "gpu_check: gpu_bench_mixed.py has no --dry-run: skipped in a dry run"
    else
        timeout 200 "$PY" "$MIXED" ${MARGS[@]+"${MARGS[@]}"}
        rc=$?
        echo "gpu_check: gpu_bench_mixed exit status $rc"
        [ "$rc" -ne 0 ] && status=1
    fi
else
    echo
    echo "== 3/3 ci/gpu_bench_mixed.py not present: skipped =="
fi

echo
echo "gpu_check: done, exit status $status; results in $OUT"
exit $status
