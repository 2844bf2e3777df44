#!/usr/bin/env bash
# Installs llama-cpp-python, llama.cpp's Python bindings, for `perfx bench --vs llama.cpp`:
# compiled from source for this machine's CPU, which takes about 5 minutes. Needs a C++ compiler and
# CMake (e.g. apt-get install build-essential cmake).
#
#   scripts/install-llama-cpp.sh               # into .venv when there is one, else python3's environment
#   scripts/install-llama-cpp.sh --rebuild     # build again, replacing an installed copy
#   scripts/install-llama-cpp.sh --cmake-args  # print the CMake options it would build with, and stop
#   PYTHON=/path/to/python scripts/install-llama-cpp.sh
#
# The build is native (-march=native, as llama-bench's would be) except on CPUs with AMX (Intel Sapphire
# Rapids and later): there llama.cpp's AMX path crashes on any batch of 2 tokens or more (SIGSEGV in
# ggml_backend_amx_mul_mat), so the CPU's instruction sets are named one by one from /proc/cpuinfo,
# AVX-512 on and AMX off.
#
# Extra CMake options go through CMAKE_ARGS, e.g. CMAKE_ARGS="-DGGML_CUDA=on" for an NVIDIA GPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
REBUILD=()
PRINT=0
for arg in "$@"; do
    case "$arg" in
        --rebuild) REBUILD=(--force-reinstall --no-deps) ;;
        --cmake-args) PRINT=1 ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option '$arg' (use --rebuild to build again)" >&2; exit 2 ;;
    esac
done
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# The CPU's flags, as /proc/cpuinfo names them (empty elsewhere: a native build).
FLAGS=" $(grep -m1 '^flags' "${CPUINFO:-/proc/cpuinfo}" 2>/dev/null | cut -d: -f2) "
has() { [[ "$FLAGS" == *" $1 "* ]]; }
if has amx_tile; then
    ISA="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    # ggml option <- /proc/cpuinfo flag
    for pair in SSE42:sse4_2 AVX:avx AVX2:avx2 BMI2:bmi2 FMA:fma F16C:f16c AVX_VNNI:avx_vnni AVX512:avx512f \
                AVX512_VBMI:avx512_vbmi AVX512_VNNI:avx512_vnni AVX512_BF16:avx512_bf16; do
        if has "${pair#*:}"; then ISA+=" -DGGML_${pair%%:*}=ON"; else ISA+=" -DGGML_${pair%%:*}=OFF"; fi
    done
    [[ $PRINT = 1 ]] || echo "this CPU has AMX: building with its instruction sets named one by one, AMX off" >&2
else
    ISA="-DGGML_NATIVE=ON"
fi
if [[ $PRINT = 1 ]]; then echo "$ISA"; exit 0; fi

echo "building llama-cpp-python==$VERSION for $("$PYTHON" -c 'import sys; print(sys.executable)') (about 5 minutes)" >&2
CMAKE_ARGS="$ISA -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF ${CMAKE_ARGS:-}" \
    "$PYTHON" -m pip install --no-cache-dir --no-binary llama-cpp-python ${REBUILD[@]+"${REBUILD[@]}"} \
    "llama-cpp-python==$VERSION"
"$PYTHON" -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__, "installed")'
