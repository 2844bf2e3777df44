// GEMV for decode with float products: y[n] (+)= sum_k W[n][k] * x[k], W quantized (int4 / int8) or
// fp16 / bf16 / f32, x in float32; for T tokens, each with the arithmetic of one token alone (serving's
// batch steps give bit-identical rows whatever the batch). Its twin gemv_int.cl takes x in int16 and
// multiplies in integers (x86 CPUs); both share the row-tile layout, the walk along K and the float
// pieces (gemv_tiles.h) and the kernel with its epilogues (gemv_kernel.h).
//
// Products: each piece of VEC lanes of the 8 planes of a chunk is dequantized in registers and
// multiplied with the matching vector loads of x (gemv_tiles.h XPLANES / TPIECE). int4 zero terms:
// against the group sums of x (xsum below, or written by the norms: rmsnorm.cl XS_G) added by the
// work-item holding lane 0, or with ZERO_INLINE from each work-item's own lanes of x.
//
// Buffers (kernel gemv, gemv_kernel.h):
//   W       row tiles [ceil(rows/4)][tile_words] (gemv_tiles.h)
//   x       [T, K] f32 (with USE_IMAGE an image1d_buffer_t of T*K/4 float4 texels)
//   y       [T, N] f32, N = rows, or with SWIGLU N = rows/2
//   xs_all  [T, K/G] f32, the group sums of x (int4 without ZERO_INLINE; any buffer otherwise)
//   with NORM: norm_w [N], h [T, N], hs [T, N/HS_G], hq [T, N] int16, hd [T, N/32], done int [1]
// Kernel xsum: x [T, K] -> xs [T, K/G]; global size T*K/G.
//
// Launch gemv: global (KSPLIT, WG_ROWS * ceil(ceil(ceil(N/4) / TPW) / WG_ROWS)), local (KSPLIT, WG_ROWS).
//
// Defines and tunables: those of gemv_tiles.h (FORMAT, G, SCALE_F32, ZERO8, SWIGLU, GELU, USE_IMAGE,
// ZERO_INLINE; VEC, KSPLIT, WG_ROWS, TPW, PREFETCH) and gemv_kernel.h's (NORM, HS_G, HQ, REDUCE_ONCE),
// LANE_SHFL with LANE_PTX (lane_xor.h).
//
// The warp layout for GPUs (specs.py gemv_prefetch, gemv_reduce; docs/performance.md, H200): a row tile
// per KSPLIT = 32 work-items (a warp), each loading PREFETCH pieces of 4 words per row (PREFETCH x 64
// bytes) before any arithmetic, the partial sums met by shfl.sync.bfly (or local memory once).
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
//   hardly faster with the weights in cache), not by the 40 GB/s a plain read reaches (gemv_int.cl
//   does better there).
//   NVIDIA H100 (kernels/tuning.toml): int4 g128 4096x4096 (8.4 MB) 416 GB/s, 11008x4096 815 GB/s, i.e.
//   97% and 78% of a plain copy kernel moving the same bytes per launch (scripts/gemv_bandwidth.py);
//   int8 1.15 TB/s, fp16 1.4 TB/s. At these sizes every kernel on that driver is launch-bound.

#include "gemv_tiles.h"

// One 128-element chunk c (piece j) of the NT tiles: x loaded once, the pieces of every tile.
#define DOT128(c, j)                                                                           \
    {                                                                                          \
        XPLANES(128, VEC, (c) * 128, j, xp)                                                    \
        _Pragma("unroll") for (int i = 0; i < NT; i++)                                         \
            TPIECE(128, VEC, W + tw[i] + (c) * BLOCK_WORDS(128), (c) * 128, j, xp, acc[i], zacc[i]) \
    }

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

#ifdef LANE_SHFL                // gemv_reduce "shfl" (LANE_PTX 1) or "xor" (its emulation): LANE_XOR
#include "lane_xor.h"
#endif
#include "gemv_kernel.h"
