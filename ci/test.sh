#!/usr/bin/env bash
# The README's test command: install (CPU torch first, so the pinned range is met
# without pulling a CUDA build), then run the whole suite. Kernels run on the CPU
# through Triton's interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
export TRITON_INTERPRET=1
python -m pytest -q tests "$@"
