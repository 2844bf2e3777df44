// The GEMV's row tiles, shared by gemv.cl (float products) and gemv_int.cl (integer products): the
// weight layout, the work decomposition, the loads of x, the float products of one piece of a tile
// (all of gemv.cl's work; gemv_int.cl's tail chunks of 64 and 32) and the walk along K (TILES_DOT).
//
// Weight layout ("row tiles", written by engine/backends/opencl/matmul.py)
// -------------------------------------------------------------------------
// Rows are grouped in tiles of RT = 4 consecutive rows (N is padded up to a multiple of 4 with zero
// rows). Each tile is one contiguous run of 32-bit words, so one work-item streams one address range.
// Along K a tile is cut into chunks of 128 elements, then one of 64 if K % 128 >= 64, then one of 32 if
// K % 64 == 32. A chunk of C elements has 8 "planes" of L = C / 8 consecutive elements (plane p holds
// elements p*L .. p*L + L-1 of the chunk). One chunk's block, per format:
//
//   FORMAT 4 (int4, group G = 32/64/128, w = q * scale + zero):
//     uint  q[RT][L]       nibble p (bits 4p..4p+3) of word l of row r = q of element p*L + l
//     half  scale[RT][C/G]
//     half  zero[RT][C/G]                                  -> RT*(L + C/G) words
//   FORMAT 8 (int8, one scale per G = 32 or 16, w = q * scale, with ZERO8 + zero):
//     char  q[RT][C]       natural order
//     half  scale[RT][C/G]
//     half  zero[RT][C/G]  (ZERO8 only)                    -> RT*C/4 + RT*C/64 words (G 32, no zeros)
//   FORMAT 16 (fp16):
//     half  w[RT][C]       natural order                   -> RT*C/2 words
//   FORMAT 32 (float32):
//     float w[RT][C]       natural order                   -> RT*C words
// With SCALE_F32 the scales and zeros are float32 (kernels/wformat.h).
//
// The int4 packing lets one wide load (uint16 = 64 bytes) give, with a shift and a mask per plane,
// 16 consecutive weights: the plane vectors line up with plain vector loads of x. Scales and zeros sit
// next to their data, so a work-item reads one stream, and are converted in registers (vload_half4/8/16,
// F16C on x86) rather than staged in local memory, which on a CPU is one more copy through the cache.
//
// Work decomposition
// ------------------
// Work-group = (KSPLIT, WG_ROWS) work-items. Work-item (ks, i) owns the TPW row tiles starting at
// (group*WG_ROWS + i) * TPW (with SWIGLU also the matching up tiles; all its tiles share each load of x)
// and the (chunk, piece) items ks, ks+KSPLIT, ... where a piece is VEC lanes of a chunk. Partial sums
// over ks meet in local memory (gemv_kernel.h). int4 zero terms use the group sums of x, computed once
// per call by gemv.cl's xsum kernel or gemv_int.cl's quantize kernel, or written by the norms.
// CPU (PoCL): KSPLIT=1, VEC=16: each work-item runs explicit 512-bit vector code along K (PoCL's own
// vectorization across work-items reached only 1-2 GB/s on this kernel), with all of a block's loads
// issued before its arithmetic. GPU: VEC=4 and KSPLIT=16..32 so that neighbouring work-items read
// neighbouring 16-byte pieces; in the warp layout (KSPLIT 32, PREFETCH > 1: WALK128 below) each work-item
// loads several pieces' weights before their arithmetic.
//
// Defines: FORMAT (4, 8, 16, 17, 32), G (int4 group; int8: 32 or 16), SCALE_F32, ZERO8 (int8 zeros),
// SWIGLU, USE_IMAGE (x through an image1d_buffer_t), ZERO_INLINE (float int4 only: each work-item adds
// the zero terms of its own lanes from the x it loaded, so no xsum launch; the NVIDIA setting).
// Tunables (defaults in engine/backends/opencl/specs.py): VEC (4, 8, 16), KSPLIT (a power of two),
// WG_ROWS, TPW (row tiles per work-item), PREFETCH (int4 pieces loaded before their arithmetic).
// The including file defines DOT128(c, j), the products of one 128-element chunk, before TILES_DOT
// is used.

#ifndef GEMV_TILES_H
#define GEMV_TILES_H

#if !defined(VEC) || !defined(KSPLIT) || !defined(WG_ROWS) || !defined(TPW)
#error "VEC, KSPLIT, WG_ROWS, TPW: their defaults are declared in engine/backends/opencl/specs.py"
#endif

#define RT 4
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)

// ---- words per chunk block, by chunk width C; scale loads (SCALE_F32, ZERO8, FORMAT 32) ----
#include "wformat.h"

