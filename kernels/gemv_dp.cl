// GEMV for decode on NVIDIA GPUs with integer dot-product instructions: y[n] (+)= sum_k W[n][k] * x[k],
// W int4 (fp16 scales and zeros, groups of 32, 64 or 128), x in int16 blocks of 32 (xq.h, XQ_PAIRS
// order); for T tokens, each with the arithmetic of one token alone. The third twin of gemv.cl (float
// products) and gemv_int.cl (x86 integer products): the same row tiles, walk along K, tail chunks of 64
// and 32 on the float path (gemv_tiles.h) and kernel with its epilogues (gemv_kernel.h).
//
// Products: a piece is VEC = 4, 8 or 16 lanes (16-byte loads per row) of a 128-chunk. Word w of lane l holds
// nibble p = element 16p + l; its byte g holds planes 2g, 2g+1, i.e. group (32-block) g. Per word:
//   lo = w & 0x0F0F0F0F, hi = (w >> 4) & 0x0F0F0F0F           (planes 0,2,4,6 and 1,3,5,7 as bytes)
//   p0 = prmt(lo, hi, 0x5140), p1 = prmt(lo, hi, 0x7362)         (planes 0,1,2,3 and 4,5,6,7)
//   s[g] = dp2a.lo / dp2a.hi (x pair of block g, p0 or p1, s[g]) (2 int16 x 2 unsigned bytes + int32)
// where the x pair of block g at lane l is the word (x[32g + l], x[32g + 16 + l]) (xq.h XQ_PAIRS).
// About 9 instructions per 8 weights where gemv.cl's float piece takes 40-48; then per row and piece
// the 4 block sums are converted and scaled by weight scale x block scale (lanes 0-3 of acc; a wider
// piece spreads that cost, and the block scales', over more weights). The
// zero terms come from the group sums xs of the values x holds, added by the work-item holding lane 0.
//
// DP_PTX 1: prmt.b32 and dp2a through NVIDIA inline PTX (sm_61 and later). DP_PTX 0 ("emulated"): the
// same registers through ordinary integer arithmetic, so CPUs (PoCL) check all but the instructions.
// With KSPLIT <= 32 the KSPLIT partial sums of a row meet by butterfly exchanges (gemv_kernel.h
// LANE_XOR): shfl.sync.bfly within the warp, emulated through local memory; above 32, the tree in local
// memory.
//
// Buffers (kernel gemv, gemv_kernel.h): those of gemv.cl's gemv, and
//   xs_all  [T, K/G] f32, the group sums of the values xq holds (from quantize)
//   xq_all  [T, K] int16, xd_all [T, K/32] f32: x in int16 blocks (xq.h, XQ_PAIRS order)
// Kernel quantize (xq.h): x [T, K] f32 -> xs, xq, xd; global size T*K/G.
//
// Launch gemv: global (KSPLIT, WG_ROWS * ceil(ceil(ceil(N/4) / TPW) / WG_ROWS)), local (KSPLIT, WG_ROWS).
// Defines and tunables: FORMAT 4 with G, SWIGLU, GELU, USE_IMAGE (the float x of the tails), VEC, KSPLIT,
// WG_ROWS, TPW (specs.py GEMV_DP), DP_PTX. Not ZERO_INLINE, NORM (the GEMV of gemv.cl takes those).

#define INT_DOT                 // read by gemv_kernel.h: the kernel takes xq_all and xd_all
#define XQ_PAIRS                // xq.h: x pairs in the order of the weight planes
#define XQ_QUANTIZE             // xq.h: the quantize kernel
#include "gemv_tiles.h"

#if FORMAT != 4 || defined(ZERO_INLINE) || defined(NORM) || (VEC != 4 && VEC != 8 && VEC != 16)
#error "gemv_dp.cl takes int4 weights, without ZERO_INLINE or NORM, and VEC 4, 8 or 16"
#endif
#ifndef DP_PTX
#define DP_PTX 1
#endif
#define LANE_PTX DP_PTX
#include "lane_xor.h"           // LANE_XOR: shfl.sync.bfly, or its emulation through local memory

