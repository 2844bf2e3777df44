// GEMV for decode with integer products: y[n] (+)= sum_k W[n][k] * x[k], W int4 or int8 (groups of 32,
// no zeros), x in int16 blocks of 32 (xq.h); for T tokens, each with the arithmetic of one token alone.
// The twin of gemv.cl (float products) for x86 CPUs with AVX-512BW or AVX2 under PoCL (clang's x86
// builtins); elsewhere (GPUs, Intel's CPU runtime, which lacks the builtins) the build fails and the
// backend uses gemv.cl. Both share the
// row-tile layout, the walk along K and the float pieces (gemv_tiles.h: the tail chunks of 64 and 32
// keep float x) and the kernel with its epilogues (gemv_kernel.h).
//
// int4 x int16: x comes in int16 blocks of 32 (xq.h, 15 bits: as exact as the float path for all
// practical purposes, unlike int8 activations, which moved the default model's answers;
// docs/performance.md). Per row and chunk the 64 weight bytes are transposed 4x4 within each 16-byte
// lane, so that lane m's bytes 4g..4g+3 hold group g (elements 32g..32g+31: byte g of words 4m..4m+3).
// Read as 32 16-bit words (word 8m + 2g + k: bytes 4g + 2k, 4g + 2k + 1 of lane m), each word's four
// nibbles are four vectors of 16-bit weights (and, shift), each multiplied with its own vector of x
// (vpmaddwd: adjacent products added into int32 lane 4m + g, within one group), the four summed,
// converted, and scaled by weight scale x block scale of the lane's group. The zero terms come from
// the group sums xs of the values x holds. About 18 instructions per row and chunk where the float
// piece takes about 30.
//
// Buffers (kernel gemv, gemv_kernel.h): those of gemv.cl's gemv, and
//   xs_all  [T, K/G] f32, the group sums of the values xq holds (int4; from quantize or the norms)
//   xq_all  [T, K] int16, xd_all [T, K/32] f32: x in int16 blocks (xq.h; int8 weights: natural order)
// Kernel quantize: x [T, K] f32 -> xs [T, K/G], xq [T, K], xd [T, K/32]; global size T*K/G.
//
// Launch gemv: global (1, WG_ROWS * ceil(ceil(ceil(N/4) / TPW) / WG_ROWS)), local (1, WG_ROWS).
//
// Defines and tunables: those of gemv_tiles.h and gemv_kernel.h, with FORMAT 4 or 8 (G 32, no ZERO8),
// VEC 16 and KSPLIT 1; INT_DOT_256 (two 256-bit vpmaddwd where one 512-bit one exists: the AVX2 form),
// INT_PREFETCH (chunks ahead that each tile's stream is prefetched).
//
// Reached (scripts/bench_kernels.py, median), PoCL 3.1 AVX-512, 1 thread, its quantize launch
// included: int4 g32 16 (576x576), 21 (qkv, gate+up), 32 (down), 35 (g128 K1536) GB/s, 1.3-1.65x
// gemv.cl with its xsum launch (docs/performance.md); int8 49152x576 (output) 44 GB/s where gemv.cl
// reaches 20.

#define INT_DOT                 // read by gemv_kernel.h: the kernel takes xq_all and xd_all
#include "gemv_tiles.h"

#if FORMAT >= 16 || VEC != 16 || KSPLIT != 1 || (FORMAT == 8 && (G != 32 || defined(ZERO8)))
#error "gemv_int.cl takes int4 or int8 (groups of 32, no zeros) weights, VEC 16 and KSPLIT 1"
#endif
typedef char char64v __attribute__((ext_vector_type(64)));
typedef char char32v __attribute__((ext_vector_type(32)));
typedef short short32v __attribute__((ext_vector_type(32)));
typedef ushort ushort32v __attribute__((ext_vector_type(32)));
#define LOAD64(T, p) __builtin_astype(vload16(0, (__global const uint*)(p)), T)
#define T4(b) (b), (b) + 4, (b) + 8, (b) + 12, (b) + 1, (b) + 5, (b) + 9, (b) + 13, \
              (b) + 2, (b) + 6, (b) + 10, (b) + 14, (b) + 3, (b) + 7, (b) + 11, (b) + 15