// ---- x: a global vector, or an image1d_buffer_t of float4 texels ----
#ifdef USE_IMAGE
#define X_ARG __read_only image1d_buffer_t x
#define X4(o) read_imagef(x, (xo + (o)) >> 2)
#define XLOAD4(o) X4(o)
#define XLOAD8(o) (float8)(X4(o), X4((o) + 4))
#define XLOAD16(o) (float16)(X4(o), X4((o) + 4), X4((o) + 8), X4((o) + 12))
#else
#define X_ARG __global const float* restrict x
#define XLOAD4(o) vload4(0, x + xo + (o))
#define XLOAD8(o) vload8(0, x + xo + (o))
#define XLOAD16(o) vload16(0, x + xo + (o))
#endif
// With NORM_IN, the input's RMSNorm in the prologue: x as rmsnorm(x) * norm_w (norm_in.h).
#include "norm_in.h"


inline float hsum4(float4 v) { float2 a = v.lo + v.hi; return a.x + a.y; }
inline float hsum8(float8 v) { return hsum4(v.lo + v.hi); }
inline float hsum16(float16 v) { return hsum8(v.lo + v.hi); }
#define HSUM(n, v) CAT(hsum, n)(v)

// A piece is PV lanes, starting at lane j0, of each of the 8 planes (L lanes each) of one chunk of C
// elements that starts at element k0. XPLANES loads the matching x, TPIECE accumulates the piece of one
// row tile (chunk block at `blk`) into acc[RT] (floatPV) and, int4 only, zacc (the zero terms; added
// by the work-item holding lane 0 so that each group's zero is counted once).
#if FORMAT == 4
#ifdef ZERO_INLINE
// xgv[g]: this piece's x summed over the planes of group g (lane by lane), for the inline zero terms.
#define XPLANES(C, PV, k0, j0, xp)                                                             \
    CAT(float, PV) xp[8];                                                                      \
    CAT(float, PV) xgv[GC_(C)];                                                                \
    _Pragma("unroll") for (int p = 0; p < 8; p++) xp[p] = CAT(XLOAD, PV)((k0) + p * ((C) / 8) + (j0)); \
    _Pragma("unroll") for (int g = 0; g < GC_(C); g++) {                                       \
        xgv[g] = xp[g * (8 / GC_(C))];                                                         \
        _Pragma("unroll") for (int p = g * (8 / GC_(C)) + 1; p < (g + 1) * (8 / GC_(C)); p++) xgv[g] += xp[p]; \
    }
#else
#define XPLANES(C, PV, k0, j0, xp)                                                             \
    CAT(float, PV) xp[8];                                                                      \
    _Pragma("unroll") for (int p = 0; p < 8; p++) xp[p] = CAT(XLOAD, PV)((k0) + p * ((C) / 8) + (j0));
#endif
// int4: f = 1 + q/16 built in the mantissa (shift, and-or), so w = 16*s*f + (z - 16*s). Scales and
// zeros of the tile's chunk come as one vector each, lane r*GC + g for row r, group g; the zero terms
// of all rows and groups go into one vector accumulator zacc against the group sums xs of x.
#define NIB(PV, w, p) CAT(as_float, PV)((((p) <= 4) ? ((w) << (19 - 4 * (p))) : ((w) >> (4 * (p) - 19))) & 0x00780000u | 0x3F800000u)
#define GC_(C) ((C) >= G ? (C) / G : 1)   // groups per chunk (tails narrower than G never occur)
#if G == 32
#define RT_GC_128 16
#define RT_GC_64 8
#define XS_128(o) ((float16)(vload4(0, xs + (o)), vload4(0, xs + (o)), vload4(0, xs + (o)), vload4(0, xs + (o))))
#define XS_64(o) ((float8)(vload2(0, xs + (o)), vload2(0, xs + (o)), vload2(0, xs + (o)), vload2(0, xs + (o))))
#elif G == 64
#define RT_GC_128 8
#define RT_GC_64 4
#define XS_128(o) ((float8)(vload2(0, xs + (o)), vload2(0, xs + (o)), vload2(0, xs + (o)), vload2(0, xs + (o))))
#define XS_64(o) ((float4)(xs[o]))
#else
#define RT_GC_128 4
#define RT_GC_64 4
#define XS_128(o) ((float4)(xs[o]))
#define XS_64(o) ((float4)(xs[o]))
#endif
#define RT_GC_32 4
#define XS_32(o) ((float4)(xs[o]))
// The scales of a tile's 128-chunk (at sz) as float16, lane 4r + b: row r, the group of 32-block b (the
// integer products of gemv_int.cl and gemv_dp.cl sum each 32-block of x on its own).
#if G == 32
#define SCALES(sz) SVLOAD(16, sz)
#elif G == 64
#define SCALES(sz) SVLOAD(8, sz).s0011223344556677
#else
#define SCALES(sz) SVLOAD(4, sz).s0000111122223333
#endif
#define ZTYPE(C) CAT(float, RT_GC_##C)
// The data words of all rows are loaded before the scales: the loads go out together. TLOAD loads
// them (wr[RT], uintPV), TPIECE_W multiplies them (the walk with PREFETCH loads several pieces first).
#define TLOAD(C, PV, blk, j0, wr)                                                              \
    { _Pragma("unroll") for (int r = 0; r < RT; r++) wr[r] = CAT(vload, PV)(0, (blk) + r * ((C) / 8) + (j0)); }
