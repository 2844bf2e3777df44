// GEMM for prefill on matrix units: Y[t][n] (+)= sum_k W[n][k] * X[t][k], int4 weights in the row-tile
// layout of gemv_tiles.h (tiles of RT = 4 rows; chunks of 128, then one of 64, along K; a chunk of C elements
// is 8 planes of L = C/8 consecutive elements, nibble p of word l = element p*L + l; the tile's
// scale[RT][C/G] and zero[RT][C/G] halves after the nibbles; w = q * scale + zero).
//
// x_to_half first converts X to fp16 (Xh), once per product. A work-group of gemm_mma owns BN weight
// rows x BT tokens and walks K in stages of KS = 64 elements (half a 128-chunk, or the 64-chunk): it
// dequantizes the stage's W[BN][64] to fp16 into local memory (each weight once per work-group) and
// copies Xh[BT][64] beside it; then each warp (32 consecutive work-items) multiplies its WM x WN
// sub-tile with mma.sync.m16n8k16 (fp16 operands, f32 accumulators, NVIDIA inline PTX, sm_80 and later)
// in MT x NT fragments of 16 rows x 8 tokens, while the next stage's nibble words, scales and fp16
// inputs load from global memory into registers (IW + IX items per work-item).
//
// Fragments (PTX ISA, mma.m16n8k16 .f16): lane = 4 g + q. A (16 x 16, row-major = W rows): a0 = row g,
// k 2q..2q+1; a1 = row g+8; a2, a3 = the same at k + 8. B (16 x 8, column-major = X rows): b0 = token g,
// k 2q..2q+1; b1 = k + 8. D: d0, d1 = row g, tokens 2q, 2q+1; d2, d3 = row g+8. A row of the local tiles
// holds LDS = KS + 8 halves (36 words), so the 32 lanes of one fragment load hit 32 banks.
//
// SWIGLU (Y[t][f] = act(gate f) * up f, the up rows following the gate rows in W; act silu, or with GELU
// the tanh-approximated GELU: epilogue.h): each 16-row block
// of the local W tile holds 8 gate rows then their 8 up rows, so a lane finds gate in d0/d1 and up in
// d2/d3; a work-group then covers BN / 2 outputs.
//
// MMA = 0 computes each lane's d0..d3 from local memory with ordinary arithmetic instead of the PTX
// instruction: the same staging, tiles and epilogue, so CPUs (PoCL) check all but the instruction.
//
// Launch: x_to_half global (ceil(T * K / 4)); gemm_mma global (NWI * ceil(T / BT), ceil(N / OUT_N)),
// local (NWI, 1); NWI = 32 * (BN/WM) * (BT/WN).
// Needs K % 64 == 0 and FORMAT 4 (int4) with G in 32, 64, 128 (C / G groups per chunk).
// Local memory: (BN + BT) * LDS * 2 bytes (BN = BT = 128: 36.9 KB; NVIDIA's OpenCL allows 48 KB).
// Reached on the H200 (BN = BT = 128, WM = 32, WN = 64): 124 TFLOP/s on 12288 x 4096 x 512
// (docs/performance.md, H200 section).

#if !defined(BN) || !defined(BT) || !defined(WM) || !defined(WN)
#error "BN, BT, WM, WN: their defaults are declared in engine/backends/opencl/specs.py"
#endif
#ifndef MMA
#define MMA 1
#endif

#define RT 4
#define FORMAT 4                         // int4 weights: wformat.h's blocks and dequantization
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#include "wformat.h"
#define KS 64                            // K elements per stage
#define LDS (KS + 8)                     // halves per local row
#define LDW (LDS / 2)                    // words per local row
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
#error "gemm_mma: BN % WM, BT % WN, WM % 16, WN % 8, BN * 8 % NWI, BT * 8 % NWI and IW % 2 must be 0"
#endif

#include "epilogue.h"

#if MMA
#define MMA_16816(d, a0, a1, a2, a3, b0, b1)                                                   \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "                          \
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"                        \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                               \
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1))
#endif

// X [n] f32 -> Xh [n] fp16 (n % 4 == 0), once per product: the GEMM stages X as fp16 copies.
__kernel void x_to_half(__global const float* restrict X, __global half* restrict Xh, const int n)
{
    const int i = get_global_id(0) * 4;
    if (i < n) vstore_half4_rte(vload4(0, X + i), 0, Xh + i);
}

// The W item u of this work-item in a stage of chunk width C: local row r, word pair j.
#define W_ITEM(C, u, r, j) const int i_ = lid + (u) * NWI, r = i_ / ((C) / 16), j = (i_ % ((C) / 16)) * 2

// Global -> registers: stage s's nibble words (wq), the scale and zero of its one or two groups (wsz),
// and its X halves (xq). The 64-chunk stage has half as many W items.
#define LOAD_W(C, s)                                                                           \
    for (int u = 0; u < IW * (C) / 128; u++) {                                                 \
        W_ITEM(C, u, r, j);                                                                    \
        const int n = min(out0 + ROW_N(r), N - 1);                                             \
        __global const uint* blk = W + (size_t)(n / RT + ROW_UP(r) * ntiles) * tile_words + ((s) >> 1) * BLOCK_WORDS(128); \
        const int row = n % RT, gc = (C) / G, g0 = ((s) & 1) * 64 / G, g1 = (((s) & 1) * 64 + 32) / G; \
        __global const half* sz = (__global const half*)(blk + RT * ((C) / 8)) + row * gc;     \
        wq[u] = vload2(0, blk + row * ((C) / 8) + j);                                          \
        wsz[u] = (float4)(vload_half(g0, sz), vload_half(RT * gc + g0, sz), vload_half(g1, sz), vload_half(RT * gc + g1, sz)); \
    }
