// GEMM for prefill on matrix units: Y[t][n] (+)= sum_k W[n][k] * X[t][k], int4 weights in the row-tile
// layout of gemv_tiles.h (tiles of RT = 4 rows; chunks of 128, then one of 64, along K; a chunk of C elements
// is 8 planes of L = C/8 consecutive elements, nibble p of word l = element p*L + l; the tile's
// scale[RT][C/G] and zero[RT][C/G] halves after the nibbles; w = q * scale + zero).
//
// x_to_half first converts X to fp16 (Xh), once per product. A work-group of gemm_mma owns BN weight
// rows x BT tokens and walks K in stages of KS elements (64: half a 128-chunk or the 64-chunk; 32: a
// quarter or a half): it dequantizes the stage's W[BN][KS] to fp16 into local memory (each weight once per
// work-group) and copies Xh[BT][KS] beside it; then each warp (32 consecutive work-items) multiplies its
// WM x WN sub-tile with mma.sync.m16n8k16 (fp16 operands, f32 accumulators, NVIDIA inline PTX, sm_80 and
// later; fragments: mma_sync.h) in MT x NT fragments of 16 rows x 8 tokens, while the next stage's nibble
// words, scales and fp16 inputs load from global memory into registers (IW + IX items per work-item).
// A row of the local tiles holds LDS = KS + 8 halves, so the 8 rows of one fragment load (32-bit loads or
// ldmatrix) hit distinct banks.
//
// The pipeline's options (engine/backends/opencl/specs.py, GEMM_MMA):
//   BUFS 1       one local buffer: barrier, store stage s, barrier, multiply stage s (loading s + 1);
//   BUFS 2       two: multiply stage s from one buffer while stage s + 1 is stored into the other, one
//                barrier per stage (KS 32 fits two buffers of 128 x 128 tiles in 48 KB);
//   WORDS_ONCE   a chunk's nibble words load into registers once, at its first stage (else each stage
//                loads them again and uses its own planes);
//   DEQ_H2       int4 -> fp16 in half2 arithmetic (deq_half2 below: prmt, lop3, sub.f16x2, fma.rn.f16x2),
//                else in f32 (wformat.h's DEQ4) converted to fp16;
//   LDSM         fragments by ldmatrix.sync.aligned.m8n8.x4 (one instruction per A fragment and per two
//                B fragments) instead of 32-bit loads; its value says how a __local pointer becomes a
//                shared-window address (smem_addr below): 1 isspacep decides, 2 the pointer's value as
//                it is, 3 cvta.to.shared of it.
//
// SWIGLU (Y[t][f] = act(gate f) * up f, the up rows following the gate rows in W; act silu, or with GELU
// the tanh-approximated GELU: epilogue.h): each 16-row block
// of the local W tile holds 8 gate rows then their 8 up rows, so a lane finds gate in d0/d1 and up in
// d2/d3; a work-group then covers BN / 2 outputs.
//
// MMA = 0 replaces each PTX instruction by ordinary code on the same per-lane registers (mma_sync.h's
// emulation; ldmatrix's row addresses and fragments exchanged through local memory; the half2
// dequantization's bit steps as integer operations, its two half2 operations in f32 rounded to fp16):
// the same staging, tiles, fragments and epilogue, so CPUs (PoCL) check all but the instructions.
//
// Launch: x_to_half global (ceil(T * K / 4)); gemm_mma global (NWI * ceil(T / BT), ceil(N / OUT_N)),
// local (NWI, 1); NWI = 32 * (BN/WM) * (BT/WN).
// Needs K % 64 == 0 and FORMAT 4 (int4) with G in 32, 64, 128 (C / G groups per chunk).
// Local memory: BUFS * (BN + BT) * LDS * 2 bytes (BN = BT = 128: 36.9 KB with KS 64 and one buffer,
// 40 KB with KS 32 and two; NVIDIA's OpenCL allows 48 KB), plus 24 bytes per work-item when MMA = 0.
// Reached on the H200 (BN = BT = 128, WM = 32, WN = 64, KS 64, one buffer, f32 dequantization, 32-bit
// loads): 124 TFLOP/s on 12288 x 4096 x 512 (docs/performance.md, H200 section).

#if !defined(BN) || !defined(BT) || !defined(WM) || !defined(WN) || !defined(KS) || !defined(BUFS) || !defined(WORDS_ONCE)
#error "BN, BT, WM, WN, KS, BUFS, WORDS_ONCE: their defaults are declared in engine/backends/opencl/specs.py"
#endif
#if !defined(DEQ_H2) || !defined(LDSM)
#error "DEQ_H2, LDSM: set by engine/backends/opencl/gemm_mma.py from mma_deq and mma_ldmatrix"
#endif
#ifndef MMA
#define MMA 1
#endif