#define TRANSPOSE_4X4 T4(0), T4(16), T4(32), T4(48)
#define NIBBLES(w, s) __builtin_astype(((w) >> (ushort)(s)) & (ushort)15, short32v)
// 32 x 16-bit products, adjacent pairs added into 16 int32 (vpmaddwd): one 512-bit instruction with
// AVX-512BW, else (or with INT_DOT_256) two 256-bit ones, which AVX2 CPUs have.
#if defined(__AVX512BW__) && !defined(INT_DOT_256)
#define PMADDWD(a, b) __builtin_ia32_pmaddwd512((a), (b))
#else
#define HALF_LO 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
#define HALF_HI 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31
#define PMADDWD(a, b) __builtin_shufflevector(                                                 \
    __builtin_ia32_pmaddwd256(__builtin_shufflevector((a), (a), HALF_LO), __builtin_shufflevector((b), (b), HALF_LO)), \
    __builtin_ia32_pmaddwd256(__builtin_shufflevector((a), (a), HALF_HI), __builtin_shufflevector((b), (b), HALF_HI)), \
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
#endif
#define ROW4(r) 4 * (r), 4 * (r) + 1, 4 * (r) + 2, 4 * (r) + 3
#define ROW_LANES(r) ROW4(r), ROW4(r), ROW4(r), ROW4(r)            // lane 4m + g: group g of row r
#ifndef INT_PREFETCH
#define INT_PREFETCH 32       // chunks ahead that each tile's stream is prefetched (the hardware
#endif                        // prefetcher alone left this kernel at half the bandwidth)
#if FORMAT == 4
#define IPIECE(blk, c, acc, zacc)                                                              \
    {                                                                                          \
        ushort32v q[RT];                                                                       \
        _Pragma("unroll") for (int r = 0; r < RT; r++) q[r] = LOAD64(ushort32v, (blk) + r * 16); \
        __global const SCALE_T* sz = (__global const SCALE_T*)((blk) + RT * 16);               \
        const float16 sd = SCALES(sz) * (float16)(d4, d4, d4, d4);                             \
        zacc = fma(SVLOAD(RT_GC_128, sz + RT * GC_(128)), XS_128((c) * 128 / G), zacc);        \
        IROW(q, sd, acc, 0) IROW(q, sd, acc, 1) IROW(q, sd, acc, 2) IROW(q, sd, acc, 3)        \
    }
// Row r (a constant: the lanes of its scales are a shuffle pattern) of a tile's chunk.
#define IROW(q, sd, acc, r)                                                                    \
    {                                                                                          \
        const ushort32v t = __builtin_astype(__builtin_shufflevector(                          \
            __builtin_astype(q[r], char64v), __builtin_astype(q[r], char64v), TRANSPOSE_4X4), ushort32v); \
        const int16 dot = PMADDWD(NIBBLES(t, 0), x16[0]) + PMADDWD(NIBBLES(t, 4), x16[1])     \
                        + PMADDWD(NIBBLES(t, 8), x16[2])                                       \
                        + PMADDWD(__builtin_astype(t >> (ushort)12, short32v), x16[3]);        \
        acc[r] = fma(convert_float16(dot), __builtin_shufflevector(sd, sd, ROW_LANES(r)), acc[r]); \
    }
#else
// int8 x int16: x in natural order (XQ_NATURAL); per row and 32-element block the int8 weights are
// widened to 16 bits and multiplied with the block of x (vpmaddwd), the 16 int32 lanes converted and
// scaled by weight scale x block scale. 5 instructions per 32 weights where the float piece takes 7.
#define XQ_NATURAL
#define IPIECE(blk, c, acc, zacc)                                                              \
    {                                                                                          \
        __global const char* q = (__global const char*)(blk);                                 \
        const float16 sd = SVLOAD(16, (__global const SCALE_T*)((blk) + RT * 32)) * (float16)(d4, d4, d4, d4); \
        IROW8(q, sd, acc, 0) IROW8(q, sd, acc, 1) IROW8(q, sd, acc, 2) IROW8(q, sd, acc, 3)    \
    }
#define IBLOCK8(q, sd, acc, r, b)                                                              \
    acc[r] = fma(convert_float16(PMADDWD(__builtin_convertvector(                              \
                     __builtin_astype(vload8(0, (__global const uint*)((q) + (r) * 128 + 32 * (b))), char32v), short32v), \
                     x16[b])), (float16)(sd[4 * (r) + (b)]), acc[r]);
#define IROW8(q, sd, acc, r)                                                                   \
    IBLOCK8(q, sd, acc, r, 0) IBLOCK8(q, sd, acc, r, 1) IBLOCK8(q, sd, acc, r, 2) IBLOCK8(q, sd, acc, r, 3)
#endif
// One 128-element chunk c of the NT tiles: int16 x (this chunk's four vectors of 32 and its four block
// scales) against each tile's weights (IPIECE), the stream INT_PREFETCH chunks ahead prefetched.
#define DOT128(c, j)                                                                           \
    {                                                                                          \
        _Pragma("unroll") for (int i = 0; i < NT; i++)                                         \
            _Pragma("unroll") for (int b = 0; b < BLOCK_WORDS(128) * 4; b += 64)               \
                __builtin_prefetch((__global const char*)(W + tw[i] + ((c) + INT_PREFETCH) * BLOCK_WORDS(128)) + b); \
        short32v x16[4];                                                                       \
        _Pragma("unroll") for (int h = 0; h < 4; h++) x16[h] = LOAD64(short32v, xq + (c) * 128 + 32 * h); \
        const float4 d4 = vload4(c, xd);                                                       \
        _Pragma("unroll") for (int i = 0; i < NT; i++)                                         \
            IPIECE(W + tw[i] + (c) * BLOCK_WORDS(128), c, acc[i], zacc[i])                     \
    }

#define XQ_QUANTIZE             // xq.h: the quantize kernel, x in int16 blocks
#include "xq.h"
#include "gemv_kernel.h"
