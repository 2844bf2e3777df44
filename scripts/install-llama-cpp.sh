#!/usr/bin/env bash
# Installs llama-cpp-python, llama.cpp's Python bindings, for `perfx bench --vs llama.cpp`:
# compiled from source for this machine's CPU (a native build, as llama-bench would be), which takes
# about 5 minutes. Needs a C++ compiler and CMake (e.g. apt-get install build-essential cmake).
#
#   scripts/install-llama-cpp.sh               # into .venv when there is one, else python3's environment
#   PYTHON=/path/to/python scripts/install-llama-cpp.sh
#
# Extra CMake options go through CMAKE_ARGS, e.g. CMAKE_ARGS="-DGGML_CUDA=on" for an NVIDIA GPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
echo "building llama-cpp-python==$VERSION for $("$PYTHON" -c 'import sys; print(sys.executable)') (about 5 minutes)" >&2
CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF ${CMAKE_ARGS:-}" \
    "$PYTHON" -m pip install --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python==$VERSION"
"$PYTHON" -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__, "installed")'
