/* The RMSNorm of a GEMV's input in the GEMV's prologue (gemv.cl built with NORM_IN): for the products
   that read the normalised residual stream (QKV, gate+up, the output), y = W @ (rmsnorm(x) * w)
   without h ever being written, so the norm takes no launch of its own (tuning.toml gemv_norm_in;
   the residual add that comes before it is the o and down GEMVs' accumulate epilogue).

   rmsnorm(x) * w = x * (w * r) with r = 1 / sqrt(mean(x^2) + eps) one scalar per token. Each
   work-group first sums x^2 over the token's row of K floats (read from the cache next to the weights;
   dim 4096 is 16 KB against megabytes of weights), reduced across its work-items in local memory; the
   GEMV then runs on x * w * r. With NORM_STAGE the prologue writes x * w * r to local memory, where the
   GEMV reads it; without, every load of x is multiplied by w * r as it is loaded. The int4 zero terms
   come inline (ZERO_INLINE) from the values each work-item loads.
   Without a K split (KSPLIT 1, the CPU layout) each work-item sums the row itself and x is scaled per
   load: no local memory, no barrier.

   Arguments the gemv kernel gains (NORM_IN_ARGS):
     norm_w   [K]   f32, the norm weight
     norm_eps       the norm's epsilon
     scratch        __local f32 [KSPLIT * WG_ROWS] (+ [K] with NORM_STAGE: x * w of the current token)
   x is a plain global buffer [T, K] (not an image); INT_DOT and NORM are not combined with it. */

#ifdef NORM_IN
#if defined(USE_IMAGE) || defined(INT_DOT) || defined(NORM) || (FORMAT == 4 && !defined(ZERO_INLINE))
#error "NORM_IN reads x from a global buffer and takes int4 zero terms inline (ZERO_INLINE)"
#endif
#if KSPLIT == 1 && defined(NORM_STAGE)
#error "NORM_STAGE shares x across a K split: KSPLIT > 1"
#endif
#undef X_ARG
#undef XLOAD4
#undef XLOAD8
#undef XLOAD16
#define X_ARG __global const float* restrict x
#ifdef NORM_STAGE
#define XLOAD4(o) vload4(0, xw + (o))
#define XLOAD8(o) vload8(0, xw + (o))
#define XLOAD16(o) vload16(0, xw + (o))
#else
#define XLOAD4(o) (vload4(0, x + xo + (o)) * (vload4(0, norm_w + (o)) * nr))
#define XLOAD8(o) (vload8(0, x + xo + (o)) * (vload8(0, norm_w + (o)) * nr))
#define XLOAD16(o) (vload16(0, x + xo + (o)) * (vload16(0, norm_w + (o)) * nr))
#endif
#define NORM_IN_ARGS , __global const float* restrict norm_w, const float norm_eps, __local float* scratch

/* r of the token row xt [K], the same in every work-item; with NORM_STAGE xw [K] = xt * norm_w * r.
   scratch: [KSPLIT * WG_ROWS] for the reduction, then xw. */
inline float norm_in_prologue(__global const float* restrict xt, __global const float* restrict norm_w,
                              const float eps, const int K, __local float* scratch)
{
#if KSPLIT == 1
    /* No K split: the work-items share no x, and each sums the row itself, with no barrier (PoCL 3.1
       runs a barrier in this token loop wrongly when there is no other: the first work-item's
       epilogue twice). */
    float4 sq4 = (float4)(0.0f);
    for (int i = 0; i < K / 4; i++) {
        const float4 v = vload4(i, xt);
        sq4 = mad(v, v, sq4);
    }
    return rsqrt(((sq4.x + sq4.y) + (sq4.z + sq4.w)) / (float)K + eps);
#else
    const int n = KSPLIT * WG_ROWS, lid = get_local_id(1) * KSPLIT + get_local_id(0);
    barrier(CLK_LOCAL_MEM_FENCE);               /* the previous token's reads of scratch are done */
    float4 sq4 = (float4)(0.0f);
    for (int i = lid; i < K / 4; i += n) {
        const float4 v = vload4(i, xt);
        sq4 = mad(v, v, sq4);
    }
    scratch[lid] = (sq4.x + sq4.y) + (sq4.z + sq4.w);
    barrier(CLK_LOCAL_MEM_FENCE);
    float sq = 0.0f;                             /* every work-item sums the partials, in one order */
    for (int j = 0; j < n; j++)
        sq += scratch[j];
    const float r = rsqrt(sq / (float)K + eps);
#ifdef NORM_STAGE
    for (int i = lid; i < K / 4; i += n)
        vstore4(vload4(i, xt) * (vload4(i, norm_w) * r), i, scratch + n);
    barrier(CLK_LOCAL_MEM_FENCE);
#endif
    return r;
#endif
}

/* At the top of the token loop: nr, this token's r, and xw, its x * w * r in local memory (NORM_STAGE). */
#define NORM_IN_PROLOGUE(tok)                                                                   \
    const float nr = norm_in_prologue(x + (size_t)(tok) * K, norm_w, norm_eps, K, scratch);     \
    __local const float* xw = scratch + KSPLIT * WG_ROWS;
#else
#define NORM_IN_ARGS
#define NORM_IN_PROLOGUE(tok)
#endif
