/* A bias added to every row of a matrix product's output: y[t, n] += b[n].

   Buffers (f32, row-major):
     y  [T, N]   in/out: the product x @ W^T, written by gemv / gemm just before
     b  [N]      the bias, one value per output (row of W)

   Launch: global (N, T), any local size. */

__kernel void add_bias(__global float *y, __global const float *b, const int N)
{
    const int n = get_global_id(0);
    const int t = get_global_id(1);
    y[t * N + n] += b[n];
}
