/* The output of a matrix product (gemv_kernel.h, gemm.cl, gemm_mma.cl): the value of output n from its
   row's product, and its store.
     SWIGLU  y = act(gate) * up, the up rows following the gate rows in W (a GLU feed-forward);
             act is silu, or with GELU the tanh-approximated GELU (GeGLU, Gemma)
     else    y = the product
   With accumulate != 0 the value is added to y (the residual stream), else stored. */

#ifndef EPILOGUE_H
#define EPILOGUE_H

inline float silu(float v) { return v / (1.0f + exp(-v)); }
#ifdef GELU
inline float gate_act(float v) { return 0.5f * v * (1.0f + tanh(0.7978845608f * mad(0.044715f * v, v * v, v))); }
#else
#define gate_act silu
#endif

#ifdef SWIGLU
#define PRODUCT_OUT(gate, up) (gate_act(gate) * (up))
#else
#define PRODUCT_OUT(gate, up) (gate)
#endif

/* *y = v, or *y += v with accumulate. */
inline void store_out(__global float *y, const float v, const int accumulate)
{
    *y = accumulate ? *y + v : v;
}

#endif
