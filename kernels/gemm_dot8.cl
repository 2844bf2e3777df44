// Many-token GEMM through 8-bit integer dot products (cl_khr_integer_dot_product): Y[t][n] (+)= sum_k
// W[n][k] * X[t][k] for int4 weights in the row-tile layout of gemv.cl, by gemm_tiled's scheme
// (kernels/gemm.cl) with integer operands.
//
// quantize_x8 first puts X in int8 blocks of 32, once per product: Xq[t][k] = rint(x * 127 / m), m the
// block's largest |x|, with Xd[t][b] = (d, d * sum of the block's q), d = m / 127 (x ~ q * d). A work-group
// owns BN rows x BT tokens; it stages kc chunks of its rows into local memory as int8 (the nibbles q, 0..15,
// four to a word in natural order) in Wq[BN][kc*32] with each 32-block's (scale, zero) in Ws[BN][kc*4],
// optionally copies the tokens' Xq and Xd to local memory (X_LOCAL), and each work-item computes an
// RR x TR register tile, a 32-block at a time:
//     y += sum_b  s * d * (q_w . q_x) + z * d * sum(q_x)        (w = q_w * s + z within a block, G >= 32)
// with q_w . q_x by dot_4x8packed_ss_int / dot_acc_sat_4x8packed_ss_int (|sum| <= 32 * 15 * 127: exact).
// The products are exact; x's int8 rounding (half a step of m / 127 per element) is the whole error.
//
// Launch as gemm_tiled: global (BT/TR * ceil(T/BT), BN/RR * ceil(N/BN)), work-group (BT/TR, BN/RR); local
// memory kc * (128 + 4 * 8) * (BN + X_LOCAL * BT) bytes. quantize_x8: global T * K / 32.
//
// Defines: G (int4 group 32, 64, 128), SCALE_F32 (kernels/wformat.h), BN, BT, RR, TR, X_LOCAL (gemm_tiled's,
// declared for it in engine/backends/opencl/specs.py), SWIGLU, GELU.

#ifndef cl_khr_integer_dot_product
#error "gemm_dot8 needs cl_khr_integer_dot_product"
#endif
#if !defined(BN) || !defined(BT) || !defined(RR) || !defined(TR) || !defined(X_LOCAL)
#error "BN, BT, RR, TR, X_LOCAL: gemm_tiled's parameters (engine/backends/opencl/specs.py)"
#endif

#define FORMAT 4
#define RT 4
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#include "wformat.h"
#include "tiles.h"

// Block b = get_global_id(0) of X [T * K / 32 blocks of 32] into Xq (int8) and Xd (d, d * sum q).
__kernel void quantize_x8(__global const float* restrict X, __global char* restrict Xq, __global float2* restrict Xd)
{
    const int b = get_global_id(0);
    const float16 a = vload16(0, X + 32 * b), c = vload16(0, X + 32 * b + 16);
    const float16 m16 = fmax(fabs(a), fabs(c));
    const float8 m8 = fmax(m16.lo, m16.hi);
    const float4 m4 = fmax(m8.lo, m8.hi);
    const float m = fmax(fmax(m4.x, m4.y), fmax(m4.z, m4.w));
    const float inv = m > 0.0f ? 127.0f / m : 0.0f, d = m / 127.0f;
    const int16 qa = convert_int16(rint(a * inv)), qc = convert_int16(rint(c * inv));
    vstore16(convert_char16(qa), 0, Xq + 32 * b);
    vstore16(convert_char16(qc), 0, Xq + 32 * b + 16);
    const int16 s16 = qa + qc;
    const int8 s8 = s16.lo + s16.hi;
    const int4 s4 = s8.lo + s8.hi;
    Xd[b] = (float2)(d, d * (float)((s4.x + s4.y) + (s4.z + s4.w)));
}

// Chunk c (width C) of the work-group's rows at column col: items (row r, 4 nibble words from word j) give
// plane p's four elements p * C/8 + j .. + 3 as one word of int8; items (row r, block b) the 32-block's
// scale and zero.
#if X_LOCAL
#define STAGE_X8(C, col)                                                                       \
    STAGE_ROWS((__global const uint*)Xq, K / 4, (kbase + (col)) / 4, (C) / 4, Xl, KW / 4, (col) / 4) \
    STAGE_ROWS(Xd, K / 32, (kbase + (col)) / 32, (C) / 32, Xdl, KW / 32, (col) / 32)