#define RT 4
#define FORMAT 4                         // int4 weights: wformat.h's blocks and dequantization
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#include "wformat.h"
#define LDS (KS + 8)                     // halves per local row
#define LDW (LDS / 2)                    // words per local row
#define SPC (128 / KS)                   // stages per 128-chunk
#define PPS(C) (KS / ((C) / 8))          // planes of a C-chunk per stage
#define TWO_GROUPS (KS == 64 && G == 32) // a stage spans two groups of scales
#define MT (WM / 16)                     // fragments along the rows of a warp tile
#define NT (WN / 8)                      // fragments along the tokens
#define WARPS_M (BN / WM)
#define NWI (32 * WARPS_M * (BT / WN))
#ifdef SWIGLU
#define OUT_N (BN / 2)
#else
#define OUT_N BN
#endif

#define IW (BN * 8 / NWI)                // W items (row, word pair) per work-item in a stage
#define IX (BT * KS / 8 / NWI)           // X items (8 halves) per work-item in a stage
#if BN % WM || BT % WN || WM % 16 || WN % 8 || (BN * 8) % NWI || (BT * KS / 8) % NWI || IW % 2
#error "gemm_mma: BN % WM, BT % WN, WM % 16, WN % 8, BN * 8 % NWI, BT * KS / 8 % NWI and IW % 2 must be 0"
#endif
#if (KS != 32 && KS != 64) || (BUFS != 1 && BUFS != 2) || (LDSM && WN % 16)
#error "gemm_mma: KS is 32 or 64, BUFS 1 or 2, and with LDSM WN % 16 == 0"
#endif

#include "epilogue.h"
#include "mma_sync.h"
#if MMA
#define UNROLL _Pragma("unroll")         // loops over fragments: the accumulators stay in registers
#else
#define UNROLL
#endif

// The scale and zero registers of a W item: (scale, zero) of its stage's group, and of the second group
// with TWO_GROUPS; in f32, or with DEQ_H2 each as an fp16 pair (the same half twice).
#if DEQ_H2
#define SZ1(p, i) (((__global const ushort*)(p))[i] * 0x10001u)
#define SZ_T(n) CAT(uint, n)
#else
#define SZ1(p, i) vload_half(i, p)
#define SZ_T(n) CAT(float, n)
#endif
#if TWO_GROUPS
typedef SZ_T(4) sz_t;
#define LOAD_SZ(p, gc, g0, g1) (sz_t)(SZ1(p, g0), SZ1(p, RT * (gc) + (g0)), SZ1(p, g1), SZ1(p, RT * (gc) + (g1)))
#define SCALE_OF(v, second) ((second) ? (v).z : (v).x)
#define ZERO_OF(v, second) ((second) ? (v).w : (v).y)
#else
typedef SZ_T(2) sz_t;
#define LOAD_SZ(p, gc, g0, g1) (sz_t)(SZ1(p, g0), SZ1(p, RT * (gc) + (g0)))
#define SCALE_OF(v, second) (v).x
#define ZERO_OF(v, second) (v).y
#endif

#if DEQ_H2
// The 16-bit half `hi` (0 low, 1 high) of a in the low half, that of b in the high half: prmt.b32.
inline uint halves(const uint a, const uint b, const int hi)
{
#if MMA
    uint d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(hi ? 0x7632u : 0x5410u));
    return d;
#else
    return hi ? (a >> 16) | (b & 0xffff0000u) : (a & 0xffffu) | (b << 16);
#endif
}

