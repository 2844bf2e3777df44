/* The input x of the int-dot GEMV (gemv_int.cl) in int16: one row x [K] becomes
     xq [K] int16  x in blocks of 32: q = rint(x * 32767 / max|block|)
     xd [K/32]     f32, the blocks' scales max|block| / 32767 (x ~ q * xd, to 2^-15 of the block's largest)
   Within each whole 128-element chunk of the row the values are reordered to line up with the int4
   weight nibbles as gemv_int.cl IPIECE reads them: element e of the chunk (e = 32g + 16h + 4m + 2k + o,
   nibble h of byte 2k + o of group g in lane m once the words are transposed) is stored at
   32(h + 2o) + 8m + 2g + k: four vectors of 32 values, one per nibble of a 16-bit word. The tail past
   the last whole chunk keeps
   its natural order (the GEMV reads the float x there); with XQ_NATURAL (the int8 GEMV) the whole
   row does. With XQ_PAIRS (gemv_dp.cl) element e = 32g + 16h + l of a whole chunk goes to 8l + 2g + h:
   the 32-bit word 4l + g holds the pair (x[32g + l], x[32g + 16 + l]), the two planes of group g at
   lane l of the int4 layout, as dp2a multiplies them. The group sums that go with them (the int4
   zero terms) are taken of the values the blocks hold: xq_block. Written by the norms (rmsnorm.cl XQ,
   gemv_kernel.h NORM with HQ) and by gemv_int.cl's quantize kernel. */

#ifndef XQ_H
#define XQ_H

/* The block x[k0 .. k0 + 32) of a row of K values: its int16 values into xq, its scale into xd[k0 / 32].
   Returns the block's sum as the GEMV's zero terms take it: of the values the GEMV multiplies, q * scale
   in whole chunks (so that the int4 zero terms and the products see the same x) and x itself in the
   tail. In a whole chunk the block is group g = (k0 % 128) / 32, its halves h = 0, 1 (a, b) of 4 x 4
   values (m, j = 2k + o): the even ones (o = 0) and the odd ones each go as pairs (k = 0, 1) to
   32(h + 2o) + 8m + 2g. */
inline float xq_block(__global const float* x, const int k0, const int K, __global short* xq,
                      __global float* xd)
{
    const float16 a = vload16(0, x + k0), b = vload16(0, x + k0 + 16);
    const float16 m16 = fmax(fabs(a), fabs(b));
    const float8 m8 = fmax(m16.lo, m16.hi);
    const float4 m4 = fmax(m8.lo, m8.hi);
    const float m = fmax(fmax(m4.x, m4.y), fmax(m4.z, m4.w));
    const float inv = m > 0.0f ? 32767.0f / m : 0.0f, scale = m / 32767.0f;
    const float16 qa = rint(a * inv), qb = rint(b * inv);
    const short16 ca = convert_short16(qa), cb = convert_short16(qb);
    const bool tail = (k0 & ~127) + 128 > K;          // the GEMV reads the float x there
#ifdef XQ_NATURAL
    const bool natural = true;                        // for int8 weights, rows in natural order
#else
    const bool natural = tail;
#endif
    xd[k0 / 32] = scale;
    if (natural) {
        vstore16(ca, 0, xq + k0);
        vstore16(cb, 0, xq + k0 + 16);
    } else {
        __global short* p = xq + (k0 & ~127) + 2 * ((k0 & 127) >> 5);
#ifdef XQ_PAIRS
#define XQ_PAIR(l) vstore2((short2)(ca.s##l, cb.s##l), 0, p + 8 * 0x##l);    /* lane l (hex digit) */
        XQ_PAIR(0) XQ_PAIR(1) XQ_PAIR(2) XQ_PAIR(3) XQ_PAIR(4) XQ_PAIR(5) XQ_PAIR(6) XQ_PAIR(7)
        XQ_PAIR(8) XQ_PAIR(9) XQ_PAIR(a) XQ_PAIR(b) XQ_PAIR(c) XQ_PAIR(d) XQ_PAIR(e) XQ_PAIR(f)
#undef XQ_PAIR
#else
        const short8 v[4] = {ca.even, cb.even, ca.odd, cb.odd};       // h + 2o = 0, 1, 2, 3
        for (int n = 0; n < 4; n++) {
            vstore2(v[n].s01, 0, p + 32 * n);      vstore2(v[n].s23, 0, p + 32 * n + 8);
            vstore2(v[n].s45, 0, p + 32 * n + 16); vstore2(v[n].s67, 0, p + 32 * n + 24);
        }
#endif
    }
    const float16 s = tail ? a + b : qa + qb;
    const float8 s8 = s.lo + s.hi;
    const float4 s4 = s8.lo + s8.hi;
    const float sum = (s4.x + s4.y) + (s4.z + s4.w);
    return tail ? sum : sum * scale;
}

/* Kernel quantize (gemv_int.cl, gemv_dp.cl): x [T, K] f32 -> x in int16 blocks, xq [T, K] and
   xd [T, K/32], and the group sums xs [T, K/G] that go with them. Global size T*K/G. */
#ifdef XQ_QUANTIZE
__kernel void quantize(__global const float* restrict x, __global float* restrict xs,
                       __global short* restrict xq, __global float* restrict xd, const int K)
{
    const int g = get_global_id(0);
    const int row = g * G / K, k0 = g * G - row * K;
    float sum = 0.0f;
    for (int b = 0; b < G; b += 32)
        sum += xq_block(x + (size_t)row * K, k0 + b, K, xq + (size_t)row * K, xd + (size_t)row * (K / 32));
    xs[g] = sum;
}
#endif

#endif