#if DP_PTX
inline uint prmt(uint a, uint b, uint s)
{
    uint d;
    asm volatile("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(s));
    return d;
}
inline int dp2a_lo(uint a, uint b, int c)
{
    int d;
    asm volatile("dp2a.lo.s32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
inline int dp2a_hi(uint a, uint b, int c)
{
    int d;
    asm volatile("dp2a.hi.s32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
#else
// The PTX ISA's semantics: prmt's selector nibbles pick bytes of {b, a} (a: 0-3, b: 4-7; the sign bit
// of a nibble is not used here); dp2a: c + the signed 16-bit halves of a times bytes 0, 1 (lo) or 2, 3
// (hi) of b, unsigned.
inline uint prmt(uint a, uint b, uint s)
{
    uint d = 0;
    for (int i = 0; i < 4; i++) {
        const uint sel = (s >> (4 * i)) & 7u;
        d |= (((sel < 4 ? a >> (8 * sel) : b >> (8 * (sel - 4)))) & 0xFFu) << (8 * i);
    }
    return d;
}
inline int dp2a_lo(uint a, uint b, int c)
{
    return c + (int)(short)(a & 0xFFFFu) * (int)(b & 0xFFu) + (int)(short)(a >> 16) * (int)((b >> 8) & 0xFFu);
}
inline int dp2a_hi(uint a, uint b, int c)
{
    return c + (int)(short)(a & 0xFFFFu) * (int)((b >> 16) & 0xFFu) + (int)(short)(a >> 16) * (int)(b >> 24);
}
#endif

// One word of row weights against lane l's x pairs (xv: block b in component b): the 4 block sums s.
#define DP_WORD(word, xv, sum)                                                                      \
    {                                                                                          \
        const uint lo_ = (word) & 0x0F0F0F0Fu, hi_ = ((word) >> 4) & 0x0F0F0F0Fu;                     \
        const uint p0_ = prmt(lo_, hi_, 0x5140u), p1_ = prmt(lo_, hi_, 0x7362u);               \
        sum.x = dp2a_lo((xv).x, p0_, sum.x);                                                       \
        sum.y = dp2a_hi((xv).y, p0_, sum.y);                                                       \
        sum.z = dp2a_lo((xv).z, p1_, sum.z);                                                       \
        sum.w = dp2a_hi((xv).w, p1_, sum.w);                                                       \
    }
// Piece j (lanes j .. j+VEC-1) of one tile's 128-chunk block at blk: acc[r].s0123 (lane b = block b)
// += the block sums times scale x block scale; zacc: the chunk's zero terms (lane 0's work-item).
// The loads are 16-byte vectors: tile_words and the blocks' words are multiples of 4 for every G.
#define DPIECE(blk, c, j, xw, d4, acc, zacc)                                                   \
    {                                                                                          \
        uint4 wq[RT][VEC / 4];                                                                 \
        _Pragma("unroll") for (int r = 0; r < RT; r++)                                         \
            _Pragma("unroll") for (int v = 0; v < VEC / 4; v++)      /* 16-byte aligned */    \
                wq[r][v] = *(__global const uint4*)((blk) + r * 16 + (j) + 4 * v);            \
        __global const SCALE_T* sz = (__global const SCALE_T*)((blk) + RT * 16);               \
        const float16 sd = SCALES(sz) * (float16)(d4, d4, d4, d4);                             \
        _Pragma("unroll") for (int r = 0; r < RT; r++) {                                       \
            int4 s = 0;                                                                        \
            _Pragma("unroll") for (int v = 0; v < VEC / 4; v++) {                              \
                DP_WORD(wq[r][v].x, xw[4 * v], s) DP_WORD(wq[r][v].y, xw[4 * v + 1], s)        \
                DP_WORD(wq[r][v].z, xw[4 * v + 2], s) DP_WORD(wq[r][v].w, xw[4 * v + 3], s)    \
            }                                                                                  \
            const float4 sdr = r == 0 ? sd.s0123 : r == 1 ? sd.s4567 : r == 2 ? sd.s89ab : sd.scdef; \
            acc[r].s0123 = fma(convert_float4(s), sdr, acc[r].s0123);                          \
        }                                                                                      \
        if ((j) == 0)                                                                          \
            zacc = fma(SVLOAD(RT_GC_128, sz + RT * GC_(128)), XS_128((c) * 128 / G), zacc);    \
    }
// One 128-element chunk c, piece j, of the NT tiles: lanes j .. j+VEC-1 of x (4 words each, one per
// block) and the chunk's 4 block scales, shared by the tiles.
#define DOT128(c, j)                                                                           \
    {                                                                                          \
        __global const uint4* xc = (__global const uint4*)(xq + (c) * 128);                    \
        uint4 xw[VEC];                                                                         \
        _Pragma("unroll") for (int v = 0; v < VEC; v++) xw[v] = xc[(j) + v];                   \
        const float4 d4 = vload4(c, xd);                                                       \
        _Pragma("unroll") for (int i = 0; i < NT; i++)                                         \
            DPIECE(W + tw[i] + (c) * BLOCK_WORDS(128), c, j, xw, d4, acc[i], zacc[i])          \
    }

#include "xq.h"
#include "gemv_kernel.h"
