/* Token embedding: gather one table row per token id into the f32 residual stream.

   Buffers:
     ids   [T]              int32 token ids; an id outside [0, vocab) is clamped into it
     q     [vocab, dim]     int8  Q8_0 values (embed_q8; dim % 32 == 0)
     scale [vocab, dim/32]  f32   one scale per 32 values of a row (embed_q8)
     w     [vocab, dim]     f32   table (embed_f32; any dim)
     W     row tiles        uint  an int8 matrix [vocab, dim] in gemv_tiles.h's row-tile layout (embed_tiles):
                                  the output projection's own buffer when the embedding is tied
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

/* Row `row` of an int8 row-tile matrix: tile row / 4, row row % 4 in it; along K chunks of 128, then
   64, then 32 elements, each chunk block holding char q[4][C] then half scale[4][C/32]. */
#define RT 4
#define BLOCK_WORDS(C) (RT * (C) / 4 + RT * (C) / 64)

__kernel void embed_tiles(__global const int *ids, __global const uint *W, __global float *x,
                          const int dim, const int vocab)
{
    const int i = get_global_id(0);
    const int t = get_global_id(1);
    const int k = 4 * i;
    if (k >= dim)
        return;
    const size_t row = table_row(ids, t, vocab);
    const int n128 = dim / 128, has64 = (dim / 64) & 1, has32 = (dim / 32) & 1;
    const int tile_words = n128 * BLOCK_WORDS(128) + has64 * BLOCK_WORDS(64) + has32 * BLOCK_WORDS(32);
    int c, start, off;                     /* chunk width, its first element, its word offset */
    if (k < n128 * 128) {
        c = 128; start = k / 128 * 128; off = k / 128 * BLOCK_WORDS(128);
    } else if (has64 && k < n128 * 128 + 64) {
        c = 64; start = n128 * 128; off = n128 * BLOCK_WORDS(128);
    } else {
        c = 32; start = n128 * 128 + has64 * 64; off = n128 * BLOCK_WORDS(128) + has64 * BLOCK_WORDS(64);
    }
    __global const uint *blk = W + (row / RT) * tile_words + off;
    const int r = row % RT, e = k - start;
    const char4 q = vload4(0, (__global const char *)blk + r * c + e);
    const float s = vload_half(r * (c / 32) + e / 32, (__global const half *)(blk + RT * c / 4));
    vstore4(convert_float4(q) * s, i, x + (size_t)t * dim);
}

/* x [n] *= s: Gemma's embedding scale (sqrt(dim)), after the gather. Launch: global (n). */
__kernel void scale(__global float *x, const float s)
{
    x[get_global_id(0)] *= s;
}
