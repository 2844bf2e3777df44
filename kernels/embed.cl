/* Token embedding: gather one table row per token id into the f32 residual stream.

   Buffers:
     ids   [T]              int32 token ids; an id outside [0, vocab) is clamped into it
     q     [vocab, dim]     int8  Q8_0 values (embed_q8; dim % 32 == 0)
     scale [vocab, dim/32]  f32   one scale per 32 values of a row (embed_q8)
     w     [vocab, dim]     f32   table (embed_f32; any dim)
     x     [T, dim]         f32   out: x[t] = table[ids[t]]

   Launch: global (ceil(dim / 4), T); each work-item writes 4 values (fewer at the end of a row). */

inline size_t table_row(__global const int *ids, const int t, const int vocab)
{
    return (size_t)clamp(ids[t], 0, vocab - 1);
}

__kernel void embed_q8(__global const int *ids, __global const char *q, __global const float *scale,
                       __global float *x, const int dim, const int vocab)
{
    const int i = get_global_id(0);
    const int t = get_global_id(1);
    if (4 * i >= dim)
        return;
    const size_t row = table_row(ids, t, vocab);
    const float s = scale[row * (dim / 32) + (i >> 3)];
    vstore4(convert_float4(vload4(i, q + row * dim)) * s, i, x + (size_t)t * dim);
}

__kernel void embed_f32(__global const int *ids, __global const float *w, __global float *x,
                        const int dim, const int vocab)
{
    const int i = get_global_id(0);
    const int t = get_global_id(1);
    const size_t row = table_row(ids, t, vocab);
    __global const float *src = w + row * dim;
    __global float *dst = x + (size_t)t * dim;
    if (4 * i + 4 <= dim) {
        vstore4(vload4(i, src), i, dst);
    } else {
        for (int j = 4 * i; j < dim; j++)
            dst[j] = src[j];
    }
}