// Plane p of the word pair w (w.x holds element l, w.y element l + 1) dequantized to the fp16 pair
// (w_l, w_l+1) in one register, s2 and z2 the scale and zero as fp16 pairs: the two words' 16-bit halves
// that hold plane p brought together (prmt), the nibbles masked into the mantissas of 1024.0
// ((t & 0x000f000f) | 0x64006400 = 1024 + q, exactly: lop3), 1024 subtracted (exact), then q * scale +
// zero with one rounding (fma.rn.f16x2). The shorter fma(1024 + q, scale, zero - 1024 scale) would round
// zero - 1024 scale to fp16, an error of up to half a scale.
inline uint deq_half2(const uint2 w, const int p, const uint s2, const uint z2)
{
    const uint t = halves(w.x, w.y, p >> 2) >> (4 * (p & 3));
#if MMA
    uint d;
    asm("{\n\t.reg .b32 h, k;\n\t"
        "lop3.b32 h, %1, 0x000f000f, 0x64006400, 0xea;\n\t"       // (a & b) | c
        "mov.b32 k, 0x64006400;\n\t"
        "sub.f16x2 h, h, k;\n\t"
        "fma.rn.f16x2 %0, h, %2, %3;\n\t}"
        : "=r"(d) : "r"(t), "r"(s2), "r"(z2));
    return d;
#else
    uint h = (t & 0x000f000fu) | 0x64006400u, d;
    const float2 q = vload_half2(0, (const __private half*)&h) - 1024.0f;
    vstore_half2_rte(fma(q, vload_half2(0, (const __private half*)&s2), vload_half2(0, (const __private half*)&z2)),
                     0, (__private half*)&d);
    return d;
#endif
}
#define DEQ_STORE(w, p, sc, ze, dst) (*(__local uint*)(dst) = deq_half2(w, p, sc, ze))
#else
#define DEQ_STORE(w, p, sc, ze, dst) vstore_half2_rte(DEQ4(2, w, 4 * (p), (float2)(sc), (float2)(ze)), 0, dst)
#endif

#if LDSM
// ldmatrix.x4: lane L gives the address of row L % 8 of matrix L / 8 and gets, in register m, the halves
// 2q, 2q+1 of row g of matrix m. This lane's row (in words from the buffer's start) for an A fragment at
// local row r0 (matrices: rows r0.. at k, rows r0 + 8.. at k, both at k + 8: a0..a3) and for the B
// fragments of tokens t0.. and t0 + 8.. (matrices: t0.. at k, at k + 8, then t0 + 8..: b0, b1 of each).
#define A_ROW(r0) (((r0) + ((lane >> 3) & 1) * 8 + (lane & 7)) * LDW + (lane >> 4) * 4)
#define B_ROW(t0) (((t0) + (lane >> 4) * 8 + (lane & 7)) * LDW + ((lane >> 3) & 1) * 4)
#if MMA
// The shared-window address of a __local pointer (LDSM 1: isspacep tells a generic address from a window
// address; 2: the pointer's value; 3: cvta.to.shared of it).
inline uint smem_addr(__local const void* p)
{
    const ulong v = (ulong)p;
#if LDSM == 2
    return (uint)v;
#else
    ulong a;
#if LDSM == 1
    asm("{\n\t.reg .pred s;\n\t.reg .u64 c;\n\tisspacep.shared s, %1;\n\tcvta.to.shared.u64 c, %1;\n\t"
        "selp.b64 %0, c, %1, s;\n\t}" : "=l"(a) : "l"(v));
#else
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(v));
#endif
    return (uint)a;
#endif
}
#define LDSM_X4(r, buf, sa, word)                                                              \
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"               \
                 : "=r"((r)[0]), "=r"((r)[1]), "=r"((r)[2]), "=r"((r)[3]) : "r"((sa) + 4 * (word)) : "memory")
#else
#define LDSM_X4(r, buf, sa, word) ldsm_emulated((r), (buf), (word), xa, lid)

// ldmatrix.x4 for the warp of lid, each lane giving its row's word offset in buf: through local memory.
inline void ldsm_emulated(uint* r, __local const uint* buf, const int word, __local uint* xa, const int lid)
{
    xa[lid] = word;
    barrier(CLK_LOCAL_MEM_FENCE);
    const int w = lid & ~31, g = (lid & 31) >> 2, q = lid & 3;
    for (int m = 0; m < 4; m++)
        r[m] = buf[xa[w + 8 * m + g] + q];
    barrier(CLK_LOCAL_MEM_FENCE);
}
#endif
// Fragments of kk in buffer cb: B of all NT token blocks (b[2j], b[2j+1]), A of row block i.
#define LOAD_B(b, cb, kk)                                                                      \
    UNROLL for (int jj = 0; jj < NT / 2; jj++)                                                 \
        LDSM_X4((b) + 4 * jj, Xl, xsa, (cb) * BT * LDW + B_ROW(wn + jj * 16) + (kk) / 2);
#define LOAD_A(a, cb, i, kk) LDSM_X4(a, Wl, wsa, (cb) * BN * LDW + A_ROW(wm + (i) * 16) + (kk) / 2);
#else
#define LOAD_B(b, cb, kk)                                                                      \
    UNROLL for (int j = 0; j < NT; j++) {                                                      \
        const int x = (cb) * BT * LDW + (wn + j * 8 + g) * LDW + (kk) / 2 + q;                 \
        (b)[2 * j] = Xl[x];                                                                    \
        (b)[2 * j + 1] = Xl[x + 4];                                                            \
    }
