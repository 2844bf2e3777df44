// GEMV for decode: y[n] (+)= sum_k W[n][k] * x[k], W quantized (int4 / int8) or fp16; for T tokens, each
// with the arithmetic of one token alone (serving's batch steps give bit-identical rows whatever the
// batch).
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
// (group*WG_ROWS + i) * TPW (with SWIGLU also the matching up tiles; all its tiles share each load of x) and the (chunk, piece)
// items ks, ks+KSPLIT, ... where a piece is VEC lanes of a chunk. Partial sums over ks meet in local
// memory. int4 zero terms use the group sums of x, computed once per call by the xsum kernel.
// CPU (PoCL): KSPLIT=1, VEC=16: each work-item runs explicit 512-bit vector code along K (PoCL's own
// vectorization across work-items reached only 1-2 GB/s on this kernel), with all of a block's loads
// issued before its arithmetic. GPU: VEC=4 and KSPLIT=16..32 so that neighbouring work-items read
// neighbouring 16-byte pieces.
//
// Per call, SmolLM2-135M shapes (bytes of packed weights incl. scales; FLOPs = 2*N*K):
//   int4 g32 576x576 (o): 0.21 MB, 0.66 MFLOP      int4 g32 960x576 (qkv): 0.35 MB, 1.1 MFLOP
//   int4 g32 3072x576 (gate+up): 1.1 MB, 3.5 MFLOP int4 g32 576x1536 (down): 0.55 MB, 1.8 MFLOP
//   int8 49152x576 (output): 30.1 MB, 57 MFLOP
// Reached, weights streamed from DRAM, launches included (scripts/bench_kernels.py, median):
//   PoCL 3.1 AVX-512, 1 thread: int4 g32 14 (576x576), 18 (qkv, gate+up), 21 (down) GB/s, int4 g128
//   K=1536 27 GB/s; int8 17-20 GB/s; fp16 28 GB/s. 2 threads: the small int4 shapes gain nothing (PoCL's
//   second thread joins 20-25 us into a command: scripts/pocl_threads.py), gate+up 21 GB/s, int8
//   36-38 GB/s, fp16 48 GB/s. At 1 thread the float int4 GEMV is bound by instructions (about 29 GMAC/s,
//   hardly faster with the weights in cache), not by the 40 GB/s a plain read reaches. The int-dot
//   path (INT_DOT, x in int16, the default on AVX-512BW), its quantize launch included, 1 thread:
//   16 (576x576), 21 (qkv, gate+up), 32 (down), 35 (g128 K1536) GB/s, 1.3-1.65x the float path with
//   its xsum launch (docs/performance.md); int8 49152x576 (output), its quantize launch included,
//   44 GB/s where the float path reaches 20.
//   NVIDIA H100 (kernels/tuning.toml): int4 g128 4096x4096 (8.4 MB) 416 GB/s, 11008x4096 815 GB/s, i.e.
//   97% and 78% of a plain copy kernel moving the same bytes per launch (scripts/gemv_bandwidth.py);
//   int8 1.15 TB/s, fp16 1.4 TB/s. At these sizes every kernel on that driver is launch-bound.
//
// Defines: FORMAT (4, 8, 16, 32), G (int4 group; int8: 32 or 16), SCALE_F32, ZERO8 (int8 zeros), VEC (4, 8, 16), KSPLIT (a power of two), WG_ROWS, TPW (row
// tiles per work-item), SWIGLU, USE_IMAGE, ZERO_INLINE (int4: each work-item adds the zero terms of its
// own lanes from the x it loaded, so no xsum launch; the NVIDIA setting). On CPUs the norms write the
// group sums of h instead (rmsnorm.cl XS_G), so the QKV and gate+up GEMVs need no xsum launch either.
// NORM (with HS_G, the group of h's sums): the residual projections' epilogue, last_item_norm below.
// NORM_IN (with NORM_STAGE): the input's RMSNorm in the prologue, the GPU counterpart (norm_in.h).

