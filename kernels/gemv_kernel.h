// The GEMV kernel of gemv.cl and gemv_int.cl, after their products: per token the work-item's row
// tiles through TILES_DOT (gemv_tiles.h, with the including file's DOT128), the partial sums of the
// KSPLIT work-items of a row reduced in local memory, then the epilogues: SwiGLU / GeGLU (y = act(gate)
// * up), bias-free store or accumulate (y += result; a bias is bias.cl's launch after), and with NORM
// the next RMSNorm by the last work-item to finish.
//
// Buffers: W row tiles; x [T, K]; y [T, N]; xs_all [T, K/G]; with INT_DOT (gemv_int.cl) xq_all [T, K]
// int16 and xd_all [T, K/32]; with NORM norm_w [N], h [T, N], hs [T, N/HS_G], hq [T, N] int16,
// hd [T, N/32], done int [1] (0 before the launch, left at 0).
// Launch: global (KSPLIT, WG_ROWS * ceil(ceil(ceil(N/4) / TPW) / WG_ROWS)), local (KSPLIT, WG_ROWS);
// with GRID_STRIDE any smaller multiple of WG_ROWS along the rows (the work-groups loop over the rest).
// Local memory: part [WG_ROWS][NT * RT][KSPLIT] floats when KSPLIT > 1 (REDUCE_ONCE: [WG_ROWS][KSPLIT]
// [NT * RT + 1]; with LANE_XOR by shfl.sync none is used).
// Defines: SWIGLU, GELU (with SWIGLU: GeGLU), NORM, HS_G (the group of h's sums), HQ (h in int16 too);
// NORM_IN (with NORM_STAGE): the input's RMSNorm in the prologue, the GPU counterpart (norm_in.h: its
// arguments, norm_w, norm_eps and local scratch, follow the others).
// LANE_XOR(v, m): the partial sums reduced by butterfly exchanges instead (lane_xor.h: gemv_dp.cl, and
// gemv.cl with gemv_reduce "shfl" or "xor"); REDUCE_ONCE: through local memory in one step, each of
// the row's work-items summing and storing some of its outputs (gemv_reduce "once").

#include "epilogue.h"
#include "xq.h"

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

// W: row tiles [ceil(rows/4)][tile_words] (gemv_tiles.h); x: [T, K]; y: [T, N] where N = rows, or with
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
    const int ntiles = (N + RT - 1) / RT;
    const int n128 = K / 128, has64 = (K / 64) & 1, has32 = (K / 32) & 1;
    const int tile_words = n128 * BLOCK_WORDS(128) + has64 * BLOCK_WORDS(64) + has32 * BLOCK_WORDS(32);
#if KSPLIT > 1 && defined(REDUCE_ONCE) && !defined(LANE_XOR)
    __local float part[WG_ROWS][KSPLIT][NT * RT + 1];   // + 1: the column reads and row writes miss no bank
    const int lr = get_local_id(1);
#elif KSPLIT > 1
    __local float part[WG_ROWS][NT * RT][KSPLIT];
    const int lr = get_local_id(1);
#endif

    // Token by token, each with exactly the arithmetic of a single token: a row's result does not
    // depend on how many tokens share the launch. The tiles stay in cache from one token to the next.
#ifdef GRID_STRIDE
    // Fewer work-groups than groups of rows (gemv_waves: whole waves of the compute units): work-group
    // g takes the row groups g, g + its count, ... (the same number of passes for all its work-items),
    // each pass token by token.
    const int row_groups = ((ntiles + TPW - 1) / TPW + WG_ROWS - 1) / WG_ROWS;
    const int passes = (row_groups - (int)get_group_id(1) + (int)get_num_groups(1) - 1) / (int)get_num_groups(1);
    for (int pass = 0; pass < passes * T; pass++) {
        const int tok = pass % T;
        const int tile = ((int)get_group_id(1) + pass / T * (int)get_num_groups(1)) * WG_ROWS + get_local_id(1);
#else
    const int tile = get_group_id(1) * WG_ROWS + get_local_id(1);
    for (int tok = 0; tok < T; tok++) {
#endif
        size_t tw[NT];            // word offsets of the work-item's tiles (past the end: the last tile)
        for (int i = 0; i < TPW; i++) {
            const int t = min(tile * TPW + i, ntiles - 1);
            tw[i] = (size_t)t * tile_words;
#ifdef SWIGLU
            tw[TPW + i] = (size_t)(t + ntiles) * tile_words;
#endif
        }
        const int xo = tok * K;                              // x row of this token
        NORM_IN_PROLOGUE(tok)
        __global const float* restrict xs = xs_all + tok * (K / G);
#ifdef INT_DOT
        __global const short* restrict xq = xq_all + (size_t)tok * K;       // int16 x of this token
        __global const float* restrict xd = xd_all + (size_t)tok * (K / 32);
#endif
        float out[NT][RT];
        TILES_DOT(tw, out)

#if KSPLIT > 1 && defined(LANE_XOR)
        // Butterfly reduction of the KSPLIT partial sums within the warp: LANE_XOR(v, m) is work-item
        // ks ^ m's v (defined by the including file; KSPLIT <= 32, the warp's consecutive work-items).
        for (int i = 0; i < NT; i++)
            for (int r = 0; r < RT; r++)
                for (int m = KSPLIT / 2; m > 0; m /= 2) out[i][r] += LANE_XOR(out[i][r], m);
#elif KSPLIT > 1 && defined(REDUCE_ONCE)
        // The KSPLIT partial sums through local memory once: each work-item writes its NT * RT values,
        // then work-item ks sums outputs ks, ks + KSPLIT, ... of its row of work-items and stores them.
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int i = 0; i < NT; i++)
            for (int r = 0; r < RT; r++) part[lr][ks][i * RT + r] = out[i][r];
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int v = ks; v < TPW * RT; v += KSPLIT) {
            const int n = (tile * TPW + v / RT) * RT + v % RT;
            float gate = 0.0f, up = 0.0f;
            for (int s = 0; s < KSPLIT; s++) {
                gate += part[lr][s][v];
#ifdef SWIGLU
                up += part[lr][s][TPW * RT + v];
#endif
            }
            if (tile * TPW + v / RT < ntiles && n < N)
                store_out(y + (size_t)tok * N + n, PRODUCT_OUT(gate, up), accumulate);
        }
        continue;                        // stored: on to the next token
#elif KSPLIT > 1
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
                    store_out(yt + n, PRODUCT_OUT(out[i][r], out[TPW + i][r]), accumulate);
                }
            }
        }
    }
#ifdef NORM
    last_item_norm(y, norm_w, h, hs, hq, hd, done, N, T, eps);
#endif
}