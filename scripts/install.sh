#!/usr/bin/env bash
# Installs unigist and everything its tests need on a fresh Debian machine
# (root or sudo for the one system package, GoogleTest). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! [ -e /usr/lib/x86_64-linux-gnu/cmake/GTest ] && ! [ -e /usr/lib/cmake/GTest ] && ! [ -e /usr/lib/aarch64-linux-gnu/cmake/GTest ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libgtest-dev cmake ninja-build >/dev/null
fi

# torch first: the extension builds against the installed torch (no build isolation).
$PY -m pip install -q "torch>=2.6,<=2.14.1" setuptools wheel ninja pybind11
# transformers: the range the tests pass on (see pyproject.toml); peft for tests/test_hf_peft.py.
$PY -m pip install -q "transformers>=5.17,<5.40" accelerate "peft>=0.21" tqdm matplotlib pytest nbclient nbformat ipykernel

start=$(date +%s)
MAX_JOBS=${MAX_JOBS:-2} $PY -m pip install -q --no-build-isolation --no-deps -e .
echo "unigist build: $(( $(date +%s) - start )) s (MAX_JOBS=${MAX_JOBS:-2}, cuda kernels: $($PY -c 'import unigist; print(unigist.has_cuda_kernels())'))"
