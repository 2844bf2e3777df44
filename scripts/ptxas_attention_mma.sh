#!/bin/sh
# Assembles kernels/attention_mma.cl's PTX path for a GPU without one at hand: clang's OpenCL front end
# (clang-15) compiles it to NVPTX with the few OpenCL builtins it calls defined below (no libclc), llc
# writes PTX, ptxas (CUDA 13) assembles it for sm_90 and reports registers, spills and shared memory.
# NVIDIA's own OpenCL compiler may allocate differently; this checks the inline PTX and the register budget.
#     scripts/ptxas_attention_mma.sh [-DHEAD_DIM=128 -DN_KV_HEADS=32 -DGROUP=1 -DWARPS=4 -DBK=64 ...]
set -eu
defines=${*:--DHEAD_DIM=128 -DN_KV_HEADS=32 -DGROUP=1 -DWARPS=4 -DBK=64}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cat > "$dir/a.cl" <<'CL'
#define OVL __attribute__((overloadable))
#define PTX_SREG(name, d) (d == 0 ? name##_x() : d == 1 ? name##_y() : name##_z())
size_t OVL get_local_id(uint d) { return PTX_SREG(__nvvm_read_ptx_sreg_tid, d); }
size_t OVL get_group_id(uint d) { return PTX_SREG(__nvvm_read_ptx_sreg_ctaid, d); }
size_t OVL get_num_groups(uint d) { return PTX_SREG(__nvvm_read_ptx_sreg_nctaid, d); }
void OVL barrier(cl_mem_fence_flags f) { __asm__ volatile("bar.sync 0;" ::: "memory"); }
float2 OVL mad(float2 a, float2 b, float2 c) { return a * b + c; }
float OVL exp2(float x) { return __nvvm_ex2_approx_f(x); }
float OVL fmax(float a, float b) { return __builtin_fmaxf(a, b); }
float OVL rsqrt(float a) { return __nvvm_rsqrt_approx_f(a); }
int OVL max(int a, int b) { return a > b ? a : b; }
int OVL min(int a, int b) { return a < b ? a : b; }
float2 OVL vload2(size_t i, const __global float *p) { return (float2)(p[2 * i], p[2 * i + 1]); }
void OVL vstore2(float2 v, size_t i, __global float *p) { p[2 * i] = v.x; p[2 * i + 1] = v.y; }
float h2f(ushort u) { float r; __asm__("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(u)); return r; }
float2 OVL vload_half2(size_t i, const __global half *p)
{ const __global ushort *u = (const __global ushort *)p; return (float2)(h2f(u[2 * i]), h2f(u[2 * i + 1])); }
#define STORE_HALF2(space) void OVL vstore_half2_rte(float2 v, size_t i, space half *p) \
    { space ushort *u = (space ushort *)p; u[2 * i] = __nvvm_f2h_rn(v.x); u[2 * i + 1] = __nvvm_f2h_rn(v.y); }
STORE_HALF2(__global)
STORE_HALF2(__local)
STORE_HALF2(__private)
CL
cat "$(dirname "$0")/../kernels/attention_mma.cl" >> "$dir/a.cl"
# shellcheck disable=SC2086
clang-15 -x cl -cl-std=CL1.2 -target nvptx64-nvidia-nvcl -Xclang -finclude-default-header -O3 \
    -cl-fast-relaxed-math -cl-mad-enable -Dasm=__asm__ -DMMA=1 $defines -I "$(dirname "$0")/../kernels" -S -emit-llvm -o "$dir/a.ll" "$dir/a.cl" 2>&1 \
    | grep -v "warning\|^ \|^$\|generated" || true
/usr/lib/llvm-15/bin/llc -march=nvptx64 -mcpu=sm_80 -mattr=+ptx75 "$dir/a.ll" -o "$dir/a.ptx"
sed -i 's/^\.version 7\.5/.version 7.8/; s/^\.target sm_80/.target sm_90/' "$dir/a.ptx"   # llc 15 stops at sm_80
echo "mma.sync: $(grep -c 'mma.sync' "$dir/a.ptx"), shfl.sync: $(grep -c 'shfl.sync' "$dir/a.ptx") in the PTX"
ptxas -arch=sm_90 -v "$dir/a.ptx" -o "$dir/a.cubin" 2>&1 | grep -v "^ptxas info    : Compiling\|Compile time"
