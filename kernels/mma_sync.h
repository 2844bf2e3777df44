/* NVIDIA's warp-wide matrix instructions by inline PTX (sm_80 and later), and their emulation by ordinary
   arithmetic (MMA = 0), shared by gemm_mma.cl and attention_mma.cl.

   MMA_16816(d, a, b0, b1): d[0..3] += A B by mma.sync.aligned.m16n8k16 (fp16 operands, f32 accumulators).
   Fragments (PTX ISA, mma.m16n8k16 .f16): lane = 4 g + q. A (16 x 16, row-major): a0 = row g, k 2q, 2q+1;
   a1 = row g+8; a2, a3 = the same at k + 8. B (16 x 8, column-major): b0 = k 2q, 2q+1 of column g; b1 =
   k + 8. D (16 x 8, f32): d0, d1 = row g, columns 2q, 2q+1; d2, d3 = row g+8. A pair of halves lies in
   one 32-bit register, the lower k (or column) in the low half.

   With MMA = 0 each lane's registers go through local memory (xa [4 NWI], xb [2 NWI] words, named so in
   the caller, with lid its local id) with barriers: every work-item of the work-group must reach each
   call, as with a barrier. */

#ifndef MMA_SYNC_H
#define MMA_SYNC_H

#if MMA
#define MMA_16816(d, a, b0, b1)                                                                \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "                          \
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"                        \
                 : "+f"((d)[0]), "+f"((d)[1]), "+f"((d)[2]), "+f"((d)[3])                       \
                 : "r"((a)[0]), "r"((a)[1]), "r"((a)[2]), "r"((a)[3]), "r"(b0), "r"(b1))
#else
#define MMA_16816(d, a, b0, b1) mma_emulated((d), (a), (b0), (b1), xa, xb, lid)

/* d += A B for the warp of lid, each lane giving its a[0..3], b0, b1 and getting its d[0..3] in the
   layout of mma.m16n8k16 (above): the warp's registers go through local memory. */
inline void mma_emulated(float *d, const uint *a, const uint b0, const uint b1,
                         __local uint *xa, __local uint *xb, const int lid)
{
    for (int i = 0; i < 4; i++)
        xa[4 * lid + i] = a[i];
    xb[2 * lid] = b0;
    xb[2 * lid + 1] = b1;
    barrier(CLK_LOCAL_MEM_FENCE);
    const int w = lid & ~31, g = (lid & 31) >> 2, q = lid & 3;
    __local const half *ah = (__local const half *)(xa + 4 * w);   /* [lane][4 registers][2 halves] */
    __local const half *bh = (__local const half *)(xb + 2 * w);   /* [lane][2 registers][2 halves] */
    for (int e = 0; e < 4; e++) {
        const int row = g + 8 * (e >> 1), col = 2 * q + (e & 1);
        float sum = 0.0f;
        for (int k = 0; k < 16; k++) {
            /* A (row, k): lane 4 (row % 8) + (k % 8) / 2, register row / 8 + 2 (k / 8), half k % 2 */
            const int ra = 4 * (4 * (row % 8) + (k % 8) / 2) + row / 8 + 2 * (k / 8);
            /* B (k, col): lane 4 col + (k % 8) / 2, register k / 8, half k % 2 */
            const int rb = 2 * (4 * col + (k % 8) / 2) + k / 8;
            sum = mad(vload_half(2 * ra + k % 2, ah), vload_half(2 * rb + k % 2, bh), sum);
        }
        d[e] += sum;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
}
#endif

#endif
