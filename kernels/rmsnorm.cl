/* RMSNorm, with the residual addition fused in.

   One work-group per token row; each work-item walks the row in float4 steps (stride RMS_WG float4s,
   so neighbouring work-items touch neighbouring memory), the sum of squares is reduced in local
   memory, and the same work-items then write the normalised row. Rows of any length work: a
   scalar tail covers dim % 4.

   Buffers (f32, row-major):
     x     [T, dim]   residual stream; add_rmsnorm updates it in place: x += delta
     delta [T, dim]   what the sub-layer adds to the residual stream
     w     [dim]      norm weight
     h     [T, dim]   out: x / sqrt(mean(x^2) + eps) * w

     xs    [T, dim/XS_G] out, with XS_G defined: the group sums of h's rows, computed exactly as
                      gemv.cl's xsum does, so the int4 GEMV that reads h needs no xsum launch
     xq    [T, dim]   out, with XQ defined: h in int16 blocks of 32 (xq.h), for the int-dot GEMV
     xd    [T, dim/32]    (gemv_int.cl); the blocks' scales

   Launch: global (RMS_WG * T), local (RMS_WG).
   Tunable: RMS_WG, the work-group size, a power of two. Options: XS_G (a multiple of 16), XQ
   (dim a multiple of 32). */

#include "xq.h"

#ifndef RMS_WG
#error "RMS_WG: its default is declared in engine/backends/opencl/specs.py"
#endif