#define LOAD_A(a, cb, i, kk)                                                                   \
    {                                                                                          \
        const int x = (cb) * BN * LDW + (wm + (i) * 16 + g) * LDW + (kk) / 2 + q;              \
        (a)[0] = Wl[x];                                                                        \
        (a)[1] = Wl[x + 8 * LDW];                                                              \
        (a)[2] = Wl[x + 4];                                                                    \
        (a)[3] = Wl[x + 8 * LDW + 4];                                                          \
    }
#endif

// X [n] f32 -> Xh [n] fp16 (n % 4 == 0), once per product: the GEMM stages X as fp16 copies.
__kernel void x_to_half(__global const float* restrict X, __global half* restrict Xh, const int n)
{
    const int i = get_global_id(0) * 4;
    if (i < n) vstore_half4_rte(vload4(0, X + i), 0, Xh + i);
}

// The W item u of this work-item in a stage of chunk width C: local row r, word pair j.
#define W_ITEM(C, u, r, j) const int i_ = lid + (u) * NWI, r = i_ / ((C) / 16), j = (i_ % ((C) / 16)) * 2

// Global -> registers: stage s's nibble words (wq; with WORDS_ONCE only at a chunk's first stage), the
// scale and zero of its one or two groups (wsz), and its X halves (xq). The 64-chunk's stages have half as
// many W items.
#define LOAD_W(C, s)                                                                           \
    UNROLL for (int u = 0; u < IW * (C) / 128; u++) {                                          \
        W_ITEM(C, u, r, j);                                                                    \
        const int n = min(out0 + ROW_N(r), N - 1);                                             \
        __global const uint* blk = W + (size_t)(n / RT + ROW_UP(r) * ntiles) * tile_words + ((s) / SPC) * BLOCK_WORDS(128); \
        const int row = n % RT, gc = (C) / G, g0 = ((s) % SPC) * KS / G, g1 = (((s) % SPC) * KS + 32) / G; \
        __global const half* sz = (__global const half*)(blk + RT * ((C) / 8)) + row * gc;     \
        if (!WORDS_ONCE || (s) % SPC == 0) wq[u] = vload2(0, blk + row * ((C) / 8) + j);      \
        wsz[u] = LOAD_SZ(sz, gc, g0, g1);                                                      \
    }
#define LOAD(s)                                                                                \
    {                                                                                          \
        if ((s) / SPC < n128) LOAD_W(128, s) else LOAD_W(64, s)                                \
        UNROLL for (int u = 0; u < IX; u++) {                                                  \
            const int i = lid + u * NWI, t = i / (KS / 8), k = (i % (KS / 8)) * 8;             \
            xq[u] = vload4(0, (__global const uint*)(Xh + (size_t)min(tb0 + t, T - 1) * K + (s) * KS + k)); \
        }                                                                                      \
    }
// Registers -> local buffer cb, W dequantized: plane p0 + pp of the item's two words is stage elements
// pp*L + j, pp*L + j + 1 (L = C / 8); with TWO_GROUPS the second group starts at element 32.
#define STORE_W(C, s, cb)                                                                      \
    UNROLL for (int u = 0; u < IW * (C) / 128; u++) {                                          \
        W_ITEM(C, u, r, j);                                                                    \
        const int p0 = ((s) % SPC) * PPS(C);                                                   \
        _Pragma("unroll") for (int pp = 0; pp < PPS(C); pp++) {                                \
            const int second = TWO_GROUPS && pp * ((C) / 8) >= 32;                             \
            DEQ_STORE(wq[u], p0 + pp, SCALE_OF(wsz[u], second), ZERO_OF(wsz[u], second),       \
                      Wh + ((cb) * BN + r) * LDS + pp * ((C) / 8) + j);                        \
        }                                                                                      \
    }
#define STORE(s, cb)                                                                           \
    {                                                                                          \
        if ((s) / SPC < n128) STORE_W(128, s, cb) else STORE_W(64, s, cb)                      \
        UNROLL for (int u = 0; u < IX; u++) {                                                  \
            const int i = lid + u * NWI, t = i / (KS / 8), k = (i % (KS / 8)) * 8;             \
            vstore4(xq[u], 0, Xl + ((cb) * BT + t) * LDW + k / 2);                             \
        }                                                                                      \
    }
