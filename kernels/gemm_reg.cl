// Many-token GEMM with two levels of tiles, in the manner of the fast SGEMMs (CLBlast's xgemm):
// Y[t][n] (+)= sum_k W[n][k] * X[t][k], W in the row-tile layout of gemv_tiles.h (tiles of RT = 4 rows;
// chunks of 128, then 64, then 32 elements; chunk C = 8 planes of L = C/8 lanes; element p*L + l is
// plane p, lane l: for int4 nibble p of word l), any weight format of wformat.h. Portable OpenCL 1.2.
//
// A work-group of NDIMC x MDIMC work-items owns MWG rows x NWG tokens (with SWIGLU MWG/2 gate rows and
// the matching MWG/2 up rows: one X tile serves both). It walks K in stages of KS = 8 KWW elements:
// lanes l0 .. l0+KWW of all 8 planes of one chunk (the order of the sum along K does not matter, so W
// and X are staged in the same permuted order). Per stage:
//   - the next stage's weights and X are loaded into registers before this stage's multiply, and stored
//     to the other half of the double-buffered local tiles after it, the weights dequantized to f32
//     (once per work-group; int4 when stored, other formats when loaded); one barrier per stage;
//   - local tiles are K-major, Wl[KS][MWG + PAD], Xl[KS][NWG + PAD]: the register tile's operands are
//     read as VW-wide vectors, work-item ri reading rows (i MDIMC + ri) VW .. + VW, so neighbouring
//     work-items read neighbouring vectors (no bank conflicts without padding on 32 banks of 4 bytes;
//     PAD is there for devices where it pays); weights are stored as float4s across a row tile's 4 rows;
//   - each work-item accumulates its MWI x TWI register tile (MWI = MWG/MDIMC rows, TWI = NWG/NDIMC
//     tokens) by outer products: MWI + TWI local reads for MWI TWI fmas.
// Local memory: 2 KS (MWG + NWG + 2 PAD) floats (specs.py GEMM_REG); 128 x 128 tiles with KS = 16: 32 KB.
// Global size (NDIMC ceil(T/NWG), MDIMC ceil(N/(MWG/NT))), work-group (NDIMC, MDIMC).
//
// Defines: FORMAT, G, SCALE_F32, ZERO8 (kernels/wformat.h); MWG, NWG, MDIMC, NDIMC, KWW (2 or 4), VW (2, 4),
// PAD (specs.py GEMM_REG, with their constraints); SWIGLU, GELU (kernels/epilogue.h).

#ifndef MWG
#error "MWG: its default is declared in engine/backends/opencl/specs.py"
#endif
#if !defined(NWG) || !defined(MDIMC) || !defined(NDIMC) || !defined(KWW) || !defined(VW) || !defined(PAD)
#error "NWG, MDIMC, NDIMC, KWW, VW, PAD: their defaults are declared in engine/backends/opencl/specs.py"
#endif

#define RT 4
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#include "wformat.h"
#include "tiles.h"

#define KS (8 * KWW)                  // elements of K per stage
#define WGS (MDIMC * NDIMC)           // work-items per work-group
#define MWI (MWG / MDIMC)             // rows of a work-item's register tile
#define TWI (NWG / NDIMC)             // tokens of a work-item's register tile
#define LDW (MWG + PAD)
#define LDX (NWG + PAD)
#define W_ITEMS ((MWG / RT) * 8)      // staging items of a stage's weights: (row tile, plane)
#define X_ITEMS (NWG * 8)             // ... of its inputs: (token, plane)
#define WPI ((W_ITEMS + WGS - 1) / WGS)
#define XPI ((X_ITEMS + WGS - 1) / WGS)
#define MOUT (MWG / NT)               // output rows per work-group

// Scales (and zeros) of a chunk block blk of width C: GC(C) groups per row, GRP(C, r, p) the group of plane p
// of row r. DEQ_PLANE: lanes l0 .. l0+KWW of plane p of row r, dequantized (floatKWW; int4 below).
#if FORMAT == 4
#define GC(C) ((C) >= G ? (C) / G : 1)
#define SCALES(C, blk) ((__global const SCALE_T*)((blk) + RT * (C) / 8))
#define GRP(C, r, p) ((r) * GC(C) + (p) / (8 / GC(C)))
#elif FORMAT == 8
#define GC(C) ((C) / G)
#define SCALES(C, blk) ((__global const SCALE_T*)((blk) + RT * (C) / 4))
#define GRP(C, r, p) ((r) * GC(C) + (p) / (8 / GC(C)))
#ifdef ZERO8
#define PLUS_Z8(C, blk, r, p) + SLOAD1(SCALES(C, blk), RT * GC(C) + GRP(C, r, p))
#else
#define PLUS_Z8(C, blk, r, p)
#endif
#define DEQ_PLANE(C, blk, r, l0, p)                                                            \
    (CAT(convert_float, KWW)(CAT(vload, KWW)(0, (__global const char*)(blk) + (r) * (C) + (p) * ((C) / 8) + (l0))) \
     * SLOAD1(SCALES(C, blk), GRP(C, r, p)) PLUS_Z8(C, blk, r, p))
