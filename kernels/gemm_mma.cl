// GEMM for prefill on matrix units: Y[t][n] (+)= sum_k W[n][k] * X[t][k], int4 weights in the row-tile
// layout of gemv.cl (tiles of RT = 4 rows; chunks of 128, then one of 64, along K; a chunk of C elements
// is 8 planes of L = C/8 consecutive elements, nibble p of word l = element p*L + l; the tile's
// scale[RT][C/G] and zero[RT][C/G] halves after the nibbles; w = q * scale + zero).
//
// A work-group owns BN weight rows x BT tokens and walks K in stages of KS = 64 elements (half a
// 128-chunk, or the 64-chunk): it dequantizes the stage's W[BN][64] to fp16 into local memory (each
// weight once per work-group), converts X[BT][64] to fp16 beside it, then each warp (32 consecutive
// work-items) multiplies its WM x WN sub-tile with mma.sync.m16n8k16 (fp16 operands, f32 accumulators,
// NVIDIA inline PTX, sm_80 and later) in MT x NT fragments of 16 rows x 8 tokens.
//
// Fragments (PTX ISA, mma.m16n8k16 .f16): lane = 4 g + q. A (16 x 16, row-major = W rows): a0 = row g,
// k 2q..2q+1; a1 = row g+8; a2, a3 = the same at k + 8. B (16 x 8, column-major = X rows): b0 = token g,
// k 2q..2q+1; b1 = k + 8. D: d0, d1 = row g, tokens 2q, 2q+1; d2, d3 = row g+8. A row of the local tiles
// holds LDS = KS + 8 halves (36 words), so the 32 lanes of one fragment load hit 32 banks.
//
// SWIGLU (Y[t][f] = silu(gate f) * up f, the up rows following the gate rows in W): each 16-row block
// of the local W tile holds 8 gate rows then their 8 up rows, so a lane finds gate in d0/d1 and up in
// d2/d3; a work-group then covers BN / 2 outputs.
//
// MMA = 0 computes each lane's d0..d3 from local memory with ordinary arithmetic instead of the PTX
// instruction: the same staging, tiles and epilogue, so CPUs (PoCL) check all but the instruction.
//
// Launch: global (NWI * ceil(T / BT), ceil(N / OUT_N)), local (NWI, 1); NWI = 32 * (BN/WM) * (BT/WN).
// Needs K % 64 == 0 and FORMAT 4 (int4) with G in 32, 64, 128 (C / G groups per chunk).
// Local memory: (BN + BT) * LDS * 2 bytes (BN = 128, BT = 64: 27.6 KB).

#ifndef G
#define G 32
#endif
#ifndef BN
#define BN 128
#endif
#ifndef BT
#define BT 64
#endif
#ifndef WM
#define WM 64
#endif
#ifndef WN
#define WN 32
#endif
#ifndef MMA
#define MMA 1
#endif

#define RT 4
#define KS 64                            // K elements per stage
#define LDS (KS + 8)                     // halves per local row
#define LDW (LDS / 2)                    // words per local row
#define MT (WM / 16)                     // fragments along the rows of a warp tile
#define NT (WN / 8)                      // fragments along the tokens
#define WARPS_M (BN / WM)
#define NWI (32 * WARPS_M * (BT / WN))
#define BLOCK_WORDS(C) (RT * ((C) / 8 + (C) / G))  // nibble words, then scale and zero halves
#ifdef SWIGLU
#define OUT_N (BN / 2)
#else
#define OUT_N BN
#endif

#if BN % WM || BT % WN || WM % 16 || WN % 8
#error "gemm_mma: BN % WM, BT % WN, WM % 16 and WN % 8 must be 0"
#endif

inline float silu(float v) { return v / (1.0f + exp(-v)); }

#if MMA
#define MMA_16816(d, a0, a1, a2, a3, b0, b1)                                                   \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "                          \
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"                        \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                               \
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1))
#endif

__kernel __attribute__((reqd_work_group_size(NWI, 1, 1)))
void gemm_mma(__global const uint* restrict W, __global const float* restrict X, __global float* restrict Y,
              const int T, const int K, const int N, const int accumulate)
{
    __local uint Wl[BN * LDW];           // W stage [BN][LDS] halves
    __local uint Xl[BT * LDW];           // X stage [BT][LDS] halves
    __local half* Wh = (__local half*)Wl;
    __local half* Xh = (__local half*)Xl;

    const int lid = get_local_id(0), lane = lid & 31, warp = lid >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int wm = (warp % WARPS_M) * WM, wn = (warp / WARPS_M) * WN;
    const int tb0 = get_group_id(0) * BT, out0 = get_group_id(1) * OUT_N;
    const int ntiles = (N + RT - 1) / RT;
    const int n128 = K / 128, has64 = (K / 64) & 1;
    const int tile_words = n128 * BLOCK_WORDS(128) + has64 * BLOCK_WORDS(64);

    float acc[MT][NT][4];
    for (int i = 0; i < MT; i++) for (int j = 0; j < NT; j++) for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;

    for (int s = 0; s < K / KS; s++) {
        // Stage s is half s % 2 of chunk s / 2 (128 wide), or the 64-chunk when s / 2 == n128.
        const int c = s >> 1, C = c < n128 ? 128 : 64, L = C / 8, PP = KS / L, p0 = (s & 1) * PP;
        const int off = c * BLOCK_WORDS(128), gc = C / G;
        barrier(CLK_LOCAL_MEM_FENCE);
        // W: item (local row r, word pair j) reads nibble words j, j+1 and writes planes p0 .. p0+PP-1.
        for (int i = lid; i < BN * (L / 2); i += NWI) {
            const int r = i / (L / 2), j = (i % (L / 2)) * 2;
#ifdef SWIGLU
            const int n = min(out0 + (r >> 4) * 8 + (r & 7), N - 1), up = (r >> 3) & 1;
#else
            const int n = min(out0 + r, N - 1), up = 0;
#endif
            const int row = n % RT;
            __global const uint* blk = W + (size_t)(n / RT + up * ntiles) * tile_words + off;
            const uint2 wv = vload2(0, blk + row * L + j);
            __global const half* sz = (__global const half*)(blk + RT * L) + row * gc;
            for (int pp = 0; pp < PP; pp++) {
                const int p = p0 + pp, gi = p * L / G;
                const float sc = vload_half(gi, sz), ze = vload_half(RT * gc + gi, sz);
                const float2 v = (float2)((float)((wv.x >> (4 * p)) & 15u), (float)((wv.y >> (4 * p)) & 15u));
                vstore_half2_rte(fma(v, (float2)(sc), (float2)(ze)), 0, Wh + r * LDS + pp * L + j);
            }
        }
        // X: tokens past T read the last token (their results are not stored).
        for (int i = lid; i < BT * (KS / 4); i += NWI) {
            const int t = i / (KS / 4), k = (i % (KS / 4)) * 4;
            const int tok = min(tb0 + t, T - 1);
            vstore_half4_rte(vload4(0, X + (size_t)tok * K + s * KS + k), 0, Xh + t * LDS + k);
        }
        barrier(CLK_LOCAL_MEM_FENCE);

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
                            sum += vload_half(r * LDS + kk + k, Wh) * vload_half(t * LDS + kk + k, Xh);
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
            const float v[2][2] = {{silu(acc[i][j][0]) * acc[i][j][2], silu(acc[i][j][1]) * acc[i][j][3]}, {0, 0}};
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
                        __global float* yp = Y + (size_t)tok * N + row;
                        *yp = accumulate ? *yp + v[h][e] : v[h][e];
                    }
                }
        }
}
