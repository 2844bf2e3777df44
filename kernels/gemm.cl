// GEMM for prefill: Y[t][n] (+)= sum_k W[n][k] * X[t][k] for T tokens; W in the row-tile layout of
// gemv.cl (tiles of RT = 4 rows; chunks of 128, then 64, then 32 elements; each chunk = 8 planes of
// L = C/8 consecutive elements; int4 nibble p of word l = element p*L + l; scales/zeros after the data).
//
// Two schemes:
//   gemm_few   (few tokens: tall-skinny, memory-bound on a GPU). A work-item owns one row tile and TT
//              tokens. It dequantizes each piece of weights once into registers (w = q*s + z) and
//              multiplies it into its RT x TT accumulators, so weights are read once per TT tokens.
//              Work-items along dimension 0 are the token tiles of one row tile: on a CPU they run back
//              to back and find the tile in L1. Global size (ceil(T/TT), ceil(N/4)), work-group
//              (ceil(T/TT), rows) with rows = 1 on CPUs.
//   gemm_tiled (many tokens: compute-bound). A work-group owns BN rows x BT tokens. It dequantizes kc
//              chunks of its BN rows into local memory Wl[BN][kc*128] (float, natural order) -- on a CPU
//              all of K at once, so one barrier per pass -- optionally copies X[BT][...] to local Xl,
//              then each work-item accumulates an RR x TR register tile of VEC-wide vectors along K
//              (reduced horizontally at the end). Global size (BT/TR * ceil(T/BT), BN/RR * ceil(N/BN)),
//              work-group (BT/TR, BN/RR).
//
// Per call for SmolLM2-135M shapes at T = 512 (2*T*N*K FLOPs): N x K = 576x576: 0.34 GFLOP,
// 1536x576: 0.91, 3072x576 (gate+up): 1.81, 576x1536 (down): 0.91; weights 0.2 - 1.1 MB, X 1.2 - 3.1 MB.
// Reached (scripts/bench_kernels.py, DEFAULT_PARAMS): PoCL 3.1 AVX-512, one thread: gemm_tiled
// 114 - 141 GFLOP/s (swiglu lowest), gemm_few at T = 16: 96 - 104 GFLOP/s; two threads: gemm_tiled
// 223 - 282 GFLOP/s, gemm_few 190 GFLOP/s. NVIDIA H100 (NVIDIA_PARAMS): gemm_tiled 2.3 - 4.7 TFLOP/s,
// gemm_few at T = 16: 0.5 - 0.95 TFLOP/s.
//
// Defines: FORMAT (4, 8, 16, 32), G (int4 group; int8: 32 or 16), SCALE_F32, ZERO8 (kernels/wformat.h), VEC (piece and micro-kernel width 4, 8, 16), TT (gemm_few
// tokens per work-item), BN, BT, RR, TR (gemm_tiled tiles; RR divides BN, TR divides BT, BN % 4 == 0),
// X_LOCAL (stage X in local memory), SWIGLU (Y[t][f] = silu(gate f) * up f; the up rows follow), GELU (with SWIGLU: GELU-tanh in place of silu).

#ifndef FORMAT
#define FORMAT 4
#endif
#ifndef G
#define G 32
#endif
#ifndef VEC
#error "VEC: its default is declared in engine/backends/opencl/specs.py"
#endif
#ifndef TT
#error "TT: its default is declared in engine/backends/opencl/specs.py"
#endif
#ifndef BN
#error "BN: its default is declared in engine/backends/opencl/specs.py"
#endif
#ifndef BT
#error "BT: its default is declared in engine/backends/opencl/specs.py"
#endif
#ifndef RR
#error "RR: its default is declared in engine/backends/opencl/specs.py"
#endif
#ifndef TR
#error "TR: its default is declared in engine/backends/opencl/specs.py"
#endif
#ifndef X_LOCAL
#error "X_LOCAL: its default is declared in engine/backends/opencl/specs.py"
#endif

#define RT 4
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)

#include "wformat.h"
#if FORMAT == 4
#define GC_(C) ((C) >= G ? (C) / G : 1)
#elif FORMAT == 8
#define GC_(C) ((C) / G)
#else
#define GC_(C) 1
#endif

#include "tiles.h"