#else
#define DEQ_PLANE(C, blk, r, l0, p) WLOAD(KWW, (__global const WTYPE*)(blk) + (r) * (C) + (p) * ((C) / 8) + (l0))
#endif

// A staged row's weights in registers, between the fetch before the multiply and the store after it:
//   W_REGS             the registers of WPI staging items' RT rows
//   FETCH_ROW(C, blk, q, r, l0, p)   loads row r of item q (plane p, lanes l0 ..)
//   W_FLOATS(q, p, r, out)           its KWW values, dequantized, to float out[KWW]
// int4 holds the words and the scale and zero as loaded (fp16 ones as their bits), so that nothing before the
// multiply waits on the loads; they are dequantized when stored. Other formats dequantize when loaded.
#if FORMAT == 4
#ifdef SCALE_F32
#define SBITS_T float
#define SBITS(p, i) ((p)[i])
#define SFLOAT(b) (b)
#else
#define SBITS_T ushort
#define SBITS(p, i) (((__global const ushort*)(p))[i])
#define SFLOAT(b) half_bits(b)
// The float value of fp16 bits b (finite), exact: normal halves re-biased, subnormal ones scaled.
inline float half_bits(const uint b)
{
    const uint m = b & 0x7fffu;
    const float mag = m < 0x400u ? (float)m * 0x1p-24f : as_float((m << 13) + (112u << 23));
    return (b & 0x8000u) ? -mag : mag;
}
#endif
#define W_REGS CAT(uint, KWW) wq[WPI][RT]; SBITS_T ws[WPI][RT], wz[WPI][RT];
#define FETCH_ROW(C, blk, q, r, l0, p)                                                         \
    {                                                                                          \
        wq[q][r] = CAT(vload, KWW)(0, (blk) + (r) * ((C) / 8) + (l0));                         \
        ws[q][r] = SBITS(SCALES(C, blk), GRP(C, r, p));                                        \
        wz[q][r] = SBITS(SCALES(C, blk), RT * GC(C) + GRP(C, r, p));                           \
    }
#define W_FLOATS(q, p, r, out)                                                                 \
    CAT(vstore, KWW)(DEQ4(KWW, wq[q][r], 4 * (p), SFLOAT(ws[q][r]), SFLOAT(wz[q][r])), 0, out);
#else
#define W_REGS float wr[WPI][RT][KWW];
#define FETCH_ROW(C, blk, q, r, l0, p) CAT(vstore, KWW)(DEQ_PLANE(C, blk, r, l0, p), 0, wr[q][r]);
#define W_FLOATS(q, p, r, out) for (int j_ = 0; j_ < KWW; j_++) (out)[j_] = wr[q][r][j_];
#endif

// Stage s of K: (chunk, its width C, first lane l0); the chunk's 128-wide stages, then the 64 and 32 tails.
inline int3 stage_of(int s, const int n128, const int has64)
{
    const int s128 = n128 * (16 / KWW), s64 = has64 * (8 / KWW);
    if (s < s128) return (int3)(s / (16 / KWW), 128, (s % (16 / KWW)) * KWW);
    s -= s128;
    if (s < s64) return (int3)(n128, 64, s * KWW);
    return (int3)(n128 + has64, 32, (s - s64) * KWW);
}

// Stage s into registers: W_REGS (row tile and plane of staging item lid + q WGS; rows past the
// matrix read its last tile, with SWIGLU the second half of the tiles are the up rows'), xr[q][j]
// (token and plane; tokens past T read the last token).
#define FETCH_W(C)                                                                             \
    for (int q = 0; q < WPI; q++) {                                                            \
        const int i = lid + q * WGS;                                                           \
        if (W_ITEMS % WGS == 0 || i < W_ITEMS) {                                               \
            const int lt = i % (MWG / RT), p = i / (MWG / RT), h = lt / (MOUT / RT);           \
            const int tl = h * ntiles + min(nb / RT + lt - h * (MOUT / RT), ntiles - 1);       \
            __global const uint* blk = W + (size_t)tl * tile_words + chunk_offset(st.x, n128, has64); \
            _Pragma("unroll") for (int r = 0; r < RT; r++) FETCH_ROW(C, blk, q, r, st.z, p)      \
        }                                                                                      \
    }
#define FETCH(s)                                                                               \
    {                                                                                          \
        const int3 st = stage_of(s, n128, has64);                                              \
        if (st.y == 128) FETCH_W(128) else if (st.y == 64) FETCH_W(64) else FETCH_W(32)        \
        const int k0 = chunk_k0(st.x, n128, has64) + st.z;                                     \
        for (int q = 0; q < XPI; q++) {                                                        \
            const int i = lid + q * WGS;                                                       \
            if (X_ITEMS % WGS == 0 || i < X_ITEMS) {                                           \
                const int t = i % NWG, p = i / NWG;                                            \
                const int tok = min(tb0 + t, T - 1);                                           \
                CAT(vstore, KWW)(CAT(vload, KWW)(0, X + (size_t)tok * K + k0 + p * (st.y / 8)), 0, xr[q]); \
            }                                                                                  \
        }                                                                                      \
    }

