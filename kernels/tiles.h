/* What the many-token GEMMs share (gemm.cl's gemm_tiled, gemm_half.cl, gemm_dot8.cl): where a chunk of a
   row tile lies, the gate activation of SWIGLU, the horizontal sums, and the epilogue that writes a work-item's
   RR x TR outputs. Needs RT, CAT and BLOCK_WORDS (kernels/wformat.h) first. */

inline float hsum4(float4 v) { float2 a = v.lo + v.hi; return a.x + a.y; }
inline float hsum8(float8 v) { return hsum4(v.lo + v.hi); }
inline float hsum16(float16 v) { return hsum8(v.lo + v.hi); }
inline float silu(float v) { return v / (1.0f + exp(-v)); }
#ifdef GELU   /* GeGLU (Gemma): the gate through GELU, tanh-approximated, in place of silu */
inline float gate_act(float v) { return 0.5f * v * (1.0f + tanh(0.7978845608f * mad(0.044715f * v, v * v, v))); }
#else
#define gate_act silu
#endif

// Word offset of chunk number c inside a tile, and its first element along K; the tails (64, then 32)
// follow the 128-wide chunks.
inline int chunk_offset(int c, int n128, int has64)
{
    return c < n128 ? c * BLOCK_WORDS(128) : n128 * BLOCK_WORDS(128) + (c > n128 ? has64 * BLOCK_WORDS(64) : 0);
}
inline int chunk_k0(int c, int n128, int has64)
{
    return c < n128 ? c * 128 : n128 * 128 + (c > n128 ? has64 * 64 : 0);
}

#define NWI ((BT / TR) * (BN / RR))     // work-items of a gemm_tiled-style work-group: (BT/TR, BN/RR)

// A tiled work-group's place: work-item (ti, ri) of the work-group at tokens tb0 and rows n0, the row tiles'
// chunks along K (n128 of 128, then 64 and 32 tails), and KW = kc * 128 staged columns.
#define TILE_IDS                                                                               \
    const int KW = kc * 128;                                                                   \
    const int ti = get_local_id(0), ri = get_local_id(1);                                      \
    const int lid = ri * (BT / TR) + ti;                                                       \
    const int tb0 = get_group_id(0) * BT, n0 = get_group_id(1) * BN;                           \
    const int ntiles = (N + RT - 1) / RT;                                                      \
    const int n128 = K / 128, has64 = (K / 64) & 1, has32 = (K / 32) & 1;                      \
    const int nchunks = n128 + has64 + has32;                                                  \
    const int tile_words = n128 * BLOCK_WORDS(128) + has64 * BLOCK_WORDS(64) + has32 * BLOCK_WORDS(32);

// The walk along K of a variant's work-group (gemm_half.cl, gemm_dot8.cl): kc chunks at a time are staged
// into local memory between two barriers (STAGE(C, c, col): chunk c, of width C, to column col), then
// multiplied (MICRO(cols)); kbase is the first element of K staged.
#define WALK_K(STAGE, MICRO)                                                                   \
    for (int c0 = 0; c0 < nchunks; c0 += kc) {                                                 \
        const int kbase = chunk_k0(c0, n128, has64);                                           \
        int col = 0;                                                                           \
        barrier(CLK_LOCAL_MEM_FENCE);                                                          \
        for (int c = c0; c < min(c0 + kc, nchunks); c++) {                                     \
            const int C = c < n128 ? 128 : (c == n128 && has64 ? 64 : 32);                     \
            STAGE(C, c, col)                                                                   \
            col += C;                                                                          \
        }                                                                                      \
        barrier(CLK_LOCAL_MEM_FENCE);                                                          \
        MICRO(col)                                                                             \
    }

// int4 chunk blocks (FORMAT 4) of width C: row r's C/8 nibble words (nibble p of word l = element p*C/8 + l),
// then scale[RT][C/G] and zero[RT][C/G] (SCALE_T).
#define Q4_WORDS(blk, C, r) ((blk) + (r) * ((C) / 8))
#define Q4_SCALE(blk, C, r, g) SLOAD1((__global const SCALE_T*)((blk) + RT * ((C) / 8)), (r) * ((C) / G) + (g))
#define Q4_ZERO(blk, C, r, g) SLOAD1((__global const SCALE_T*)((blk) + RT * ((C) / 8)), (RT + (r)) * ((C) / G) + (g))
// The chunk block of chunk c for row r of the work-group's rows (pass `up`: the up rows of SWIGLU); rows
// past the matrix read its last row, whose outputs are not stored.
#define ROW_BLOCK(r, c) (W + (size_t)(min(n0 + (r), N - 1) / RT + up * ntiles) * tile_words + chunk_offset(c, n128, has64))
#define ROW_IN_TILE(r) (min(n0 + (r), N - 1) % RT)

// Copy to local memory: n words from word `from` of each of the work-group's token rows of src (row_words
// words a row; tokens past T read the last token) to word `to` of the rows of dst (dst_row words a row).
#define STAGE_ROWS(src, row_words, from, n, dst, dst_row, to)                                  \
    for (int i = lid; i < BT * (n); i += NWI) {                                                \
        const int t = i / (n), w = i % (n);                                                    \
        (dst)[t * (dst_row) + (to) + w] = (src)[(size_t)min(tb0 + t, T - 1) * (row_words) + (from) + w]; \
    }

#ifdef SWIGLU
#define NT 2
#else
#define NT 1
#endif

// Y[tok][n] (+)= the outputs out[NT][RR][TR] of work-item (ti, ri) of the work-group at tokens tb0, rows n0;
// with SWIGLU out[0] holds the gate rows and out[1] the up rows.
#ifdef SWIGLU
#define TILE_VALUE(out, i, j) (gate_act(out[0][i][j]) * out[1][i][j])
#else
#define TILE_VALUE(out, i, j) (out[0][i][j])
#endif
#define STORE_TILE(out)                                                                        \
    for (int j = 0; j < TR; j++) {                                                             \
        const int tok = tb0 + ti * TR + j;                                                     \
        if (tok >= T) break;                                                                   \
        for (int i = 0; i < RR; i++) {                                                         \
            const int n = n0 + ri * RR + i;                                                    \
            if (n >= N) break;                                                                 \
            const float v = TILE_VALUE(out, i, j);                                             \
            __global float* yp = Y + (size_t)tok * N + n;                                      \
            *yp = accumulate ? *yp + v : v;                                                    \
        }                                                                                      \
    }