/* The sum of v over the work-group; scratch [RMS_WG]. */
inline float wg_sum(float v, __local float *scratch)
{
    const int lid = get_local_id(0);
    scratch[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int half_n = RMS_WG / 2; half_n > 0; half_n >>= 1) {
        if (lid < half_n)
            scratch[lid] += scratch[lid + half_n];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    return scratch[0];
}

/* One row: x += delta when add is set, then h = normalised x * w. */
inline void norm_row(__global float *x, __global const float *delta, __global const float *w,
                     __global float *h, const int dim, const float eps, const bool add,
                     __local float *scratch)
{
    const int lid = get_local_id(0);
    const int n4 = dim >> 2;

    float4 sq4 = (float4)(0.0f);
    for (int i = lid; i < n4; i += RMS_WG) {
        float4 v = vload4(i, x);
        if (add) {
            v += vload4(i, delta);
            vstore4(v, i, x);
        }
        sq4 = mad(v, v, sq4);
    }
    float sq = (sq4.x + sq4.y) + (sq4.z + sq4.w);
    for (int i = 4 * n4 + lid; i < dim; i += RMS_WG) {
        float v = x[i];
        if (add) {
            v += delta[i];
            x[i] = v;
        }
        sq = mad(v, v, sq);
    }

    const float r = rsqrt(wg_sum(sq, scratch) / (float)dim + eps);

    for (int i = lid; i < n4; i += RMS_WG)
        vstore4(vload4(i, x) * r * vload4(i, w), i, h);
    for (int i = 4 * n4 + lid; i < dim; i += RMS_WG)
        h[i] = x[i] * r * w[i];
}

/* xs[g] = sum of h[g*XS_G .. (g+1)*XS_G), in gemv.cl xsum's order (16-wide partial sums, then the
   same horizontal reduction); with XQ h's int16 blocks and the sums that go with them (xq.h xq_block).
   h is this work-group's row, just written. */
inline void group_sums(__global const float *h, __global float *xs, __global short *xq, __global float *xd,
                       const int dim)
{
#ifdef XS_G
    barrier(CLK_GLOBAL_MEM_FENCE);
#ifdef XQ
    for (int g = get_local_id(0); g < dim / XS_G; g += RMS_WG) {
        float sum = 0.0f;
        for (int k0 = g * XS_G; k0 < (g + 1) * XS_G; k0 += 32)
            sum += xq_block(h, k0, dim, xq, xd);
        xs[g] = sum;
    }
    return;
#endif
    for (int g = get_local_id(0); g < dim / XS_G; g += RMS_WG) {
        float16 sum = vload16(0, h + g * XS_G);
        for (int k = 16; k < XS_G; k += 16)
            sum += vload16(0, h + g * XS_G + k);
        float8 s8 = sum.lo + sum.hi;
        float4 s4 = s8.lo + s8.hi;
        float2 s2 = s4.lo + s4.hi;
        xs[g] = s2.x + s2.y;
    }
#endif
}

#ifdef XS_G
#define XS_ROW(row) (xs + (size_t)(row) * (dim / XS_G))
#else
#define XS_ROW(row) xs
#endif
#ifdef XQ
#define XQ_ROW(row) (xq + (size_t)(row) * dim), (xd + (size_t)(row) * (dim / 32))
#else
#define XQ_ROW(row) xq, xd
#endif

/* x [T, dim] += delta [T, dim]; h [T, dim] = rmsnorm(x) * w [dim]; xs [T, dim/XS_G] its group sums;
   xq [T, dim], xd [T, dim/32] h in int16 blocks. */
__kernel __attribute__((reqd_work_group_size(RMS_WG, 1, 1)))
void add_rmsnorm(__global float *x, __global const float *delta, __global const float *w,
                 __global float *h, const int dim, const float eps, __global float *xs,
                 __global short *xq, __global float *xd)
{
    __local float scratch[RMS_WG];
    const size_t row = (size_t)get_group_id(0) * dim;
    norm_row(x + row, delta + row, w, h + row, dim, eps, true, scratch);
    group_sums(h + row, XS_ROW(get_group_id(0)), XQ_ROW(get_group_id(0)), dim);
}

/* h [T, dim] = rmsnorm(x [T, dim]) * w [dim]; x is only read; xs, xq, xd as above. */
__kernel __attribute__((reqd_work_group_size(RMS_WG, 1, 1)))
void rmsnorm(__global float *x, __global const float *w, __global float *h, const int dim,
             const float eps, __global float *xs, __global short *xq, __global float *xd)
{
    __local float scratch[RMS_WG];
    const size_t row = (size_t)get_group_id(0) * dim;
    norm_row(x + row, x + row, w, h + row, dim, eps, false, scratch);
    group_sums(h + row, XS_ROW(get_group_id(0)), XQ_ROW(get_group_id(0)), dim);
}

/* Gemma's post-norm in the residual epilogue: x [T, dim] += rmsnorm(delta) * post [dim], then h, xs, xq,
   xd as add_rmsnorm. delta is scratch: it is overwritten with its normalised, weighted self. */
__kernel __attribute__((reqd_work_group_size(RMS_WG, 1, 1)))
void post_add_rmsnorm(__global float *x, __global float *delta, __global const float *post,
                      __global const float *w, __global float *h, const int dim, const float eps,
                      __global float *xs, __global short *xq, __global float *xd)
{
    __local float scratch[RMS_WG];
    const size_t row = (size_t)get_group_id(0) * dim;
    __global float *d = delta + row;
    norm_row(d, d, post, d, dim, eps, false, scratch);   /* each work-item rewrites the values it reads */
    barrier(CLK_LOCAL_MEM_FENCE | CLK_GLOBAL_MEM_FENCE);  /* scratch is reused; d read by the same items */
    norm_row(x + row, d, w, h + row, dim, eps, true, scratch);
    group_sums(h + row, XS_ROW(get_group_id(0)), XQ_ROW(get_group_id(0)), dim);
}

/* Gemma 3's Q and K norms, in place: each head vector of qkv [T, stride] (the n_heads query heads then
   the n_kv_heads key heads of a token, head_dim wide, at the row's start) = rmsnorm(v) * qw or kw
   [head_dim]. Launch: global (RMS_WG * T * (n_heads + n_kv_heads)), local (RMS_WG). */
__kernel __attribute__((reqd_work_group_size(RMS_WG, 1, 1)))
void head_rmsnorm(__global float *qkv, __global const float *qw, __global const float *kw,
                  const int n_heads, const int n_kv_heads, const int head_dim, const int stride,
                  const float eps)
{
    __local float scratch[RMS_WG];
    const int g = get_group_id(0), heads = n_heads + n_kv_heads;
    const int t = g / heads, j = g % heads;
    __global float *v = qkv + (size_t)t * stride + (size_t)j * head_dim;
    norm_row(v, v, j < n_heads ? qw : kw, v, head_dim, eps, false, scratch);
}
