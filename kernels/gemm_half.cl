// Many-token GEMM in fp16 arithmetic (cl_khr_fp16): Y[t][n] (+)= sum_k W[n][k] * X[t][k] for int4 weights in
// the row-tile layout of gemv.cl, by gemm_tiled's scheme (kernels/gemm.cl) with half operands: x_to_half
// converts X to fp16 once per product; a work-group owns BN rows x BT tokens, dequantizes kc chunks of its
// rows into local memory Wl[BN][kc*128] as half (w = q * scale + zero, rounded once), optionally copies
// Xh[BT][...] to local Xl, and each work-item multiplies an RR x TR register tile of half VEC vectors with
// half fma. Each half accumulator takes HALF_FOLD products (HALF_FOLD * VEC elements of K) before it is
// folded into the f32 accumulators: HALF_FOLD = 1 rounds each product to fp16 and sums in f32; up to 4
// the result keeps within 5e-4 of the largest output (tests/test_cl_gemm_variants.py, docs/performance.md).
//
// Launch as gemm_tiled: global (BT/TR * ceil(T/BT), BN/RR * ceil(N/BN)), work-group (BT/TR, BN/RR);
// local memory 2 * kc * 128 * (BN + X_LOCAL * BT) bytes. x_to_half: global ceil(T * K / 4).
//
// Defines: G (int4 group 32, 64, 128), SCALE_F32 (kernels/wformat.h), VEC (4, 8, 16), BN, BT, RR, TR,
// X_LOCAL (gemm_tiled's, declared for it in engine/backends/opencl/specs.py), HALF_FOLD, SWIGLU, GELU.

#pragma OPENCL EXTENSION cl_khr_fp16 : enable

#ifndef HALF_FOLD
#error "HALF_FOLD: its default is declared in engine/backends/opencl/specs.py"
#endif
#if !defined(VEC) || !defined(BN) || !defined(BT) || !defined(RR) || !defined(TR) || !defined(X_LOCAL)
#error "VEC, BN, BT, RR, TR, X_LOCAL: gemm_tiled's parameters (engine/backends/opencl/specs.py)"
#endif

#define FORMAT 4
#define RT 4
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#include "wformat.h"
#include "tiles.h"

#define HV CAT(half, VEC)
#define FV CAT(float, VEC)

// X [n] f32 -> Xh [n] fp16 (n % 4 == 0), once per product.
__kernel void x_to_half(__global const float* restrict X, __global half* restrict Xh, const int n)
{
    const int i = get_global_id(0) * 4;
    if (i < n) vstore_half4_rte(vload4(0, X + i), 0, Xh + i);
}

// Chunk c (width C) of the work-group's rows, dequantized to half, at column col of Wl; items are (row r,
// 4 nibble words from word j): plane p of them is elements p * C/8 + j .. + 3, one group's.
#if X_LOCAL
#define STAGE_XH(C, col) STAGE_ROWS((__global const uint*)Xh, K / 2, (kbase + (col)) / 2, (C) / 2, (__local uint*)Xl, KW / 2, (col) / 2)
#else
#define STAGE_XH(C, col)
#endif
#define STAGE_HALF(C, c, col)                                                                  \
    {                                                                                          \
        const int L = (C) / 8;                                                                 \
        for (int i = lid; i < BN * (L / 4); i += NWI) {                                        \
            const int r = i / (L / 4), j = (i % (L / 4)) * 4, row = ROW_IN_TILE(r);            \
            __global const uint* blk = ROW_BLOCK(r, c);                                        \
            const uint4 q = vload4(0, Q4_WORDS(blk, C, row) + j);                              \
            for (int p = 0; p < 8; p++) {                                                      \
                const int g = (p * L + j) / G;                                                 \
                const float4 w = fma(convert_float4((q >> (4 * p)) & 15u), (float4)(Q4_SCALE(blk, C, row, g)), \
                                     (float4)(Q4_ZERO(blk, C, row, g)));                       \
                vstore_half4_rte(w, 0, Wl + r * KW + (col) + p * L + j);                       \
            }                                                                                  \
        }                                                                                      \
        STAGE_XH(C, col)                                                                       \
    }

#if X_LOCAL
#define XROW(j) (Xl + (ti * TR + (j)) * KW)
#else
#define XROW(j) (Xh + (size_t)min(tb0 + ti * TR + (j), T - 1) * K + kbase)
#endif
// acc[i][j] += Wl[row i] . X[token j] over the staged columns, in half fma folded into f32 every FOLD.
#define FOLD (HALF_FOLD * VEC)
#define MICRO_HALF(cols)                                                                       \
    for (int f = 0; f < (cols); f += FOLD) {                                                   \
        HV h[RR][TR];                                                                          \
        _Pragma("unroll") for (int i = 0; i < RR; i++)                                         \
            _Pragma("unroll") for (int j = 0; j < TR; j++) h[i][j] = (HV)(0.0h);              \
        for (int k = f; k < min(f + FOLD, cols); k += VEC) {                                   \
            HV wv[RR], xv[TR];                                                                 \
            _Pragma("unroll") for (int i = 0; i < RR; i++) wv[i] = CAT(vload, VEC)(0, Wl + (ri * RR + i) * KW + k); \
            _Pragma("unroll") for (int j = 0; j < TR; j++) xv[j] = CAT(vload, VEC)(0, XROW(j) + k); \
            _Pragma("unroll") for (int i = 0; i < RR; i++)                                     \
                _Pragma("unroll") for (int j = 0; j < TR; j++) h[i][j] = fma(wv[i], xv[j], h[i][j]); \
        }                                                                                      \
        _Pragma("unroll") for (int i = 0; i < RR; i++)                                         \
            _Pragma("unroll") for (int j = 0; j < TR; j++) acc[i][j] += CAT(convert_float, VEC)(h[i][j]); \
    }

// W: int4 row tiles of rows = N (SWIGLU: 2N); Xh: [T][K] fp16 (x_to_half); Y: [T][N] f32.
// Wl: local [BN][KW] half, Xl: local [BT][KW] half (X_LOCAL), KW = kc * 128.
__kernel __attribute__((reqd_work_group_size(BT / TR, BN / RR, 1)))
void gemm_half(__global const uint* restrict W, __global const half* restrict Xh,
               __global float* restrict Y, const int T, const int K, const int N, const int accumulate,
               __local half* restrict Wl, __local half* restrict Xl, const int kc)
{
    TILE_IDS
    float out[NT][RR][TR];
    for (int up = 0; up < NT; up++) {
        FV acc[RR][TR];
        for (int i = 0; i < RR; i++) for (int j = 0; j < TR; j++) acc[i][j] = 0.0f;
        WALK_K(STAGE_HALF, MICRO_HALF)
        for (int i = 0; i < RR; i++) for (int j = 0; j < TR; j++) out[up][i][j] = CAT(hsum, VEC)(acc[i][j]);
    }
    STORE_TILE(out)
}