// Scales (and int4 zeros) of a tile's chunk block, as floats s[RT][GC], z[RT][GC]: the block holds
// scale[RT][GC] then zero[RT][GC] (halves) after the data.
#if FORMAT == 4
#if G == 32
#define RT_GC_128 16
#define RT_GC_64 8
#elif G == 64
#define RT_GC_128 8
#define RT_GC_64 4
#else
#define RT_GC_128 4
#define RT_GC_64 4
#endif
#define RT_GC_32 4
#define LOAD_SZ(C, blk, s, z)                                                                  \
    float s[RT * GC_(C)], z[RT * GC_(C)];                                                      \
    CAT(vstore, RT_GC_##C)(SVLOAD(RT_GC_##C, (__global const SCALE_T*)((blk) + RT * (C) / 8)), 0, s); \
    CAT(vstore, RT_GC_##C)(SVLOAD(RT_GC_##C, (__global const SCALE_T*)((blk) + RT * (C) / 8) + RT * GC_(C)), 0, z);
// Plane p (elements p*L + j0 .. + PV) of row r, dequantized.
#define DEQ(C, PV, blk, r, j0, p, s, z)                                                        \
    (fma(CAT(convert_float, PV)((CAT(vload, PV)(0, (blk) + (r) * ((C) / 8) + (j0)) >> (4 * (p))) & 15u), \
         s[(r) * GC_(C) + (p) / (8 / GC_(C))], z[(r) * GC_(C) + (p) / (8 / GC_(C))]))
#elif FORMAT == 8
// int8 pieces are loaded as 32-bit words (one wide load) and reinterpreted as chars.
#define QLOAD_16(p) as_char16(vload4(0, (__global const uint*)(p)))
#define QLOAD_8(p) as_char8(vload2(0, (__global const uint*)(p)))
#define QLOAD_4(p) as_char4(*(__global const uint*)(p))
#define QLOAD(PV, p) CAT(QLOAD_, PV)(p)
#ifdef ZERO8
#define LOAD_Z8(C, blk, z)                                                                     \
    float z[RT * GC_(C)];                                                                      \
    LOAD_SCALES(RT_GC_##C, (__global const SCALE_T*)((blk) + RT * (C) / 4) + RT * GC_(C), z)
#define ADD_Z8(v, zv) ((v) + (zv))
#else
#define LOAD_Z8(C, blk, z)
#define ADD_Z8(v, zv) (v)
#endif
#define LOAD_SZ(C, blk, s, z)                                                                  \
    float s[RT * GC_(C)];                                                                      \
    LOAD_SCALES(RT_GC_##C, (__global const SCALE_T*)((blk) + RT * (C) / 4), s)               \
    LOAD_Z8(C, blk, z)
#define DEQ(C, PV, blk, r, j0, p, s, z)                                                        \
    ADD_Z8(CAT(convert_float, PV)(QLOAD(PV, (__global const char*)(blk) + (r) * (C) + (p) * ((C) / 8) + (j0))) \
           * s[(r) * GC_(C) + (p) / (8 / GC_(C))], z[(r) * GC_(C) + (p) / (8 / GC_(C))])
#else
#define LOAD_SZ(C, blk, s, z)
#define DEQ(C, PV, blk, r, j0, p, s, z)                                                        \
    WLOAD(PV, (__global const WTYPE*)(blk) + (r) * (C) + (p) * ((C) / 8) + (j0))
#endif

// ================================================================================================
// gemm_few
// ================================================================================================

// One piece (PV lanes from j0) of chunk C at block blk, for the RT rows of a tile and the tokens of
// this work-item: acc[r][t] += sum_p W[r][plane p] * X[t][plane p].
#define FEW_PIECE(C, PV, blk, k0, j0, acc)                                                     \
    {                                                                                          \
        LOAD_SZ(C, blk, s, z)                                                                  \
        _Pragma("unroll") for (int r = 0; r < RT; r++) {                                       \
            CAT(float, PV) wp[8];                                                              \
            _Pragma("unroll") for (int p = 0; p < 8; p++) wp[p] = DEQ(C, PV, blk, r, j0, p, s, z); \
            _Pragma("unroll") for (int t = 0; t < TT; t++) {                                   \
                __global const float* xr = X + (size_t)t * K + (k0) + (j0);                    \
                CAT(float, PV) a = acc[r][t];                                                  \
                _Pragma("unroll") for (int p = 0; p < 8; p++)                                  \
                    a = fma(wp[p], CAT(vload, PV)(0, xr + p * ((C) / 8)), a);                   \
                acc[r][t] = a;                                                                 \
            }                                                                                  \
        }                                                                                      \
    }

#if VEC >= 8
#define PV64 8
#else
#define PV64 4
#endif

// out[r][t] = dot(row r of tile at wt, X[t]) for the TT tokens at X.
#define FEW_TILE(wt, out)                                                                      \
    {                                                                                          \
        CAT(float, VEC) acc[RT][TT];                                                           \
        for (int r = 0; r < RT; r++) for (int t = 0; t < TT; t++) acc[r][t] = 0.0f;            \
        for (int c = 0; c < n128; c++)                                                         \
            for (int j = 0; j < 128 / 8; j += VEC)                                             \
                FEW_PIECE(128, VEC, (wt) + c * BLOCK_WORDS(128), c * 128, j, acc)              \
        for (int r = 0; r < RT; r++) for (int t = 0; t < TT; t++) out[r][t] = CAT(hsum, VEC)(acc[r][t]); \
        if (has64) {                                                                           \
            CAT(float, PV64) acc64[RT][TT];                                                    \
            for (int r = 0; r < RT; r++) for (int t = 0; t < TT; t++) acc64[r][t] = 0.0f;      \
            for (int j = 0; j < 8; j += PV64)                                                  \
                FEW_PIECE(64, PV64, (wt) + n128 * BLOCK_WORDS(128), n128 * 128, j, acc64)      \
            for (int r = 0; r < RT; r++) for (int t = 0; t < TT; t++) out[r][t] += CAT(hsum, PV64)(acc64[r][t]); \
        }                                                                                      \
        if (has32) {                                                                           \
            float4 acc32[RT][TT];                                                              \
            for (int r = 0; r < RT; r++) for (int t = 0; t < TT; t++) acc32[r][t] = 0.0f;      \
            FEW_PIECE(32, 4, (wt) + n128 * BLOCK_WORDS(128) + has64 * BLOCK_WORDS(64), K - 32, 0, acc32) \
            for (int r = 0; r < RT; r++) for (int t = 0; t < TT; t++) out[r][t] += hsum4(acc32[r][t]); \
        }                                                                                      \
    }

// W: row tiles (gemv.cl layout) of rows = N (SWIGLU: 2N); X: [T][K]; Y: [T][N]. Token tiles past T
// read the last token again (X rows are clamped) and store nothing.
__kernel void gemm_few(__global const uint* restrict W, __global const float* restrict Xg,
                       __global float* restrict Y, const int T, const int K, const int N, const int accumulate)
{
    const int t0 = get_global_id(0) * TT;
    const int tile = get_global_id(1);
    const int ntiles = (N + RT - 1) / RT;
    if (tile >= ntiles || t0 >= T) return;
    const int n128 = K / 128, has64 = (K / 64) & 1, has32 = (K / 32) & 1;
    const int tile_words = n128 * BLOCK_WORDS(128) + has64 * BLOCK_WORDS(64) + has32 * BLOCK_WORDS(32);
    // A partial last token tile recomputes the last full tile's tokens; its stores are skipped.
    const int tbase = min(t0, max(T - TT, 0));
    __global const float* X = Xg + (size_t)tbase * K;

    float out[NT][RT][TT];
    FEW_TILE(W + (size_t)tile * tile_words, out[0])
#ifdef SWIGLU
    FEW_TILE(W + (size_t)(tile + ntiles) * tile_words, out[1])
#endif
    for (int t = 0; t < TT; t++) {
        const int tok = tbase + t;
        if (tok < t0 || tok >= T) continue;
        for (int r = 0; r < RT; r++) {
            const int n = tile * RT + r;
            if (n >= N) break;
#ifdef SWIGLU
            const float v = gate_act(out[0][r][t]) * out[1][r][t];
#else
            const float v = out[0][r][t];
#endif
            __global float* yp = Y + (size_t)tok * N + n;
            *yp = accumulate ? *yp + v : v;
        }
    }
}

// ================================================================================================
// gemm_tiled
// ================================================================================================

// Stage chunk c (width C, elements k0 .. k0+C of K) at column `col` of the local tiles: Wl[BN][KW]
// gets the dequantized rows n0 .. n0+BN (tiles past the matrix read its last tile), Xl[BT][KW] the
// inputs of tokens tb0 .. tb0+BT (tokens past T read the last token). Dequantization items are
// (tile, piece of PV lanes).
#if X_LOCAL
#define STAGE_X(C, k0, col)                                                                    \
        for (int i = lid; i < BT * ((C) / 16); i += NWI) {                                     \
            const int t = i / ((C) / 16), k = (i % ((C) / 16)) * 16;                           \
            const int tok = min(tb0 + t, T - 1);                                               \
            vstore16(vload16(0, X + (size_t)tok * K + (k0) + k), 0, Xl + t * KW + (col) + k);   \
        }
#else
#define STAGE_X(C, k0, col)
#endif
#define STAGE(C, PV, c, k0, col)                                                               \
    {                                                                                          \
        for (int i = lid; i < (BN / RT) * ((C) / 8 / PV); i += NWI) {                           \
            const int bt = i / ((C) / 8 / PV), j = (i % ((C) / 8 / PV)) * PV;                   \
            const int tl = min(n0 / RT + bt, ntiles - 1) + up * ntiles;                        \
            __global const uint* blk = W + (size_t)tl * tile_words + chunk_offset(c, n128, has64); \
            LOAD_SZ(C, blk, s, z)                                                              \
            _Pragma("unroll") for (int r = 0; r < RT; r++)                                     \
                _Pragma("unroll") for (int p = 0; p < 8; p++)                                  \
                    CAT(vstore, PV)(DEQ(C, PV, blk, r, j, p, s, z), 0, Wl + (bt * RT + r) * KW + (col) + p * ((C) / 8) + j); \
        }                                                                                      \
        STAGE_X(C, k0, col)                                                                    \
    }

// acc[i][j] += Wl[row i] . X[token j] over the C staged elements (C a multiple of 16).
#if X_LOCAL
#define XROW(j) (Xl + (ti * TR + (j)) * KW)
#else
#define XROW(j) (X + (size_t)min(tb0 + ti * TR + (j), T - 1) * K + kbase)
#endif
#define MICRO(C)                                                                               \
    for (int k = 0; k < (C); k += VEC) {                                                       \
        CAT(float, VEC) wv[RR], xv[TR];                                                        \
        _Pragma("unroll") for (int i = 0; i < RR; i++) wv[i] = CAT(vload, VEC)(0, Wl + (ri * RR + i) * KW + k); \
        _Pragma("unroll") for (int j = 0; j < TR; j++) xv[j] = CAT(vload, VEC)(0, XROW(j) + k); \
        _Pragma("unroll") for (int i = 0; i < RR; i++)                                         \
            _Pragma("unroll") for (int j = 0; j < TR; j++) acc[i][j] = fma(wv[i], xv[j], acc[i][j]); \
    }

// W: row tiles of rows = N (SWIGLU: 2N); X: [T][K]; Y: [T][N].
// Pass 0 accumulates the rows n0 .. n0+BN (with SWIGLU the gate rows), pass 1 the up rows.
// Wl: local [BN][KW], Xl: local [BT][KW] (X_LOCAL) where KW = kc * 128: kc chunks of K are staged
// between two barriers.
__kernel __attribute__((reqd_work_group_size(BT / TR, BN / RR, 1)))
void gemm_tiled(__global const uint* restrict W, __global const float* restrict X,
                __global float* restrict Y, const int T, const int K, const int N, const int accumulate,
                __local float* restrict Wl, __local float* restrict Xl, const int kc)
{
    TILE_IDS

    float out[NT][RR][TR];
    for (int up = 0; up < NT; up++) {
        CAT(float, VEC) acc[RR][TR];
        for (int i = 0; i < RR; i++) for (int j = 0; j < TR; j++) acc[i][j] = 0.0f;
        for (int c0 = 0; c0 < nchunks; c0 += kc) {
            const int kbase = chunk_k0(c0, n128, has64);
            int col = 0;
            barrier(CLK_LOCAL_MEM_FENCE);
            for (int c = c0; c < min(c0 + kc, nchunks); c++) {
                if (c < n128) {
                    STAGE(128, VEC, c, c * 128, col)
                    col += 128;
                } else if (c == n128 && has64) {
                    STAGE(64, PV64, c, n128 * 128, col)
                    col += 64;
                } else {
                    STAGE(32, 4, c, K - 32, col)
                    col += 32;
                }
            }
            barrier(CLK_LOCAL_MEM_FENCE);
            MICRO(col)
        }
        for (int i = 0; i < RR; i++) for (int j = 0; j < TR; j++) out[up][i][j] = CAT(hsum, VEC)(acc[i][j]);
    }
    STORE_TILE(out)
}