#ifndef FORMAT
#define FORMAT 4
#endif
#ifndef G
#define G 32
#endif
#ifndef VEC
#error "VEC: its default is declared in engine/backends/opencl/specs.py"
#endif
#ifndef KSPLIT
#error "KSPLIT: its default is declared in engine/backends/opencl/specs.py"
#endif
#ifndef WG_ROWS
#error "WG_ROWS: its default is declared in engine/backends/opencl/specs.py"
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
#define ZTYPE(C) CAT(float, RT_GC_##C)
// The data words of all rows are loaded before the scales: the loads go out together.
#define TPIECE(C, PV, blk, k0, j0, xp, acc, zacc)                                              \
    {                                                                                          \
        const int L = (C) / 8;                                                                 \
        CAT(uint, PV) wr[RT];                                                                  \
        _Pragma("unroll") for (int r = 0; r < RT; r++) wr[r] = CAT(vload, PV)(0, (blk) + r * L + (j0)); \
        __global const SCALE_T* sz = (__global const SCALE_T*)((blk) + RT * L);                \
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

#ifndef TPW
#error "TPW: its default is declared in engine/backends/opencl/specs.py"
#endif
#ifdef SWIGLU
#define NT (2 * TPW)          // tiles per work-item: TPW gate tiles and their up tiles
#else
#define NT TPW
#endif

// One 128-element chunk c (piece j) of the NT tiles: float x (XPLANES / TPIECE), or with INT_DOT
// int16 x against the int4 or int8 weights (IPIECE).
#ifdef INT_DOT
#if FORMAT >= 16 || VEC != 16 || KSPLIT != 1 || (FORMAT == 8 && (G != 32 || defined(ZERO8)))
#error "INT_DOT takes int4 or int8 (groups of 32, no zeros) weights, VEC 16 and KSPLIT 1"
#endif
// int4 x int16 on x86 CPUs with AVX-512BW or AVX2 (PoCL): x comes in int16 blocks of 32 (xq.h, 15
// bits: as exact as the float path for all practical purposes, unlike int8 activations, which moved
// the default model's answers; docs/performance.md). Per row and chunk the 64 weight
// bytes are transposed 4x4 within each 16-byte lane, so that lane m's bytes 4g..4g+3 hold group g
// (elements 32g..32g+31: byte g of words 4m..4m+3). Read as 32 16-bit words (word 8m + 2g + k: bytes
// 4g + 2k, 4g + 2k + 1 of lane m), each word's four nibbles are four vectors of 16-bit weights (and,
// shift), each multiplied with its own vector of x (vpmaddwd: adjacent products added into int32
// lane 4m + g, within one group), the four summed, converted, and scaled by weight scale x block
// scale of the lane's group. The zero terms come from the group sums xs of the values x holds.
// About 18 instructions per row and chunk where the float piece takes about 30; the tail chunks
// (64, 32) keep the float path.
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
#if G == 32                   // scales [RT][GC] -> lanes 4r + g, g the 32-block of the chunk
#define SCALES(sz) SVLOAD(16, sz)
#elif G == 64
#define SCALES(sz) SVLOAD(8, sz).s0011223344556677
#else
#define SCALES(sz) SVLOAD(4, sz).s0000111122223333
#endif
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
#else
#define DOT128(c, j)                                                                           \
    {                                                                                          \
        XPLANES(128, VEC, (c) * 128, j, xp)                                                    \
        _Pragma("unroll") for (int i = 0; i < NT; i++)                                         \
            TPIECE(128, VEC, W + tw[i] + (c) * BLOCK_WORDS(128), (c) * 128, j, xp, acc[i], zacc[i]) \
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
        for (int it = ks; it < n128 * NP128; it += KSPLIT) {                                   \
            const int c = it / NP128, j = (it % NP128) * VEC;                                  \
            DOT128(c, j)                                                                       \
        }                                                                                      \
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

inline float silu(float v) { return v / (1.0f + exp(-v)); }
#ifdef GELU   /* GeGLU (Gemma): the gate through GELU, tanh-approximated, in place of silu */
inline float gate_act(float v) { return 0.5f * v * (1.0f + tanh(0.7978845608f * mad(0.044715f * v, v * v, v))); }
#else
#define gate_act silu
#endif

// Group sums of x for the int4 zero terms: xs[g] = sum of x[g*G .. g*G + G). x: [T, K], xs: [T, K/G]
// (rows of x are whole groups, so the T rows are one run of groups). Global size T*K/G.
inline float group_sum(__global const float* restrict x, const int g)
{
    float16 sum = vload16(0, x + g * G);
    for (int k = 16; k < G; k += 16) sum += vload16(0, x + g * G + k);
    return hsum16(sum);
}

__kernel void xsum(__global const float* restrict x, __global float* restrict xs)
{
    xs[get_global_id(0)] = group_sum(x, get_global_id(0));
}

#include "xq.h"

#ifdef INT_DOT
// For the int-dot GEMV: x in int16 blocks (xq.h), xq [T, K], xd [T, K/32], and the group sums xs [T, K/G]
// that go with it. Global size T*K/G.
__kernel void quantize(__global const float* restrict x, __global float* restrict xs,
                       __global short* restrict xq, __global float* restrict xd, const int K)
{
    const int g = get_global_id(0);
    const int row = g * G / K, k0 = g * G - row * K;
    float sum = 0.0f;
    for (int b = 0; b < G; b += 32)
        sum += xq_block(x + (size_t)row * K, k0 + b, K, xq + (size_t)row * K, xd + (size_t)row * (K / 32));
    xs[g] = sum;
}
#endif

#ifdef NORM
// The residual projections' epilogue (o, down): y is the residual stream [T, N], updated in place
// (accumulate). The last work-item to finish, counted in `done` (left at 0 for the next launch),
// then writes h [T, N] = rmsnorm(y) * norm_w [N] and, with HS_G, hs [T, N/HS_G] = the group sums of
// h for the int4 GEMV that reads h next (with HQ also h in int16 blocks, xq.h, for the int-dot GEMV):
// the norm costs no launch of its own. One work-item and no
// barrier: on a CPU a row of a few thousand values is a microsecond, and PoCL's work-item loops stay
// simple. (GPUs keep the separate norm launch: tuning.toml gemv_norm.) y is read back through a
// volatile pointer, so the other work-items' writes are seen.
inline void last_item_norm(volatile __global const float* y, __global const float* restrict norm_w,
                           __global float* restrict h, __global float* restrict hs,
                           __global short* restrict hq, __global float* restrict hd,
                           volatile __global int* done, const int N, const int T, const float eps)
{
    mem_fence(CLK_GLOBAL_MEM_FENCE);                   // this work-item's rows are written
    if (atomic_inc(done) != (int)(get_global_size(0) * get_global_size(1)) - 1)
        return;
    mem_fence(CLK_GLOBAL_MEM_FENCE);
    for (int tok = 0; tok < T; tok++) {
        volatile __global const float* yt = y + (size_t)tok * N;
        float ssq = 0.0f;
        for (int n = 0; n < N; n++)
            ssq = mad(yt[n], yt[n], ssq);
        const float r = rsqrt(ssq / (float)N + eps);
        __global float* ht = h + (size_t)tok * N;
        for (int n = 0; n < N; n++)
            ht[n] = yt[n] * r * norm_w[n];
#ifdef HS_G
        for (int g = 0; g < N / HS_G; g++) {
            float sum = 0.0f;
#ifdef HQ
            for (int k0 = g * HS_G; k0 < (g + 1) * HS_G; k0 += 32)
                sum += xq_block(ht, k0, N, hq + (size_t)tok * N, hd + (size_t)tok * (N / 32));
#else
            for (int j = g * HS_G; j < (g + 1) * HS_G; j++)
                sum += ht[j];
#endif
            hs[(size_t)tok * (N / HS_G) + g] = sum;
        }
#endif
    }
    *done = 0;
}
#endif

#ifdef NORM
#define Y_RESTRICT            // y is read back by the last work-group
#else
#define Y_RESTRICT restrict
#endif

// W: row tiles [ceil(rows/4)][tile_words] (layout above); x: [T, K]; y: [T, N] where N = rows, or with
// SWIGLU N = rows/2 = F and y[t, f] = silu(gate f) * up f (GELU: gelu_tanh(gate f) * up f); xs_all: [T, K/G] group sums of x from xsum
// (int4 without ZERO_INLINE; any buffer otherwise); with INT_DOT, xq_all [T, K] int16 and xd_all
// [T, K/32] x in int16 blocks (xq.h). accumulate != 0: y += result. With NORM, after the product: h, hs
// and with HQ hq [T, N] int16, hd [T, N/32] from y (last_item_norm above); done: int [1], 0 before
// the launch.
// Global size (KSPLIT, WG_ROWS * ceil(ceil(ceil(N/4) / TPW) / WG_ROWS)).
__kernel __attribute__((reqd_work_group_size(KSPLIT, WG_ROWS, 1)))
void gemv(__global const uint* restrict W, X_ARG, __global float* Y_RESTRICT y,
          const int K, const int N, const int accumulate,
          __global const float* restrict xs_all, const int T
#ifdef INT_DOT
          , __global const short* restrict xq_all, __global const float* restrict xd_all
#endif
#ifdef NORM
          , __global const float* restrict norm_w, __global float* restrict h, __global float* restrict hs,
          __global short* restrict hq, __global float* restrict hd, __global int* done, const float eps
#endif
          NORM_IN_ARGS)
{
    const int ks = get_local_id(0);
    const int tile = get_group_id(1) * WG_ROWS + get_local_id(1);
    const int ntiles = (N + RT - 1) / RT;
    const int n128 = K / 128, has64 = (K / 64) & 1, has32 = (K / 32) & 1;
    const int tile_words = n128 * BLOCK_WORDS(128) + has64 * BLOCK_WORDS(64) + has32 * BLOCK_WORDS(32);

    size_t tw[NT];                // word offsets of the work-item's tiles (past the end: the last tile)
    for (int i = 0; i < TPW; i++) {
        const int t = min(tile * TPW + i, ntiles - 1);
        tw[i] = (size_t)t * tile_words;
#ifdef SWIGLU
        tw[TPW + i] = (size_t)(t + ntiles) * tile_words;
#endif
    }
#if KSPLIT > 1
    __local float part[WG_ROWS][NT * RT][KSPLIT];
    const int lr = get_local_id(1);
#endif

    // Token by token, each with exactly the arithmetic of a single token: a row's result does not
    // depend on how many tokens share the launch. The tiles stay in cache from one token to the next.
    for (int tok = 0; tok < T; tok++) {
        const int xo = tok * K;                              // x row of this token
        NORM_IN_PROLOGUE(tok)
        __global const float* restrict xs = xs_all + tok * (K / G);
#ifdef INT_DOT
        __global const short* restrict xq = xq_all + (size_t)tok * K;       // int16 x of this token
        __global const float* restrict xd = xd_all + (size_t)tok * (K / 32);
#endif
        float out[NT][RT];
        TILES_DOT(tw, out)

#if KSPLIT > 1
        // Tree reduction of the KSPLIT partial sums (KSPLIT a power of two).
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int i = 0; i < NT; i++)
            for (int r = 0; r < RT; r++) part[lr][i * RT + r][ks] = out[i][r];
        for (int s = KSPLIT / 2; s > 0; s /= 2) {
            barrier(CLK_LOCAL_MEM_FENCE);
            if (ks < s)
                for (int v = 0; v < NT * RT; v++) part[lr][v][ks] += part[lr][v][ks + s];
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        if (ks == 0)
            for (int i = 0; i < NT; i++)
                for (int r = 0; r < RT; r++) out[i][r] = part[lr][i * RT + r][0];
#endif
        __global float* restrict yt = y + (size_t)tok * N;
        if (ks == 0) {
            for (int i = 0; i < TPW && tile * TPW + i < ntiles; i++) {
                for (int r = 0; r < RT; r++) {
                    const int n = (tile * TPW + i) * RT + r;
                    if (n >= N) break;
#ifdef SWIGLU
                    const float v = gate_act(out[i][r]) * out[TPW + i][r];
#else
                    const float v = out[i][r];
#endif
                    yt[n] = accumulate ? yt[n] + v : v;
                }
            }
        }
    }
#ifdef NORM
    last_item_norm(y, norm_w, h, hs, hq, hd, done, N, T, eps);
#endif
}
