/* Streaming copy, one float4 per work-item: the device's memory-bandwidth probe (bytes read +
 * written per second), and the kernel built to check that a device can build kernels at all.
 * The global size is n4, a multiple of the work-group size. */

__kernel void copy4(__global const float4 *restrict src,   /* [n4] */
                    __global float4 *restrict dst)         /* [n4] */
{
    const size_t i = get_global_id(0);
    dst[i] = src[i];
}