// acc += the stage in local buffer cb, by this warp's fragments.
#define MULTIPLY(cb)                                                                           \
    UNROLL for (int kk = 0; kk < KS; kk += 16) {                                               \
        uint b[2 * NT], a[4];                                                                  \
        LOAD_B(b, cb, kk)                                                                      \
        UNROLL for (int i = 0; i < MT; i++) {                                                  \
            LOAD_A(a, cb, i, kk)                                                               \
            UNROLL for (int j = 0; j < NT; j++) MMA_16816(acc[i][j], a, b[2 * j], b[2 * j + 1]); \
        }                                                                                      \
    }

#ifdef SWIGLU
#define ROW_N(r) (((r) >> 4) * 8 + ((r) & 7))
#define ROW_UP(r) (((r) >> 3) & 1)
#else
#define ROW_N(r) (r)
#define ROW_UP(r) 0
#endif

// W: int4 row tiles (rows N, SWIGLU 2N); Xh: [T][K] fp16 (x_to_half); Y: [T][N] f32.
// Stage s + 1 is loaded into registers while stage s is multiplied.
__kernel __attribute__((reqd_work_group_size(NWI, 1, 1)))
void gemm_mma(__global const uint* restrict W, __global const half* restrict Xh, __global float* restrict Y,
              const int T, const int K, const int N, const int accumulate)
{
    // 16-byte rows for ldmatrix and the X stores (LDS * 2 bytes is a multiple of 16)
    __local uint Wl[BUFS * BN * LDW] __attribute__((aligned(16)));    // W stages [BUFS][BN][LDS] halves
    __local uint Xl[BUFS * BT * LDW] __attribute__((aligned(16)));    // X stages [BUFS][BT][LDS] halves
    __local half* Wh = (__local half*)Wl;
#if !MMA
    __local uint xa[4 * NWI], xb[2 * NWI];   // the warps' registers (mma_sync.h, ldsm_emulated)
#endif

    const int lid = get_local_id(0), lane = lid & 31, warp = lid >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int wm = (warp % WARPS_M) * WM, wn = (warp / WARPS_M) * WN;
    const int tb0 = get_group_id(0) * BT, out0 = get_group_id(1) * OUT_N;
    const int ntiles = (N + RT - 1) / RT;
    const int n128 = K / 128, has64 = (K / 64) & 1;
    const int tile_words = n128 * BLOCK_WORDS(128) + has64 * BLOCK_WORDS(64);
    const int stages = K / KS;
#if LDSM && MMA
    const uint wsa = smem_addr(Wl), xsa = smem_addr(Xl);
#endif

    float acc[MT][NT][4];
    UNROLL for (int i = 0; i < MT; i++)
        UNROLL for (int j = 0; j < NT; j++)
            UNROLL for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;
    uint2 wq[IW];
    sz_t wsz[IW];
    uint4 xq[IX];
    LOAD(0)

#if BUFS == 1
    for (int s = 0; s < stages; s++) {
        barrier(CLK_LOCAL_MEM_FENCE);
        STORE(s, 0)
        barrier(CLK_LOCAL_MEM_FENCE);
        if (s + 1 < stages) LOAD(s + 1)
        MULTIPLY(0)
    }
#else
    // Buffer s % 2 is multiplied while s + 1 goes into the other, which every warp finished reading
    // before the barrier that ended stage s - 1.
    STORE(0, 0)
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = 0; s < stages; s++) {
        if (s + 1 < stages) LOAD(s + 1)
        MULTIPLY(s & 1)
        if (s + 1 < stages) STORE(s + 1, (s + 1) & 1)
        barrier(CLK_LOCAL_MEM_FENCE);
    }
#endif

    UNROLL for (int i = 0; i < MT; i++)
        UNROLL for (int j = 0; j < NT; j++) {
            const int t0 = tb0 + wn + j * 8 + 2 * q;
#ifdef SWIGLU
            const int n = out0 + (wm + i * 16) / 2 + g;
            const float v[2][2] = {{PRODUCT_OUT(acc[i][j][0], acc[i][j][2]), PRODUCT_OUT(acc[i][j][1], acc[i][j][3])}, {0, 0}};
            const int rows = 1;
#else
            const int n = out0 + wm + i * 16 + g;
            const float v[2][2] = {{acc[i][j][0], acc[i][j][1]}, {acc[i][j][2], acc[i][j][3]}};
            const int rows = 2;
#endif
            UNROLL for (int h = 0; h < rows; h++)
                UNROLL for (int e = 0; e < 2; e++) {
                    const int tok = t0 + e, row = n + h * 8;
                    if (tok < T && row < N) {
                        store_out(Y + (size_t)tok * N + row, v[h][e], accumulate);
                    }
                }
        }
}
