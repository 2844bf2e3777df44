/* The weight formats of the row tiles (gemv_tiles.h, gemm.cl, gemm_mma.cl; packed by engine/backends/opencl/matmul.py
   and engine/backends/opencl/weights.py): words per chunk block of C elements, and how scales load.
     FORMAT 4   int4, w = q * scale + zero, one scale and zero per G (32, 64, 128)
     FORMAT 8   int8, w = q * scale (+ zero with ZERO8), one scale (and zero) per G (16, 32)
     FORMAT 16  fp16 weights
     FORMAT 17  bfloat16 weights (BF16 as stored: the top half of a float32)
     FORMAT 32  float32 weights (F32)
   Scales and zeros are fp16 (GGUF Q4_0, Q4_1, Q8_0, Q5_0, IQ4_NL: their d as stored) or, with SCALE_F32,
   float32 (K-quants and IQ4_XS: d times a 6- or 8-bit sub-block scale, exact in float32, not in fp16). */

#ifndef WFORMAT_H
#define WFORMAT_H

#ifndef FORMAT
#define FORMAT 4
#endif
#ifndef G
#define G 32
#endif
#ifdef SCALE_F32
#define SCALE_T float
#define SVLOAD(n, p) CAT(vload, n)(0, p)
#define SLOAD1(p, i) ((p)[i])
#define SCALE_WORDS(n) (n)
#else
#define SCALE_T half
#define SVLOAD(n, p) CAT(vload_half, n)(0, p)
#define SLOAD1(p, i) vload_half(i, p)
#define SCALE_WORDS(n) ((n) / 2)
#endif
#ifdef ZERO8
#define ZERO8_N 1
#else
#define ZERO8_N 0
#endif
#if FORMAT == 4
#define BLOCK_WORDS(C) (RT * (C) / 8 + 2 * SCALE_WORDS(RT * (C) / G))
#elif FORMAT == 8
#define BLOCK_WORDS(C) (RT * (C) / 4 + (1 + ZERO8_N) * SCALE_WORDS(RT * (C) / G))
#elif FORMAT == 32
#define BLOCK_WORDS(C) (RT * (C))
#else
#define BLOCK_WORDS(C) (RT * (C) / 2)
#endif
#if FORMAT == 8                 /* scales per row tile and chunk of 128, 64, 32 */
#define RT_GC_128 (RT * 128 / G)
#define RT_GC_64 (RT * 64 / G)
#define RT_GC_32 (RT * 32 / G)
#endif
/* n scales (or zeros) from p into the float array d (n: RT_GC_128/64/32); vector loads of 16, 8, 4
   halves for int8 in groups of 32. */
#if G == 32 && !defined(SCALE_F32) && FORMAT == 8
#undef RT_GC_128
#undef RT_GC_64
#undef RT_GC_32
#define RT_GC_128 16
#define RT_GC_64 8
#define RT_GC_32 4
#define LOAD_SCALES(n, p, d) CAT(vstore, n)(SVLOAD(n, p), 0, d);
#else
#define LOAD_SCALES(n, p, d) _Pragma("unroll") for (int i_ = 0; i_ < (n); i_++) (d)[i_] = SLOAD1(p, i_);
#endif
/* The weights of fp16 / bfloat16 / float32 rows: PV values at p. */
#if FORMAT == 32
#define WTYPE float
#define WLOAD(PV, p) CAT(vload, PV)(0, p)
#elif FORMAT == 17
#define WTYPE ushort
#define WLOAD(PV, p) CAT(as_float, PV)(CAT(convert_uint, PV)(CAT(vload, PV)(0, p)) << 16)
#else
#define WTYPE half
#define WLOAD(PV, p) CAT(vload_half, PV)(0, p)
#endif
/* int4 (FORMAT 4): the nibbles at bit `shift` of the words q (uint, or uintPV) dequantized, q * scale +
   zero as floatPV. */
#define DEQ4(PV, q, shift, scale, zero) fma(CAT(convert_float, PV)(((q) >> (shift)) & 15u), scale, zero)

#endif
