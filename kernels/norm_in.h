/* The RMSNorm of a GEMV's input in the GEMV's prologue (gemv.cl built with NORM_IN): for the products
   that read the normalised residual stream (QKV, gate+up, the output), y = W @ (rmsnorm(x) * w)
   without h ever being written, so the norm takes no launch of its own (tuning.toml gemv_norm_in;
   the residual add that comes before it is the o and down GEMVs' accumulate epilogue).

   rmsnorm(x) * w = r * (x * w) with r = 1 / sqrt(mean(x^2) + eps) one scalar per token, so the product
   is r * (W @ (x * w)). Each work-group first sums x^2 over the token's row of K floats (read from the
   cache next to the weights; dim 4096 is 16 KB against megabytes of weights), reduced across its
   work-items in local memory; the GEMV then runs on x * w, and each row's sum is multiplied by r before
   the epilogue (SwiGLU's activation sees the normalised product). The int4 zero terms are linear in x
   too: they come inline (ZERO_INLINE) from the x * w each work-item loads.
   With NORM_STAGE the prologue also writes x * w to local memory, where the GEMV reads it; without,
   every load of x is multiplied by its norm weight as it is loaded.

   Arguments the gemv kernel gains (NORM_IN_ARGS):
     norm_w   [K]   f32, the norm weight
     norm_eps       the norm's epsilon
     scratch        __local f32 [KSPLIT * WG_ROWS] (+ [K] with NORM_STAGE: x * w of the current token)
   x is a plain global buffer [T, K] (not an image); INT_DOT and NORM are not combined with it. */

#ifdef NORM_IN
#if defined(USE_IMAGE) || defined(INT_DOT) || defined(NORM) || (FORMAT == 4 && !defined(ZERO_INLINE))
#error "NORM_IN reads x from a global buffer and takes int4 zero terms inline (ZERO_INLINE)"
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
#define XLOAD4(o) (vload4(0, x + xo + (o)) * vload4(0, norm_w + (o)))
#define XLOAD8(o) (vload8(0, x + xo + (o)) * vload8(0, norm_w + (o)))
#define XLOAD16(o) (vload16(0, x + xo + (o)) * vload16(0, norm_w + (o)))
#endif
#define NORM_IN_ARGS , __global const float* restrict norm_w, const float norm_eps, __local float* scratch

/* r of the token row xt [K], the same in every work-item; with NORM_STAGE xw [K] = xt * norm_w.
   scratch: [KSPLIT * WG_ROWS] for the reduction, then xw. */
inline float norm_in_prologue(__global const float* restrict xt, __global const float* restrict norm_w,
                              const float eps, const int K, __local float* scratch)
{
    const int n = KSPLIT * WG_ROWS, lid = get_local_id(1) * KSPLIT + get_local_id(0);
    barrier(CLK_LOCAL_MEM_FENCE);               /* the previous token's reads of scratch are done */
    float4 sq4 = (float4)(0.0f);
    for (int i = lid; i < K / 4; i += n) {
        const float4 v = vload4(i, xt);
        sq4 = mad(v, v, sq4);
#ifdef NORM_STAGE
        vstore4(v * vload4(i, norm_w), i, scratch + n);
#endif
    }
    scratch[lid] = (sq4.x + sq4.y) + (sq4.z + sq4.w);
    int p = 1;
    while (p < n)
        p <<= 1;
    for (int s = p / 2; s > 0; s >>= 1) {        /* a tree over the next power of two of n */
        barrier(CLK_LOCAL_MEM_FENCE);
        if (lid < s && lid + s < n)
            scratch[lid] += scratch[lid + s];
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    return rsqrt(scratch[0] / (float)K + eps);
}

/* At the top of the token loop: nr, this token's r, and xw, its x * w in local memory (NORM_STAGE). */
#define NORM_IN_PROLOGUE(tok)                                                                   \
    const float nr = norm_in_prologue(x + (size_t)(tok) * K, norm_w, norm_eps, K, scratch);     \
    __local const float* xw = scratch + KSPLIT * WG_ROWS;
/* After the K split's reduction: each row's sum times r. */
#define NORM_IN_SCALE(out)                                                                      \
    for (int i = 0; i < NT; i++)                                                                \
        for (int r = 0; r < RT; r++) out[i][r] *= nr;
#else
#define NORM_IN_ARGS
#define NORM_IN_PROLOGUE(tok)
#define NORM_IN_SCALE(out)
#endif