// The registers of a stage to local buffer b: element (plane p, lane j) at row p KWW + j.
#define STORE(b)                                                                               \
    {                                                                                          \
        for (int q = 0; q < WPI; q++) {                                                        \
            const int i = lid + q * WGS;                                                       \
            if (W_ITEMS % WGS == 0 || i < W_ITEMS) {                                           \
                const int lt = i % (MWG / RT), p = i / (MWG / RT);                             \
                float w[RT][KWW];                                                              \
                _Pragma("unroll") for (int r = 0; r < RT; r++) W_FLOATS(q, p, r, w[r])         \
                _Pragma("unroll") for (int j = 0; j < KWW; j++)                                \
                    vstore4((float4)(w[0][j], w[1][j], w[2][j], w[3][j]), 0,                   \
                            Wl[b] + (p * KWW + j) * LDW + lt * RT);                            \
            }                                                                                  \
        }                                                                                      \
        for (int q = 0; q < XPI; q++) {                                                        \
            const int i = lid + q * WGS;                                                       \
            if (X_ITEMS % WGS == 0 || i < X_ITEMS) {                                           \
                const int t = i % NWG, p = i / NWG;                                            \
                _Pragma("unroll") for (int j = 0; j < KWW; j++) Xl[b][(p * KWW + j) * LDX + t] = xr[q][j]; \
            }                                                                                  \
        }                                                                                      \
    }

// acc[a][c] += W[row a] X[token c] over the KS elements of local buffer b.
#define MULTIPLY(b)                                                                            \
    _Pragma("unroll") for (int k = 0; k < KS; k++) {                                           \
        float wv[MWI], xv[TWI];                                                                \
        _Pragma("unroll") for (int i = 0; i < MWI / VW; i++)                                   \
            CAT(vstore, VW)(CAT(vload, VW)(0, Wl[b] + k * LDW + (i * MDIMC + ri) * VW), 0, wv + i * VW); \
        _Pragma("unroll") for (int i = 0; i < TWI / VW; i++)                                   \
            CAT(vstore, VW)(CAT(vload, VW)(0, Xl[b] + k * LDX + (i * NDIMC + ti) * VW), 0, xv + i * VW); \
        _Pragma("unroll") for (int a = 0; a < MWI; a++)                                        \
            _Pragma("unroll") for (int c = 0; c < TWI; c++) acc[a][c] = fma(wv[a], xv[c], acc[a][c]); \
    }

// Local row of register-tile entry a of work-item index x along a dimension of DIMC work-items.
#define LOCAL_INDEX(a, x, DIMC) (((a) / VW * (DIMC) + (x)) * VW + (a) % VW)

// W: row tiles of rows = N (SWIGLU: 2N, gate rows then up rows); X: [T][K]; Y: [T][N].
__kernel __attribute__((reqd_work_group_size(NDIMC, MDIMC, 1)))
void gemm_reg(__global const uint* restrict W, __global const float* restrict X, __global float* restrict Y,
              const int T, const int K, const int N, const int accumulate)
{
    __local float Wl[2][KS * LDW];
    __local float Xl[2][KS * LDX];
    const int ti = get_local_id(0), ri = get_local_id(1), lid = ri * NDIMC + ti;
    const int tb0 = get_group_id(0) * NWG, nb = get_group_id(1) * MOUT;
    const int ntiles = (N + RT - 1) / RT;
    const int n128 = K / 128, has64 = (K / 64) & 1, has32 = (K / 32) & 1;
    const int tile_words = n128 * BLOCK_WORDS(128) + has64 * BLOCK_WORDS(64) + has32 * BLOCK_WORDS(32);
    const int stages = (n128 * 16 + has64 * 8 + has32 * 4) / KWW;

    float acc[MWI][TWI];
    for (int a = 0; a < MWI; a++) for (int c = 0; c < TWI; c++) acc[a][c] = 0.0f;
    W_REGS
    float xr[XPI][KWW];
    FETCH(0)
    STORE(0)
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = 0; s < stages; s++) {
        const int b = s & 1;
        if (s + 1 < stages) FETCH(s + 1)
        MULTIPLY(b)
        if (s + 1 < stages) STORE(b ^ 1)
        barrier(CLK_LOCAL_MEM_FENCE);
    }

    for (int c = 0; c < TWI; c++) {
        const int tok = tb0 + LOCAL_INDEX(c, ti, NDIMC);
        if (tok >= T) continue;
        for (int a = 0; a < MWI / NT; a++) {
            const int n = nb + LOCAL_INDEX(a, ri, MDIMC);
            if (n >= N) continue;
            store_out(Y + (size_t)tok * N + n, PRODUCT_OUT(acc[a][c], acc[a + MWI / NT][c]), accumulate);
        }
    }
}