#define TPIECE(C, PV, blk, k0, j0, xp, acc, zacc)                                              \
    {                                                                                          \
        CAT(uint, PV) wr[RT];                                                                  \
        TLOAD(C, PV, blk, j0, wr)                                                              \
        TPIECE_W(C, PV, blk, k0, j0, xp, wr, acc, zacc)                                        \
    }
#define TPIECE_W(C, PV, blk, k0, j0, xp, wr, acc, zacc)                                        \
    {                                                                                          \
        __global const SCALE_T* sz = (__global const SCALE_T*)((blk) + RT * ((C) / 8));        \
        const ZTYPE(C) s16 = SVLOAD(RT_GC_##C, sz) * 16.0f;                                    \
        _Pragma("unroll") for (int r = 0; r < RT; r++) {                                       \
            _Pragma("unroll") for (int g = 0; g < GC_(C); g++) {                               \
                CAT(float, PV) t = 0.0f;                                                       \
                _Pragma("unroll") for (int p = g * (8 / GC_(C)); p < (g + 1) * (8 / GC_(C)); p++) \
                    t = fma(NIB(PV, wr[r], p), xp[p], t);                                      \
                acc[r] = fma(s16[r * GC_(C) + g], t, acc[r]);                                  \
            }                                                                                  \
        }                                                                                      \
        ZACC(C, PV, sz, s16, k0, j0, acc, zacc)                                                \
    }
#ifdef ZERO_INLINE
// Zero terms from the piece's own x, in the same vector accumulators as the products: every
// work-item adds (z - 16 s) of row r, group g times its lanes of x summed over the group's planes.
#define ZACC(C, PV, sz, s16, k0, j0, acc, zacc)                                                \
    {                                                                                          \
        float zl[RT * GC_(C)];                                                                 \
        CAT(vstore, RT_GC_##C)(SVLOAD(RT_GC_##C, sz + RT * GC_(C)) - s16, 0, zl);              \
        _Pragma("unroll") for (int r = 0; r < RT; r++)                                         \
            _Pragma("unroll") for (int g = 0; g < GC_(C); g++)                                 \
                acc[r] = fma((CAT(float, PV))(zl[r * GC_(C) + g]), xgv[g], acc[r]);            \
    }
#else
// Zero terms from the group sums of x (xsum kernel), added by the work-item holding lane 0.
#define ZACC(C, PV, sz, s16, k0, j0, acc, zacc)                                                \
    if ((j0) == 0)                                                                             \
        zacc = fma(SVLOAD(RT_GC_##C, sz + RT * GC_(C)) - s16, XS_##C((k0) / G), zacc);
#endif
// out[r] += the zero terms of row r: lanes r*GC .. r*GC + GC-1 of zacc.
#define ZERO_TERMS(C, zacc, out)                                                               \
    {                                                                                          \
        float zl[RT * GC_(C)];                                                                 \
        CAT(vstore, RT_GC_##C)(zacc, 0, zl);                                                   \
        for (int r = 0; r < RT; r++)                                                           \
            for (int g = 0; g < GC_(C); g++) out[r] += zl[r * GC_(C) + g];                     \
    }
#elif FORMAT == 8
// int8 pieces are loaded as 32-bit words (one wide load) and reinterpreted as chars.
#define QLOAD_16(p) as_char16(vload4(0, (__global const uint*)(p)))
#define QLOAD_8(p) as_char8(vload2(0, (__global const uint*)(p)))
#define QLOAD_4(p) as_char4(*(__global const uint*)(p))
#define QLOAD(PV, p) CAT(QLOAD_, PV)(p)
#define GC_(C) ((C) / G)        // G 32, or 16 (Q6_K)
#define ZTYPE(C) float
#define ZERO_TERMS(C, zacc, out)
#define XPLANES(C, PV, k0, j0, xp)
// With ZERO8 the zeros: of row r, group g times x summed over the group's planes (no xsum launch).
#ifdef ZERO8
#define ZERO8_TERMS(C, PV, sp, k0, j0, acc)                                                    \
    {                                                                                          \
        float z[RT * GC_(C)];                                                                  \
        LOAD_SCALES(RT_GC_##C, sp + RT * GC_(C), z)                                            \
        _Pragma("unroll") for (int g = 0; g < GC_(C); g++) {                                   \
            CAT(float, PV) xg = 0.0f;                                                          \
            _Pragma("unroll") for (int p = g * (8 / GC_(C)); p < (g + 1) * (8 / GC_(C)); p++)  \
                xg += CAT(XLOAD, PV)((k0) + p * ((C) / 8) + (j0));                             \
            _Pragma("unroll") for (int r = 0; r < RT; r++) acc[r] = fma(z[r * GC_(C) + g], xg, acc[r]); \
        }                                                                                      \
    }
#else
#define ZERO8_TERMS(C, PV, sp, k0, j0, acc)
#endif
#define TPIECE(C, PV, blk, k0, j0, xp, acc, zacc)                                              \
    {                                                                                          \
        const int L = (C) / 8;                                                                 \
        __global const char* q = (__global const char*)(blk);                                  \
        __global const SCALE_T* sp = (__global const SCALE_T*)((blk) + RT * (C) / 4);          \
        float s[RT * GC_(C)];                                                                  \
        _Pragma("unroll") for (int r = 0; r < RT; r++) {                                       \
            CAT(char, PV) qr[8];                                                               \
            _Pragma("unroll") for (int p = 0; p < 8; p++) qr[p] = QLOAD(PV, q + r * (C) + p * L + (j0)); \
            if (r == 0) { LOAD_SCALES(RT_GC_##C, sp, s) }                                    \
            _Pragma("unroll") for (int g = 0; g < GC_(C); g++) {                               \
                CAT(float, PV) t = 0.0f;                                                       \
                _Pragma("unroll") for (int p = g * (8 / GC_(C)); p < (g + 1) * (8 / GC_(C)); p++) \
                    t = fma(CAT(convert_float, PV)(qr[p]), CAT(XLOAD, PV)((k0) + p * L + (j0)), t); \
                acc[r] = fma(s[r * GC_(C) + g], t, acc[r]);                                    \
            }                                                                                  \
        }                                                                                      \
        ZERO8_TERMS(C, PV, sp, k0, j0, acc)                                                    \
    }
#else
#define ZTYPE(C) float
#define ZERO_TERMS(C, zacc, out)
#define XPLANES(C, PV, k0, j0, xp)
#define TPIECE(C, PV, blk, k0, j0, xp, acc, zacc)                                              \
    {                                                                                          \
        __global const WTYPE* h = (__global const WTYPE*)(blk);                                \
        _Pragma("unroll") for (int p = 0; p < 8; p++) {                                        \
            const CAT(float, PV) xv = CAT(XLOAD, PV)((k0) + p * ((C) / 8) + (j0));             \
            _Pragma("unroll") for (int r = 0; r < RT; r++)                                     \
                acc[r] = fma(WLOAD(PV, h + r * (C) + p * ((C) / 8) + (j0)), xv, acc[r]);       \
        }                                                                                      \
    }
#endif

#if VEC >= 8
#define PV64 8                // piece width in a 64-wide chunk
#else
#define PV64 4
#endif
#define NP128 (16 / VEC)      // pieces per chunk
#define NP64 (8 / PV64)

#ifdef SWIGLU
#define NT (2 * TPW)          // tiles per work-item: TPW gate tiles and their up tiles
#else
#define NT TPW
#endif

#if !defined(PREFETCH) && !defined(INT_DOT)
#error "PREFETCH: its default is declared in engine/backends/opencl/specs.py"
#endif
#if FORMAT == 4 && PREFETCH > 1 && !defined(INT_DOT)
// The 128-chunks' pieces PREFETCH at a time (gemv.cl, int4): the weight words of all of them, PREFETCH x
// NT x RT loads of VEC words, go out before any arithmetic, so that a work-item has that many bytes in
// flight (with VEC 4 and one tile: PREFETCH x 64 bytes). Past the end a piece loads the last one again
// and skips its arithmetic. Other formats and the integer products walk one piece at a time.
#define WALK128                                                                                \
    for (int it = ks; it < n128 * NP128; it += PREFETCH * KSPLIT) {                            \
        CAT(uint, VEC) wp[PREFETCH][NT][RT];                                                   \
        _Pragma("unroll") for (int u = 0; u < PREFETCH; u++) {                                 \
            const int iu = min(it + u * KSPLIT, n128 * NP128 - 1);                             \
            _Pragma("unroll") for (int i = 0; i < NT; i++)                                     \
                TLOAD(128, VEC, W + tw[i] + (iu / NP128) * BLOCK_WORDS(128), (iu % NP128) * VEC, wp[u][i]) \
        }                                                                                      \
        _Pragma("unroll") for (int u = 0; u < PREFETCH; u++) {                                 \
            const int iu = it + u * KSPLIT;                                                    \
            if (iu < n128 * NP128) {                                                           \
                const int c = iu / NP128, j = (iu % NP128) * VEC;                              \
                XPLANES(128, VEC, c * 128, j, xp)                                              \
                _Pragma("unroll") for (int i = 0; i < NT; i++)                                 \
                    TPIECE_W(128, VEC, W + tw[i] + c * BLOCK_WORDS(128), c * 128, j, xp, wp[u][i], acc[i], zacc[i]) \
            }                                                                                  \
        }                                                                                      \
    }
#else
// One piece at a time: the including file's DOT128 (x loaded once for the NT tiles).
#define WALK128                                                                                \
    for (int it = ks; it < n128 * NP128; it += KSPLIT) {                                       \
        const int c = it / NP128, j = (it % NP128) * VEC;                                      \
        DOT128(c, j)                                                                           \
    }
#endif

// out[i][r] = this work-item's share of row r of tile i (word offsets tw[i] into W), i < NT: the
// chunk pieces it, ks, ks+KSPLIT, ... owns. x is loaded once per piece for all NT tiles.
#define TILES_DOT(tw, out)                                                                     \
    {                                                                                          \
        CAT(float, VEC) acc[NT][RT];                                                           \
        ZTYPE(128) zacc[NT];                                                                   \
        _Pragma("unroll") for (int i = 0; i < NT; i++) {                                       \
            zacc[i] = 0.0f;                                                                    \
            for (int r = 0; r < RT; r++) acc[i][r] = 0.0f;                                     \
        }                                                                                      \
        WALK128                                                                                \
        for (int i = 0; i < NT; i++) {                                                         \
            for (int r = 0; r < RT; r++) out[i][r] = HSUM(VEC, acc[i][r]);                     \
            ZERO_TERMS(128, zacc[i], out[i])                                                   \
        }                                                                                      \
        int it0 = n128 * NP128;                                                                \
        if (has64) {                                                                           \
            CAT(float, PV64) acc64[NT][RT];                                                    \
            ZTYPE(64) zacc64[NT];                                                              \
            for (int i = 0; i < NT; i++) {                                                     \
                zacc64[i] = 0.0f;                                                              \
                for (int r = 0; r < RT; r++) acc64[i][r] = 0.0f;                               \
            }                                                                                  \
            for (int it = it0 + (ks + KSPLIT - it0 % KSPLIT) % KSPLIT; it < it0 + NP64; it += KSPLIT) { \
                XPLANES(64, PV64, n128 * 128, (it - it0) * PV64, xp)                           \
                _Pragma("unroll") for (int i = 0; i < NT; i++)                                 \
                    TPIECE(64, PV64, W + tw[i] + n128 * BLOCK_WORDS(128), n128 * 128, (it - it0) * PV64, xp, acc64[i], zacc64[i]) \
            }                                                                                  \
            for (int i = 0; i < NT; i++) {                                                     \
                for (int r = 0; r < RT; r++) out[i][r] += HSUM(PV64, acc64[i][r]);             \
                ZERO_TERMS(64, zacc64[i], out[i])                                              \
            }                                                                                  \
            it0 += NP64;                                                                       \
        }                                                                                      \
        if (has32 && it0 % KSPLIT == ks) {                                                     \
            XPLANES(32, 4, K - 32, 0, xp)                                                      \
            for (int i = 0; i < NT; i++) {                                                     \
                float4 acc32[RT];                                                              \
                ZTYPE(32) zacc32 = 0.0f;                                                       \
                for (int r = 0; r < RT; r++) acc32[r] = 0.0f;                                  \
                TPIECE(32, 4, W + tw[i] + n128 * BLOCK_WORDS(128) + has64 * BLOCK_WORDS(64), K - 32, 0, xp, acc32, zacc32) \
                for (int r = 0; r < RT; r++) out[i][r] += hsum4(acc32[r]);                     \
                ZERO_TERMS(32, zacc32, out[i])                                                 \
            }                                                                                  \
        }                                                                                      \
    }


#endif
