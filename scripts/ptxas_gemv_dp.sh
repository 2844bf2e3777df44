#!/bin/sh
# Assembles kernels/gemv_dp.cl's PTX path (DP_PTX 1: prmt.b32 and dp2a by inline PTX) for a GPU without
# one at hand: clang's OpenCL front end (clang-15) compiles it to NVPTX, llc writes PTX, ptxas (CUDA 13)
# assembles it for sm_90 as relocatable code (-c: the OpenCL builtins, vload_half16, fma, barrier, ..., stay
# external calls, there being no libclc for NVPTX here, so the registers it reports mean little). It checks
# that the inline PTX is valid PTX for sm_90 and counts the instructions put in: one unrolled piece of
# DPIECE is 4 rows x 4 words x (2 prmt + 4 dp2a). NVIDIA's own OpenCL compiler compiles the real thing.
#     scripts/ptxas_gemv_dp.sh [-DVEC=4 -DG=32 -DKSPLIT=32 -DWG_ROWS=4 -DTPW=1 -DSWIGLU ...]
set -eu
defines=${*:--DVEC=4 -DG=32 -DKSPLIT=32 -DWG_ROWS=4 -DTPW=1}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
kernels="$(dirname "$0")/../kernels"
# shellcheck disable=SC2086
clang-15 -x cl -cl-std=CL1.2 -target nvptx64-nvidia-nvcl -Xclang -finclude-default-header -O3 \
    -cl-fast-relaxed-math -cl-mad-enable -Dasm=__asm__ -DFORMAT=4 -DDP_PTX=1 $defines -I "$kernels" \
    -S -emit-llvm -o "$dir/a.ll" "$kernels/gemv_dp.cl" 2>&1 | grep -v "warning\|^ \|^$\|generated" || true
/usr/lib/llvm-15/bin/llc -march=nvptx64 -mcpu=sm_80 -mattr=+ptx75 "$dir/a.ll" -o "$dir/a.ptx"
sed -i 's/^\.version 7\.5/.version 7.8/; s/^\.target sm_80/.target sm_90/' "$dir/a.ptx"   # llc 15 stops at sm_80
echo "dp2a: $(grep -c dp2a "$dir/a.ptx"), prmt: $(grep -c prmt.b32 "$dir/a.ptx"), shfl.sync: $(grep -c shfl.sync "$dir/a.ptx") in the PTX"
perl -0pi -e 's/^\.func(\s[^{;]*);/.extern .func$1;/mg' "$dir/a.ptx"         # declared builtins: external
ptxas -arch=sm_90 -c -v "$dir/a.ptx" -o "$dir/a.o" 2>&1 | grep -v "^ptxas info    : Compiling\|Compile time"
