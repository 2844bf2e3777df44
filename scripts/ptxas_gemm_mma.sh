#!/bin/sh
# Assembles kernels/gemm_mma.cl's PTX paths for a GPU without one at hand, one line per variant of its
# pipeline (gemm_mma.cl's header): clang's OpenCL front end (clang-15) compiles it to NVPTX with the few
# OpenCL builtins it calls defined below (no libclc), llc writes PTX, ptxas (CUDA 13) assembles it for
# sm_90 and reports registers, spills and shared memory. NVIDIA's own OpenCL compiler may allocate
# differently; this checks the inline PTX and the register budget (2 work-groups of 256 work-items per
# SM need at most 128 registers: a third field of a variant gives ptxas options, such as -maxrregcount 128,
# what NVIDIA's OpenCL takes as -cl-nv-maxrregcount=128, the mma_maxrreg parameter).
# Instruction counts are those of the PTX: the stage loop is not unrolled, so mma.sync and ldmatrix
# appear once per stage (the loop's body); lop3 (half2 dequantization) once per plane and W item in each
# of the 128- and 64-chunk branches of the store, and with two buffers again in the first stage's store.
#     scripts/ptxas_gemm_mma.sh                    # the variants below, 128 x 128 tiles, warps of 32 x 64
#     PTX_OUT=a.ptx scripts/ptxas_gemm_mma.sh -DBN=128 -DBT=128 -DWM=32 -DWN=64 -DKS=32 -DBUFS=2 -DWORDS_ONCE=1 -DDEQ_H2=1 -DLDSM=1
# (PTX_OUT: where to keep the last variant's PTX.)
set -eu
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
kernels="$(dirname "$0")/../kernels"
cat > "$dir/a.cl" <<'CL'
#define OVL __attribute__((overloadable))
#define PTX_SREG(name, d) (d == 0 ? name##_x() : d == 1 ? name##_y() : name##_z())
size_t OVL get_local_id(uint d) { return PTX_SREG(__nvvm_read_ptx_sreg_tid, d); }
size_t OVL get_group_id(uint d) { return PTX_SREG(__nvvm_read_ptx_sreg_ctaid, d); }
size_t OVL get_global_id(uint d)
{ return PTX_SREG(__nvvm_read_ptx_sreg_ctaid, d) * PTX_SREG(__nvvm_read_ptx_sreg_ntid, d) + PTX_SREG(__nvvm_read_ptx_sreg_tid, d); }
void OVL barrier(cl_mem_fence_flags f) { __asm__ volatile("bar.sync 0;" ::: "memory"); }
int OVL min(int a, int b) { return a < b ? a : b; }
float OVL exp(float x) { return __nvvm_ex2_approx_f(1.44269504f * x); }
float OVL tanh(float x) { return 1.0f - 2.0f / (exp(2.0f * x) + 1.0f); }
float2 OVL fma(float2 a, float2 b, float2 c) { return (float2)(__builtin_fmaf(a.x, b.x, c.x), __builtin_fmaf(a.y, b.y, c.y)); }
float2 OVL convert_float2(uint2 v) { return (float2)((float)v.x, (float)v.y); }
uint2 OVL vload2(size_t i, const __global uint *p) { return *(const __global uint2 *)(p + 2 * i); }
uint4 OVL vload4(size_t i, const __global uint *p) { return *(const __global uint4 *)(p + 4 * i); }
float4 OVL vload4(size_t i, const __global float *p) { return *(const __global float4 *)(p + 4 * i); }
void OVL vstore4(uint4 v, size_t i, __local uint *p) { *(__local uint4 *)(p + 4 * i) = v; }
float h2f(ushort u) { float r; __asm__("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(u)); return r; }
float OVL vload_half(size_t i, const __global half *p) { return h2f(((const __global ushort *)p)[i]); }
void OVL vstore_half2_rte(float2 v, size_t i, __local half *p)
{ __local ushort *u = (__local ushort *)p; u[2 * i] = __nvvm_f2h_rn(v.x); u[2 * i + 1] = __nvvm_f2h_rn(v.y); }
void OVL vstore_half4_rte(float4 v, size_t i, __global half *p)
{ __global ushort *u = (__global ushort *)p + 4 * i; u[0] = __nvvm_f2h_rn(v.x); u[1] = __nvvm_f2h_rn(v.y);
  u[2] = __nvvm_f2h_rn(v.z); u[3] = __nvvm_f2h_rn(v.w); }
CL
cat "$kernels/gemm_mma.cl" >> "$dir/a.cl"

tile="-DBN=128 -DBT=128 -DWM=32 -DWN=64 -DG=32"
plain="-DKS=64 -DBUFS=1 -DWORDS_ONCE=0 -DDEQ_H2=0 -DLDSM=0"
all="-DKS=32 -DBUFS=2 -DWORDS_ONCE=1 -DDEQ_H2=1 -DLDSM=1"
if [ $# -gt 0 ]; then
    variants="given|$*|"
else
    variants="shipped (KS 64, one buffer, f32 dequantization, 32-bit loads)|$tile $plain
KS 32, two buffers|$tile -DKS=32 -DBUFS=2 -DWORDS_ONCE=0 -DDEQ_H2=0 -DLDSM=0
KS 32, two buffers, words once|$tile -DKS=32 -DBUFS=2 -DWORDS_ONCE=1 -DDEQ_H2=0 -DLDSM=0
half2 dequantization|$tile -DKS=64 -DBUFS=1 -DWORDS_ONCE=0 -DDEQ_H2=1 -DLDSM=0
ldmatrix (address by isspacep)|$tile -DKS=64 -DBUFS=1 -DWORDS_ONCE=0 -DDEQ_H2=0 -DLDSM=1
ldmatrix (the pointer's value)|$tile -DKS=64 -DBUFS=1 -DWORDS_ONCE=0 -DDEQ_H2=0 -DLDSM=2
ldmatrix (cvta.to.shared)|$tile -DKS=64 -DBUFS=1 -DWORDS_ONCE=0 -DDEQ_H2=0 -DLDSM=3
shipped, at most 128 registers|$tile $plain|-maxrregcount 128
all: KS 32, two buffers, words once, half2, ldmatrix|$tile $all
all, at most 128 registers|$tile $all|-maxrregcount 128
all, SwiGLU, at most 128 registers|$tile $all -DSWIGLU|-maxrregcount 128
all, warps of 32 x 32 (16 warps)|-DBN=128 -DBT=128 -DWM=32 -DWN=32 -DG=32 $all
all, G 128|-DBN=128 -DBT=128 -DWM=32 -DWN=64 -DG=128 $all
all, 128 x 64 tiles of 4 warps|-DBN=128 -DBT=64 -DWM=32 -DWN=64 -DG=32 $all
all, 256 x 64 tiles of 8 warps, one buffer|-DBN=256 -DBT=64 -DWM=64 -DWN=32 -DG=32 -DKS=32 -DBUFS=1 -DWORDS_ONCE=1 -DDEQ_H2=1 -DLDSM=1
all, 128 x 256 tiles of 8 warps, one buffer|-DBN=128 -DBT=256 -DWM=64 -DWN=64 -DG=32 -DKS=32 -DBUFS=1 -DWORDS_ONCE=1 -DDEQ_H2=1 -DLDSM=1"
fi

echo "| variant | registers | stack, spills st/ld (bytes) | shared bytes | mma.sync | ldmatrix | lop3 | prmt | fma.rn.f16x2 | cvt.rn.f16.f32 |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
echo "$variants" | while IFS='|' read -r name defines options; do
    # shellcheck disable=SC2086
    clang-15 -x cl -cl-std=CL1.2 -target nvptx64-nvidia-nvcl -Xclang -finclude-default-header -O3 \
        -cl-fast-relaxed-math -cl-mad-enable -Dasm=__asm__ -DMMA=1 $defines -I "$kernels" \
        -S -emit-llvm -o "$dir/a.ll" "$dir/a.cl" 2>&1 | grep -v "warning\|^ \|^$\|generated" || true
    /usr/lib/llvm-15/bin/llc -march=nvptx64 -mcpu=sm_80 -mattr=+ptx75 "$dir/a.ll" -o "$dir/a.ptx"
    sed -i 's/^\.version 7\.5/.version 7.8/; s/^\.target sm_80/.target sm_90/' "$dir/a.ptx"   # llc 15 stops at sm_80
    if [ -n "${PTX_OUT:-}" ]; then cp "$dir/a.ptx" "$PTX_OUT"; fi
    # shellcheck disable=SC2086
    if ! ptxas -arch=sm_90 -v $options "$dir/a.ptx" -o "$dir/a.cubin" > "$dir/log" 2>&1; then
        echo "| $name | does not assemble: $(grep -m1 error "$dir/log" | cut -c1-100) |"
        continue
    fi
    info=$(grep -A2 "for gemm_mma" "$dir/log" | tr '\n' ' ')
    regs=$(echo "$info" | sed -n 's/.*Used \([0-9]*\) registers.*/\1/p')
    smem=$(echo "$info" | sed -n 's/.* \([0-9]*\) bytes smem.*/\1/p')
    spill=$(echo "$info" | sed -n 's/.* \([0-9]*\) bytes stack frame, \([0-9]*\) bytes spill stores, \([0-9]*\) bytes spill loads.*/\1, \2\/\3/p')
    n() { grep -c "$1" "$dir/a.ptx" || true; }
    echo "| $name | $regs | $spill | $smem | $(n mma.sync) | $(n ldmatrix) | $(n lop3.b32) | $(n prmt.b32) | $(n fma.rn.f16x2) | $(n 'cvt.rn.f16.f32') |"
done
