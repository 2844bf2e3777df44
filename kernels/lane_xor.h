// Butterfly exchange of the GEMV's K-split partial sums (gemv_kernel.h LANE_XOR): LANE_XOR(v, m) is
// work-item ks ^ m's v, for the KSPLIT work-items of one row of the work-group (KSPLIT <= 32, a power
// of two; with local id (ks, lr) they are consecutive lanes of one warp).
//   LANE_PTX 1  shfl.sync.bfly by NVIDIA inline PTX (sm_70 and later): no local memory, no barrier;
//               every lane of the warp takes part, so KSPLIT * WG_ROWS fills whole warps
//   LANE_PTX 0  emulated through local memory (part[lr][0] of gemv_kernel.h, KSPLIT floats), two
//               barriers per exchange: CPUs check the same reduction order without the instruction
// Included by gemv_dp.cl and by gemv.cl (gemv_reduce "shfl" / "xor").

#ifndef LANE_XOR_H
#define LANE_XOR_H
#if KSPLIT <= 32
#if LANE_PTX
#if (KSPLIT * WG_ROWS) % 32
#error "shfl.sync: KSPLIT * WG_ROWS must fill whole warps (a multiple of 32)"
#endif
inline float shfl_bfly(float v, int m)
{
    uint d;
    asm volatile("shfl.sync.bfly.b32 %0, %1, %2, 0x1f, 0xffffffff;" : "=r"(d) : "r"(as_uint(v)), "r"(m));
    return as_float(d);
}
#define LANE_XOR(v, m) shfl_bfly(v, m)
#else
inline float exchange(float v, int m, __local float* ex, int ks)
{
    barrier(CLK_LOCAL_MEM_FENCE);
    ex[ks] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    return ex[ks ^ m];
}
#define LANE_XOR(v, m) exchange(v, m, part[lr][0], ks)
#endif
#endif
#endif