#define LOAD(s)                                                                                \
    {                                                                                          \
        if (((s) >> 1) < n128) LOAD_W(128, s) else LOAD_W(64, s)                               \
        for (int u = 0; u < IX; u++) {                                                         \
            const int i = lid + u * NWI, t = i / (KS / 8), k = (i % (KS / 8)) * 8;             \
            xq[u] = vload4(0, (__global const uint*)(Xh + (size_t)min(tb0 + t, T - 1) * K + (s) * KS + k)); \
        }                                                                                      \
    }
// Registers -> local memory, W dequantized: plane p0 + pp of the item's two words is stage elements
// pp*L + j, pp*L + j + 1 (L = C / 8); the second group (G == 32) starts at element 32.
#define STORE_W(C, s)                                                                          \
    for (int u = 0; u < IW * (C) / 128; u++) {                                                 \
        W_ITEM(C, u, r, j);                                                                    \
        const int p0 = ((s) & 1) * (KS / ((C) / 8));                                           \
        _Pragma("unroll") for (int pp = 0; pp < KS / ((C) / 8); pp++) {                        \
            const int second = G == 32 && pp * ((C) / 8) >= 32, sh = 4 * (p0 + pp);            \
            const float sc = second ? wsz[u].z : wsz[u].x, ze = second ? wsz[u].w : wsz[u].y;  \
            vstore_half2_rte(DEQ4(2, wq[u], sh, (float2)(sc), (float2)(ze)), 0, Wh + r * LDS + pp * ((C) / 8) + j); \
        }                                                                                      \
    }
#define STORE(s)                                                                               \
    {                                                                                          \
        if (((s) >> 1) < n128) STORE_W(128, s) else STORE_W(64, s)                             \
        for (int u = 0; u < IX; u++) {                                                         \
            const int i = lid + u * NWI, t = i / (KS / 8), k = (i % (KS / 8)) * 8;             \
            vstore4(xq[u], 0, Xl + t * LDW + k / 2);                                           \
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
    __local uint Wl[BN * LDW];           // W stage [BN][LDS] halves
    __local uint Xl[BT * LDW];           // X stage [BT][LDS] halves
    __local half* Wh = (__local half*)Wl;
    __local half* Xlh = (__local half*)Xl;

    const int lid = get_local_id(0), lane = lid & 31, warp = lid >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int wm = (warp % WARPS_M) * WM, wn = (warp / WARPS_M) * WN;
    const int tb0 = get_group_id(0) * BT, out0 = get_group_id(1) * OUT_N;
    const int ntiles = (N + RT - 1) / RT;
    const int n128 = K / 128, has64 = (K / 64) & 1;
    const int tile_words = n128 * BLOCK_WORDS(128) + has64 * BLOCK_WORDS(64);
    const int stages = K / KS;

    float acc[MT][NT][4];
    for (int i = 0; i < MT; i++) for (int j = 0; j < NT; j++) for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;
    uint2 wq[IW];
    float4 wsz[IW];
    uint4 xq[IX];
    LOAD(0)

    for (int s = 0; s < stages; s++) {
        barrier(CLK_LOCAL_MEM_FENCE);
        STORE(s)
        barrier(CLK_LOCAL_MEM_FENCE);
        if (s + 1 < stages) LOAD(s + 1)

        for (int kk = 0; kk < KS; kk += 16) {
#if MMA
            uint b[NT][2];
            for (int j = 0; j < NT; j++) {
                const int x = (wn + j * 8 + g) * LDW + kk / 2 + q;
                b[j][0] = Xl[x];
                b[j][1] = Xl[x + 4];
            }
            for (int i = 0; i < MT; i++) {
                const int a = (wm + i * 16 + g) * LDW + kk / 2 + q;
                const uint a0 = Wl[a], a1 = Wl[a + 8 * LDW], a2 = Wl[a + 4], a3 = Wl[a + 8 * LDW + 4];
                for (int j = 0; j < NT; j++) MMA_16816(acc[i][j], a0, a1, a2, a3, b[j][0], b[j][1]);
            }
#else
            for (int i = 0; i < MT; i++)
                for (int j = 0; j < NT; j++)
                    for (int e = 0; e < 4; e++) {
                        const int r = wm + i * 16 + g + (e >> 1) * 8, t = wn + j * 8 + 2 * q + (e & 1);
                        float sum = 0.0f;
                        for (int k = 0; k < 16; k++)
                            sum += vload_half(r * LDS + kk + k, Wh) * vload_half(t * LDS + kk + k, Xlh);
                        acc[i][j][e] += sum;
                    }
#endif
        }
    }

    for (int i = 0; i < MT; i++)
        for (int j = 0; j < NT; j++) {
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
            for (int h = 0; h < rows; h++)
                for (int e = 0; e < 2; e++) {
                    const int tok = t0 + e, row = n + h * 8;
                    if (tok < T && row < N) {
                        store_out(Y + (size_t)tok * N + row, v[h][e], accumulate);
                    }
                }
        }
}
