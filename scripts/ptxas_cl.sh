#!/bin/sh
# Assembles a kernel file's inline PTX for a GPU without one at hand: clang's OpenCL front end (clang-15)
# compiles kernels/FILE to NVPTX, llc writes PTX, ptxas (CUDA 13) assembles it for sm_90 as relocatable
# code (-c: the OpenCL builtins, vload_half16, fma, barrier, ..., stay external calls, there being no
# libclc for NVPTX here, so the registers it reports mean little). It checks that the inline PTX is
# valid PTX for sm_90 and counts the instructions named. NVIDIA's own OpenCL compiler compiles the real thing.
#     scripts/ptxas_cl.sh FILE "INSTRUCTION ..." -DNAME=VALUE ...
set -eu
file=$1 counted=$2
shift 2
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
kernels="$(dirname "$0")/../kernels"
clang-15 -x cl -cl-std=CL1.2 -target nvptx64-nvidia-nvcl -Xclang -finclude-default-header -O3 \
    -cl-fast-relaxed-math -cl-mad-enable -Dasm=__asm__ "$@" -I "$kernels" \
    -S -emit-llvm -o "$dir/a.ll" "$kernels/$file" 2>&1 | grep -v "warning\|^ \|^$\|generated" || true
/usr/lib/llvm-15/bin/llc -march=nvptx64 -mcpu=sm_80 -mattr=+ptx75 "$dir/a.ll" -o "$dir/a.ptx"
sed -i 's/^\.version 7\.5/.version 7.8/; s/^\.target sm_80/.target sm_90/' "$dir/a.ptx"   # llc 15 stops at sm_80
for i in $counted; do printf '%s: %s  ' "$i" "$(grep -c "$i" "$dir/a.ptx" || true)"; done
echo "in the PTX"
perl -0pi -e 's/^\.func(\s[^{;]*);/.extern .func$1;/mg' "$dir/a.ptx"         # declared builtins: external
ptxas -arch=sm_90 -c -v "$dir/a.ptx" -o "$dir/a.o" 2>&1 | grep -v "^ptxas info    : Compiling\|Compile time"
