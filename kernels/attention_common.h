/* What attention.cl (contiguous KV cache) and paged_attention.cl (paged KV pool) share: the model's
   shape, the vector helpers, RoPE, the fp16 cache, and the steps of the loop over key blocks that a
   work-group of either runs for its query tile:

     load_queries   the tile's ROWS = QT * GROUP query rows (row r: token r / GROUP of the tile, query
                    head kv_head * GROUP + r % GROUP), roped and pre-scaled, into local memory; the
                    rows' running max m and sum l reset;
     add_scores,    1. scores: work-item j computes key b + j against all rows (VW-wide dot products,
     store_scores      add_scores one vector of the key at a time), masked causally and by the window;
     softmax_block  2. the online softmax (SOFTMAX_ROW), one row per work-item: the running max m and
                       sum l, the block's scores turned into probabilities p = 2^(s - m) and the rescale
                       factor 2^(m_old - m);
     add_values     3. values: work-item (kg, c) = (lid / DV, lid % DV), DV = HEAD_DIM / VW, rescales
                       its accumulators and adds p * V over keys kg, kg + KEY_GROUPS, ... for values
                       VW*c .. VW*c + VW-1 of every row;
     write_rows     the KEY_GROUPS partial accumulators summed through local memory and each real row
                    written: normalised (o / l) or, for a split of the keys, as (o, m, l).

   Scores are kept in log2 units: Q is pre-scaled by log2(e) * ATT_SCALE and exp2 is used. Masked
   scores are a finite -1e30 (the builds use -cl-fast-relaxed-math, so no infinities).

   RoPE comes from a table precomputed on the host in float64 (fused.py rope_table; single-precision
   sin/cos of large angles would lose accuracy at long positions). Per position it holds, for every
   dimension of a head, cos(a_i) and a signed sin(a_i) (-sin for dim 2i, +sin for dim 2i+1; a_i = pos *
   base^(-2i / rope_dim); cos 1, sin 0 past rope_dim), so that for any vector width
   roped(x) = x * cos + swap_pairs(x) * sin, swap_pairs exchanging x[2i] and x[2i+1].

   Buffers the steps read or write:
     qkv      [T, QKV_STRIDE] f32           per token: Q heads, then K heads, then V heads,
                                             QKV_STRIDE = (N_HEADS + 2 * N_KV_HEADS) * HEAD_DIM
     rope     [ctx, 2, HEAD_DIM] f32         [pos, 0, :] cos, [pos, 1, :] signed sin
     out      [T, N_HEADS * HEAD_DIM] f32    attention output
     part_o   [n_splits, T, N_HEADS, HEAD_DIM] f32, part_ml [n_splits, T, N_HEADS, 2] f32: a split's
              unnormalised sum of p * v and its (m, l) (attention.cl's split-KV only)
   Local memory of a work-group (the kernel declares it): q_loc [ROWS, HEAD_DIM], p_loc [ROWS, ATT_WG],
   m_loc, l_loc, a_loc [ROWS], red [ATT_WG] of floatV.

   Model defines: HEAD_DIM (a multiple of VW), N_KV_HEADS, GROUP (query heads per KV head), ATT_SCALE
   (the softmax scale of Q.K^T; default 1 / sqrt(HEAD_DIM)). Option: KV_HALF (fp16 cache through
   vload_half / vstore_half, core OpenCL, no cl_khr_fp16). Tunables (defaults in
   engine/backends/opencl/specs.py): QT (query tokens per work-group), VW (vector width per work-item:
   4, 8 or 16), ATT_WG (work-group size = keys per block; a multiple of VW and of HEAD_DIM / VW). */

#ifndef ATTENTION_COMMON_H
#define ATTENTION_COMMON_H

#ifndef ATT_SCALE
#define ATT_SCALE rsqrt((float)HEAD_DIM)
#endif
#ifndef HEAD_DIM
#define HEAD_DIM 64
#endif
#ifndef N_KV_HEADS
#define N_KV_HEADS 3
#endif
#ifndef GROUP
#define GROUP 3
#endif
#ifndef QT
#define QT 1
#endif
#if !defined(ATT_WG) || !defined(VW)
#error "ATT_WG, VW: their defaults are declared in engine/backends/opencl/specs.py"
#endif

#define N_HEADS (GROUP * N_KV_HEADS)
#define Q_DIM (N_HEADS * HEAD_DIM)
#define KV_DIM (N_KV_HEADS * HEAD_DIM)
#define QKV_STRIDE (Q_DIM + 2 * KV_DIM)
#define ROWS (QT * GROUP)
#define DV (HEAD_DIM / VW)
#define KEY_GROUPS (ATT_WG / DV)
#define NEG (-1.0e30f)
#define VISIBLE (-1.0e29f)

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define floatV CAT(float, VW)
#define uintV CAT(uint, VW)
#define as_floatV CAT(as_float, VW)
#define as_uintV CAT(as_uint, VW)
#define vloadV CAT(vload, VW)
#define vstoreV CAT(vstore, VW)
#define hsumV CAT(hsum, VW)
#define hmaxV CAT(hmax, VW)