#else
#define STAGE_X8(C, col)
#endif
#define STAGE_DOT8(C, c, col)                                                                  \
    {                                                                                          \
        const int L = (C) / 8;                                                                 \
        for (int i = lid; i < BN * (L / 4); i += NWI) {                                        \
            const int r = i / (L / 4), j = (i % (L / 4)) * 4;                                  \
            const uint4 q = vload4(0, Q4_WORDS(ROW_BLOCK(r, c), C, ROW_IN_TILE(r)) + j);       \
            for (int p = 0; p < 8; p++) {                                                      \
                const uint4 v = (q >> (4 * p)) & 15u;                                          \
                Wq[r * (KW / 4) + ((col) + p * L + j) / 4] = v.x | (v.y << 8) | (v.z << 16) | (v.w << 24); \
            }                                                                                  \
        }                                                                                      \
        for (int i = lid; i < BN * ((C) / 32); i += NWI) {                                     \
            const int r = i / ((C) / 32), b = i % ((C) / 32), row = ROW_IN_TILE(r);            \
            __global const uint* blk = ROW_BLOCK(r, c);                                        \
            Ws[r * (KW / 32) + (col) / 32 + b] = (float2)(Q4_SCALE(blk, C, row, 32 * b / G), Q4_ZERO(blk, C, row, 32 * b / G)); \
        }                                                                                      \
        STAGE_X8(C, col)                                                                       \
    }

#if X_LOCAL
#define XQROW(j) (Xl + (ti * TR + (j)) * (KW / 4))
#define XDROW(j) (Xdl + (ti * TR + (j)) * (KW / 32))
#else
#define XQROW(j) ((__global const uint*)Xq + (size_t)min(tb0 + ti * TR + (j), T - 1) * (K / 4) + kbase / 4)
#define XDROW(j) (Xd + (size_t)min(tb0 + ti * TR + (j), T - 1) * (K / 32) + kbase / 32)
#endif
// acc[i][j] += the 32-blocks of the staged columns: 8 words of int8 each.
#define DOT32(a, x)                                                                            \
    dot_acc_sat_4x8packed_ss_int((a).s7, (x).s7, dot_acc_sat_4x8packed_ss_int((a).s6, (x).s6,   \
    dot_acc_sat_4x8packed_ss_int((a).s5, (x).s5, dot_acc_sat_4x8packed_ss_int((a).s4, (x).s4,   \
    dot_acc_sat_4x8packed_ss_int((a).s3, (x).s3, dot_acc_sat_4x8packed_ss_int((a).s2, (x).s2,   \
    dot_acc_sat_4x8packed_ss_int((a).s1, (x).s1, dot_4x8packed_ss_int((a).s0, (x).s0))))))))
#define MICRO_DOT8(cols)                                                                       \
    for (int b = 0; b < (cols) / 32; b++) {                                                    \
        uint8 wv[RR];                                                                          \
        float2 ws[RR];                                                                         \
        _Pragma("unroll") for (int i = 0; i < RR; i++) {                                       \
            wv[i] = vload8(b, Wq + (ri * RR + i) * (KW / 4));                                  \
            ws[i] = Ws[(ri * RR + i) * (KW / 32) + b];                                         \
        }                                                                                      \
        _Pragma("unroll") for (int j = 0; j < TR; j++) {                                       \
            const uint8 xv = vload8(b, XQROW(j));                                              \
            const float2 xd = XDROW(j)[b];                                                     \
            _Pragma("unroll") for (int i = 0; i < RR; i++)                                     \
                acc[i][j] = fma(ws[i].x * xd.x, (float)DOT32(wv[i], xv), fma(ws[i].y, xd.y, acc[i][j])); \
        }                                                                                      \
    }

// W: int4 row tiles of rows = N (SWIGLU: 2N); Xq: [T][K] int8, Xd: [T][K/32] (quantize_x8); Y: [T][N] f32.
// Wq: local [BN][KW/4] words, Ws: local [BN][KW/32]; Xl: local [BT][KW/4] words, Xdl: [BT][KW/32] (X_LOCAL).
__kernel __attribute__((reqd_work_group_size(BT / TR, BN / RR, 1)))
void gemm_dot8(__global const uint* restrict W, __global const char* restrict Xq, __global const float2* restrict Xd,
               __global float* restrict Y, const int T, const int K, const int N, const int accumulate,
               __local uint* restrict Wq, __local float2* restrict Ws, __local uint* restrict Xl,
               __local float2* restrict Xdl, const int kc)
{
    TILE_IDS
    float out[NT][RR][TR];
    for (int up = 0; up < NT; up++) {
        float acc[RR][TR];
        for (int i = 0; i < RR; i++) for (int j = 0; j < TR; j++) acc[i][j] = 0.0f;
        WALK_K(STAGE_DOT8, MICRO_DOT8)
        for (int i = 0; i < RR; i++) for (int j = 0; j < TR; j++) out[up][i][j] = acc[i][j];
    }
    STORE_TILE(out)
}
