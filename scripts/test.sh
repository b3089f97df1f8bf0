#!/usr/bin/env bash
# Runs every CPU test: the GoogleTest suite of csrc/layout.h, then pytest.
# GPU tests are deselected here (run them on a GPU machine with `pytest -m cuda`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
cmake -S tests/cpp -B build/cpp -G Ninja >/dev/null
cmake --build build/cpp
ctest --test-dir build/cpp --output-on-failure
$PY -m pytest -m "not cuda" tests "$@"