#if VW == 4
#define SWAP_PAIRS(x) ((x).s1032)
#elif VW == 8
#define SWAP_PAIRS(x) ((x).s10325476)
#elif VW == 16
#define SWAP_PAIRS(x) ((x).s1032547698badcfe)
#else
#error "VW must be 4, 8 or 16"
#endif

inline float hsum4(const float4 v) { return (v.x + v.y) + (v.z + v.w); }
inline float hsum8(const float8 v) { return hsum4(v.lo + v.hi); }
inline float hsum16(const float16 v) { return hsum8(v.lo + v.hi); }
inline float hmax4(const float4 v) { return fmax(fmax(v.x, v.y), fmax(v.z, v.w)); }
inline float hmax8(const float8 v) { return hmax4(fmax(v.lo, v.hi)); }
inline float hmax16(const float16 v) { return hmax8(fmax(v.lo, v.hi)); }

#ifdef KV_HALF
#define kv_t half
#define KV_LOAD(i, p) CAT(vload_half, VW)((i), (p))
#define KV_STORE(v, i, p) CAT(vstore_half, VW)((v), (i), (p))

/* v rounded to the nearest fp16 value (ties to even), kept as f32. */
inline floatV kv_round(floatV v)
{
    uintV b = as_uintV(v);
    b = (b + (uintV)(0x0FFFu) + ((b >> 13) & (uintV)(1u))) & (uintV)(0xFFFFE000u);
    return as_floatV(b);
}
#else
#define kv_t float
#define KV_LOAD(i, p) vloadV((i), (p))
#define KV_STORE(v, i, p) vstoreV((v), (i), (p))
#define kv_round(v) (v)
#endif

/* Values VW*c .. VW*c + VW-1 of a head vector at position pos, after RoPE:
   x * cos + swap_pairs(x) * (-sin, +sin, ...), from the table row of pos. */
inline floatV roped(__global const float *src, const int c, __global const float *rope, const int pos)
{
    __global const float *row = rope + (size_t)pos * 2 * HEAD_DIM;
    const floatV x = vloadV(c, src);
    return mad(x, vloadV(c, row), SWAP_PAIRS(x) * vloadV(c, row + HEAD_DIM));
}

/* The online softmax update of one row over a block of NV vectors of VN scores at p (log2 units, masked
   ones NEG; any address space): the running max m rises to the block's, the scores become
   p = 2^(s - m) (0 where masked), and the running sum l, rescaled by a = 2^(m_old - m), gains the
   block's. m, l and a are float lvalues. */
#define SOFTMAX_ROW(VN, NV, p, m, l, a)                                                        \
    {                                                                                          \
        CAT(float, VN) mx_ = (CAT(float, VN))(NEG);                                            \
        for (int j_ = 0; j_ < (NV); j_++)                                                      \
            mx_ = fmax(mx_, CAT(vload, VN)(j_, p));                                            \
        const float m_new_ = fmax(m, CAT(hmax, VN)(mx_));                                      \
        CAT(float, VN) sum_ = (CAT(float, VN))(0.0f);                                          \
        for (int j_ = 0; j_ < (NV); j_++) {                                                    \
            const CAT(float, VN) s_ = CAT(vload, VN)(j_, p);                                   \
            const CAT(float, VN) p_ = select((CAT(float, VN))(0.0f), exp2(s_ - m_new_), s_ > (CAT(float, VN))(VISIBLE)); \
            CAT(vstore, VN)(p_, j_, p);                                                        \
            sum_ += p_;                                                                        \
        }                                                                                      \
        a = exp2(m - m_new_);                                                                  \
        m = m_new_;                                                                            \
        l = mad(l, a, CAT(hsum, VN)(sum_));                                                    \
    }

/* The tile's query rows into q_loc [ROWS, HEAD_DIM]: row r is token t0 + r / GROUP (of nq real ones,
   at position p0 + r / GROUP) and query head kvh * GROUP + r % GROUP, roped and pre-scaled into log2
   units; rows past nq are 0. m_loc, l_loc [ROWS] start at NEG and 0. A barrier must follow. */
inline void load_queries(__local floatV *q_loc, __local float *m_loc, __local float *l_loc,
                         __global const float *qkv, __global const float *rope,
                         const int t0, const int nq, const int p0, const int kvh)
{
    const int lid = get_local_id(0);
    const float qscale = M_LOG2E_F * ATT_SCALE;
    for (int idx = lid; idx < ROWS * DV; idx += ATT_WG) {
        const int r = idx / DV, c = idx % DV, tq = r / GROUP, g = r % GROUP;
        floatV q = (floatV)(0.0f);
        if (tq < nq)
            q = roped(qkv + (size_t)(t0 + tq) * QKV_STRIDE + (kvh * GROUP + g) * HEAD_DIM, c, rope, p0 + tq);
        q_loc[idx] = q * qscale;
    }
    for (int r = lid; r < ROWS; r += ATT_WG) {
        m_loc[r] = NEG;
        l_loc[r] = 0.0f;
    }
}

/* v[r] = 0 for every row: the scores of a key, the accumulators of values. */
inline void clear_rows(floatV v[ROWS])
{
    for (int r = 0; r < ROWS; r++)
        v[r] = (floatV)(0.0f);
}

/* 1. sv[r] += (row r's values VW*cc ..) . k, for one vector k of a key and every row. */
inline void add_scores(floatV sv[ROWS], __local const floatV *q_loc, const int cc, const floatV k)
{
    for (int r = 0; r < ROWS; r++)
        sv[r] = mad(q_loc[r * DV + cc], k, sv[r]);
}

/* 1. This work-item's key (position pos, one of the block's nk) against every row into column lid of
   p_loc [ROWS, ATT_WG]: its score where row r (at position p0 + r / GROUP) sees it, causally and, with
   a window, within it; NEG elsewhere. A barrier must follow. */
inline void store_scores(__local float *p_loc, const floatV sv[ROWS], const int nk, const int pos, const int p0,
                         const int window)
{
    const int lid = get_local_id(0);
    for (int r = 0; r < ROWS; r++) {
        const bool visible = lid < nk && pos <= p0 + r / GROUP
                             && (!window || pos > p0 + r / GROUP - window);
        p_loc[r * ATT_WG + lid] = visible ? hsumV(sv[r]) : NEG;
    }
}

/* 2. The online softmax over the block's scores, one row per work-item: p_loc's scores become
   probabilities; m_loc, l_loc updated; a_loc [ROWS] the rows' rescale factors. A barrier must follow. */
inline void softmax_block(__local float *p_loc, __local float *m_loc, __local float *l_loc, __local float *a_loc)
{
    for (int r = get_local_id(0); r < ROWS; r += ATT_WG)
        SOFTMAX_ROW(VW, ATT_WG / VW, p_loc + r * ATT_WG, m_loc[r], l_loc[r], a_loc[r])
}

/* 3. acc[r] = acc[r] * a_loc[r]: the rows' accumulators rescaled to the new running max. */
inline void rescale(floatV acc[ROWS], __local const float *a_loc)
{
    for (int r = 0; r < ROWS; r++)
        acc[r] *= a_loc[r];
}

/* 3. acc[r] += p(row r, key j) * v for every row, v this work-item's values of key j of the block. */
inline void add_values(floatV acc[ROWS], __local const float *p_loc, const int j, const floatV v)
{
    for (int r = 0; r < ROWS; r++)
        acc[r] = mad((floatV)(p_loc[r * ATT_WG + j]), v, acc[r]);
}

/* After the last block: each row's KEY_GROUPS accumulators summed through red [ATT_WG], and the real
   rows (tokens t0 .. t0 + nq - 1) written: with partial 0 normalised into out, with partial 1 as the
   unnormalised sum into part_o and (m, l) into part_ml at split `split` of T tokens. Barriers inside:
   every work-item of the work-group calls it. */
inline void write_rows(const floatV acc[ROWS], __local floatV *red, __local const float *m_loc,
                       __local const float *l_loc, const int t0, const int nq, const int kvh,
                       __global float *out, __global float *part_o, __global float *part_ml,
                       const int T, const int split, const int partial)
{
    const int lid = get_local_id(0), c = lid % DV, kg = lid / DV;
    for (int r = 0; r < ROWS; r++) {
        red[lid] = acc[r];
        barrier(CLK_LOCAL_MEM_FENCE);
        const int tq = r / GROUP;
        if (kg == 0 && tq < nq) {
            floatV o = red[c];
            for (int k = 1; k < KEY_GROUPS; k++)
                o += red[k * DV + c];
            const int t = t0 + tq, head = kvh * GROUP + r % GROUP;
            if (partial) {
                const size_t slot = ((size_t)split * T + t) * N_HEADS + head;
                vstoreV(o, c, part_o + slot * HEAD_DIM);
                if (c == 0)
                    vstore2((float2)(m_loc[r], l_loc[r]), slot, part_ml);
            } else {
                vstoreV(o / l_loc[r], c, out + (size_t)t * Q_DIM + head * HEAD_DIM);
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
}

#endif
