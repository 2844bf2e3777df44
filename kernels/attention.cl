/* Fused self-attention for T new tokens at positions start_pos .. start_pos + T - 1, in one kernel.

   One launch of `attend` does, for every query head: RoPE on Q and K, the KV-cache write of the new
   tokens' K (roped) and V, Q.K^T / sqrt(head_dim), the causal mask, an online softmax (running max
   and sum, flash-attention style) and the product with V. With split-KV (flash-decoding) each
   work-group covers one slice of the keys and writes a partial result; `combine` then merges the
   slices.

   Ordering without a global barrier: no work-group ever reads a position of this launch's new
   tokens from the cache. Keys and values at positions >= start_pos are taken straight from qkv
   (K roped on the fly), and each new position is written to the cache by exactly one work-group:
   the one whose query tile holds that position and whose key slice contains it. Positions below
   start_pos come from the cache, written by earlier launches.

   Work decomposition of `attend`: a work-group takes one KV head, QT consecutive new tokens (its
   query tile) and one key slice (split). Its ROWS = QT * GROUP query rows (row r: token r / GROUP,
   query head kv_head * GROUP + r % GROUP) share every K and V load. Keys are visited in blocks of
   ATT_WG:
     1. scores: work-item j computes key b + j against all rows (VW-wide dot products);
     2. softmax: work-item r updates row r's running max m and sum l, turns the block's scores
        into probabilities p = 2^(s - m) and yields the rescale factor 2^(m_old - m);
     3. values: work-item (kg, c) = (lid / DV, lid % DV), DV = HEAD_DIM / VW, accumulates p * V
        over keys kg, kg + KEY_GROUPS, ... for values VW*c .. VW*c + VW-1 of every row.
   At the end the KEY_GROUPS partial accumulators are summed through local memory.
   Scores are kept in log2 units: Q is pre-scaled by log2(e) / sqrt(head_dim) and exp2 is used.
   Masked scores are a finite -1e30 (the build uses -cl-fast-relaxed-math, so no infinities).

   RoPE comes from a table precomputed on the host in float64 (single-precision sin/cos of large
   angles would lose accuracy at long positions). Per position it holds, for every dimension of a
   head, cos(a_i) and a signed sin(a_i) (-sin for dim 2i, +sin for dim 2i+1; a_i = pos *
   base^(-2i / rope_dim); cos 1, sin 0 past rope_dim), so that for any vector width
   roped(x) = x * cos + swap_pairs(x) * sin, swap_pairs exchanging x[2i] and x[2i+1].

   Buffers:
     qkv      [T, QKV_STRIDE] f32           per token: Q heads, then K heads, then V heads,
                                             QKV_STRIDE = (N_HEADS + 2 * N_KV_HEADS) * HEAD_DIM
     rope     [ctx, 2, HEAD_DIM] f32         [pos, 0, :] cos, [pos, 1, :] signed sin (see above)
     k_cache  [n_layers, N_KV_HEADS, ctx, HEAD_DIM] f32, or fp16 with KV_HALF; K stored roped.
     v_cache  [n_layers, N_KV_HEADS, ctx, HEAD_DIM] same. One (layer, kv head) is a contiguous
                                             [ctx, HEAD_DIM] matrix, so a work-group streams it.
     out      [T, N_HEADS * HEAD_DIM] f32    attention output (written when partial == 0)
     part_o   [n_splits, T, N_HEADS, HEAD_DIM] f32   unnormalised sum of p * v of one key slice
     part_ml  [n_splits, T, N_HEADS, 2] f32          (m, l) of that slice: max score (log2 units)
                                                     and sum of p; (-1e30, 0) for an empty slice

   Launch attend:  global (ATT_WG * ceil(T / QT), N_KV_HEADS, n_splits), local (ATT_WG, 1, 1).
   Launch combine: global (HEAD_DIM / 4, N_HEADS, T), any local size.
   With SPLIT_COMBINE there is no combine launch: the last work-group of a (query tile, KV head) to
   write its partial result, counted in done [ceil(T / QT), N_KV_HEADS] (int, left at 0 for the next
   launch), merges the slices of the tile's rows itself (as gemv.cl's NORM epilogue: each work-group's
   writes fenced before its count, the partials read back through volatile pointers).

   Model defines: HEAD_DIM (a multiple of VW), N_KV_HEADS, GROUP (query heads per KV head), ATT_SCALE
   (the softmax scale of Q.K^T; default 1 / sqrt(HEAD_DIM)).
   Sliding window (argument `window`, 0 for none): the query at position p sees keys p - window + 1 .. p;
   the key loops start at the tile's first visible key.
   Option: KV_HALF (fp16 cache through vload_half / vstore_half, core OpenCL, no cl_khr_fp16; the
   new tokens' K and V are rounded to fp16 before use, so a token sees the same values whether they
   come from qkv or from the cache).
   Tunables: QT (query tokens per work-group), VW (vector width per work-item: 4, 8 or 16; 16 suits
   CPUs, whose compilers do not vectorise across work-items here), ATT_WG (work-group size = keys
   per block; a multiple of VW and of HEAD_DIM / VW), KL (work-items per key in the score step, a
   power of two dividing ATT_WG: 1, each work-item one key of the block; KL > 1, KL work-items read
   one key's row side by side and the block is scored in passes of KPP = ATT_WG / KL keys, which
   GPUs read in whole cache lines; decode launches use it, with short key slices, so that a token's
   attention has many work-groups). */

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
#ifndef ATT_WG
#error "ATT_WG: its default is declared in engine/backends/opencl/specs.py"
#endif
#ifndef VW
#error "VW: its default is declared in engine/backends/opencl/specs.py"
#endif
#ifndef KL
#error "KL: its default is declared in engine/backends/opencl/specs.py"
#endif

#define N_HEADS (GROUP * N_KV_HEADS)
#define Q_DIM (N_HEADS * HEAD_DIM)
#define KV_DIM (N_KV_HEADS * HEAD_DIM)
#define QKV_STRIDE (Q_DIM + 2 * KV_DIM)
#define ROWS (QT * GROUP)
#define DV (HEAD_DIM / VW)
#define KEY_GROUPS (ATT_WG / DV)
#define KPP (ATT_WG / KL)                /* keys per pass of the score step with KL > 1 */
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

/* Values 4c .. 4c+3 of row (t, head) merged from the n_splits partial results: each slice's sum of p * v
   weighted by 2^(m_slice - m), divided by the weighted sum of the slices' l. With SPLIT_COMBINE read
   through volatile pointers: in attend other work-groups wrote them during the same launch. */
#ifdef SPLIT_COMBINE
#define PART_Q volatile
#else
#define PART_Q
#endif
inline float4 merge_splits(PART_Q __global const float *part_o, PART_Q __global const float *part_ml,
                           const int T, const int n_splits, const int t, const int head, const int c)
{
    float m = NEG;
    for (int s = 0; s < n_splits; s++)
        m = fmax(m, part_ml[2 * (((size_t)s * T + t) * N_HEADS + head)]);
    float l = 0.0f;
    float4 o = (float4)(0.0f);
    for (int s = 0; s < n_splits; s++) {
        const size_t slot = ((size_t)s * T + t) * N_HEADS + head;
        const float ms = part_ml[2 * slot], ls = part_ml[2 * slot + 1];
        const float w = ls > 0.0f ? exp2(ms - m) : 0.0f;
        PART_Q __global const float *po = part_o + slot * HEAD_DIM + 4 * c;
        l = mad(w, ls, l);
        o = mad((float4)(w), (float4)(po[0], po[1], po[2], po[3]), o);
    }
    return o / l;
}

__kernel __attribute__((reqd_work_group_size(ATT_WG, 1, 1)))
void attend(__global const float *qkv,   /* [T, QKV_STRIDE] */
            __global const float *rope,  /* [ctx, 2, HEAD_DIM] */
            __global kv_t *k_cache,      /* [n_layers, N_KV_HEADS, ctx, HEAD_DIM] */
            __global kv_t *v_cache,      /* [n_layers, N_KV_HEADS, ctx, HEAD_DIM] */
            __global float *out,         /* [T, Q_DIM] */
            __global float *part_o,      /* [n_splits, T, N_HEADS, HEAD_DIM] */
            __global float *part_ml,     /* [n_splits, T, N_HEADS, 2] */
            const int T, const int start_pos, const int ctx, const int layer,
            const int chunk,             /* keys per split; >= start_pos + T when not split */
            const int partial,           /* 1: write part_o / part_ml, 0: write out */
            const int window,            /* sliding window, 0: none */
            __global int *done)          /* [ceil(T / QT), N_KV_HEADS] with SPLIT_COMBINE: 0 before */
{
    __local floatV q_loc[ROWS * DV];     /* [ROWS, HEAD_DIM] roped, pre-scaled queries */
    __local float p_loc[ROWS * ATT_WG];  /* [ROWS, ATT_WG] scores of a key block, then probabilities */
    __local float m_loc[ROWS];           /* running max of each row (log2 units) */
    __local float l_loc[ROWS];           /* running sum of probabilities of each row */
    __local float a_loc[ROWS];           /* rescale factor of the current block */
    __local floatV red[ATT_WG];          /* [KEY_GROUPS, HEAD_DIM] final reduction of one row */
#if KL > 1
    __local float s_part[ROWS * ATT_WG];  /* [ROWS, KPP, KL] partial dot products of one pass */
#endif
#ifdef SPLIT_COMBINE
    __local int last;                    /* whether this work-group is its tile's last to finish */
#endif

    const int lid = get_local_id(0);
    const int t0 = get_group_id(0) * QT;
    const int kvh = get_group_id(1);
    const int split = get_group_id(2);
    const int nq = min(QT, T - t0);            /* real tokens in this tile */
    const int p0 = start_pos + t0;             /* position of the tile's first token */
    const int kend = p0 + nq;                  /* keys [0, kend) are visible to some row */
    const int s0 = split * chunk;
    const int s1 = min(s0 + chunk, kend);      /* this work-group's keys: [s0, s1) */

    const size_t head_base = ((size_t)layer * N_KV_HEADS + kvh) * (size_t)ctx * HEAD_DIM;
    __global kv_t *kc = k_cache + head_base;   /* [ctx, HEAD_DIM] */
    __global kv_t *vc = v_cache + head_base;   /* [ctx, HEAD_DIM] */
    __global const float *k_new = qkv + Q_DIM + kvh * HEAD_DIM;  /* token t at t * QKV_STRIDE */
    __global const float *v_new = k_new + KV_DIM;

    /* The tile's own new tokens that fall in this slice go to the cache. */
    const int w0 = max(p0, s0);
    for (int idx = lid; idx < (s1 - w0) * DV; idx += ATT_WG) {
        const int pos = w0 + idx / DV, c = idx % DV;
        const size_t row = (size_t)(pos - start_pos) * QKV_STRIDE;
        KV_STORE(kv_round(roped(k_new + row, c, rope, pos)), c, kc + (size_t)pos * HEAD_DIM);
        KV_STORE(kv_round(vloadV(c, v_new + row)), c, vc + (size_t)pos * HEAD_DIM);
    }

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
    barrier(CLK_LOCAL_MEM_FENCE);

    const int c = lid % DV, kg = lid / DV;
    floatV acc[ROWS];
    for (int r = 0; r < ROWS; r++)
        acc[r] = (floatV)(0.0f);

    const int kstart = window ? max(s0, p0 - window + 1) : s0;   /* the first key a row of the tile sees */
    for (int b = kstart; b < s1; b += ATT_WG) {
        const int nk = min(ATT_WG, s1 - b);

#if KL > 1
        /* 1. scores, KL work-items per key: work-item (kk, lane) = (lid / KL, lid % KL) takes key
           b + j0 + kk of each pass of KPP keys and the vectors lane, lane + KL, ... of its row, so that
           KL neighbouring work-items read one key's row in consecutive vectors; the KL partial dot
           products meet in s_part. */
        for (int j0 = 0; j0 < nk; j0 += KPP) {
            const int lane = lid % KL, kk = lid / KL, pos = b + j0 + kk;
            floatV sv[ROWS];
            for (int r = 0; r < ROWS; r++)
                sv[r] = (floatV)(0.0f);
            if (j0 + kk < nk) {
                if (pos < start_pos) {
                    __global const kv_t *kr = kc + (size_t)pos * HEAD_DIM;
                    for (int cc = lane; cc < DV; cc += KL) {
                        const floatV k = KV_LOAD(cc, kr);
                        for (int r = 0; r < ROWS; r++)
                            sv[r] = mad(q_loc[r * DV + cc], k, sv[r]);
                    }
                } else {
                    __global const float *kr = k_new + (size_t)(pos - start_pos) * QKV_STRIDE;
                    for (int cc = lane; cc < DV; cc += KL) {
                        const floatV k = kv_round(roped(kr, cc, rope, pos));
                        for (int r = 0; r < ROWS; r++)
                            sv[r] = mad(q_loc[r * DV + cc], k, sv[r]);
                    }
                }
            }
            for (int r = 0; r < ROWS; r++)
                s_part[(r * KPP + kk) * KL + lane] = hsumV(sv[r]);
            barrier(CLK_LOCAL_MEM_FENCE);
            for (int idx = lid; idx < ROWS * KPP; idx += ATT_WG) {
                const int r = idx / KPP, j = j0 + idx % KPP, kpos = b + j;
                float d = s_part[idx * KL];
                for (int l = 1; l < KL; l++)
                    d += s_part[idx * KL + l];
                const bool visible = j < nk && kpos <= p0 + r / GROUP
                                     && (!window || kpos > p0 + r / GROUP - window);
                if (j < ATT_WG)
                    p_loc[r * ATT_WG + j] = visible ? d : NEG;
            }
            barrier(CLK_LOCAL_MEM_FENCE);
        }
        for (int idx = lid; idx < ROWS * ATT_WG; idx += ATT_WG)   /* past the last pass */
            if (idx % ATT_WG >= (nk + KPP - 1) / KPP * KPP)
                p_loc[idx] = NEG;
#else
        /* 1. scores of key b + lid against every row */
        {
            const int pos = b + lid;
            floatV sv[ROWS];
            for (int r = 0; r < ROWS; r++)
                sv[r] = (floatV)(0.0f);
            if (lid < nk) {
                if (pos < start_pos) {
                    __global const kv_t *kr = kc + (size_t)pos * HEAD_DIM;
                    for (int cc = 0; cc < DV; cc++) {
                        const floatV k = KV_LOAD(cc, kr);
                        for (int r = 0; r < ROWS; r++)
                            sv[r] = mad(q_loc[r * DV + cc], k, sv[r]);
                    }
                } else {
                    __global const float *kr = k_new + (size_t)(pos - start_pos) * QKV_STRIDE;
                    for (int cc = 0; cc < DV; cc++) {
                        const floatV k = kv_round(roped(kr, cc, rope, pos));
                        for (int r = 0; r < ROWS; r++)
                            sv[r] = mad(q_loc[r * DV + cc], k, sv[r]);
                    }
                }
            }
            for (int r = 0; r < ROWS; r++) {
                const bool visible = lid < nk && pos <= p0 + r / GROUP
                                     && (!window || pos > p0 + r / GROUP - window);
                p_loc[r * ATT_WG + lid] = visible ? hsumV(sv[r]) : NEG;
            }
        }
#endif
        barrier(CLK_LOCAL_MEM_FENCE);

        /* 2. online softmax, one row per work-item */
        for (int r = lid; r < ROWS; r += ATT_WG) {
            __local float *pr = p_loc + r * ATT_WG;
            floatV mx = (floatV)(NEG);
            for (int j = 0; j < ATT_WG / VW; j++)
                mx = fmax(mx, vloadV(j, pr));
            const float m_old = m_loc[r];
            const float m_new = fmax(m_old, hmaxV(mx));
            floatV sum = (floatV)(0.0f);
            for (int j = 0; j < ATT_WG / VW; j++) {
                const floatV s = vloadV(j, pr);
                const floatV p = select((floatV)(0.0f), exp2(s - m_new), s > (floatV)(VISIBLE));
                vstoreV(p, j, pr);
                sum += p;
            }
            const float a = exp2(m_old - m_new);
            a_loc[r] = a;
            m_loc[r] = m_new;
            l_loc[r] = mad(l_loc[r], a, hsumV(sum));
        }
        barrier(CLK_LOCAL_MEM_FENCE);

        /* 3. acc = acc * a + P V over this block's keys kg, kg + KEY_GROUPS, ... */
        for (int r = 0; r < ROWS; r++)
            acc[r] *= a_loc[r];
        for (int j = kg; j < nk; j += KEY_GROUPS) {
            const int pos = b + j;
            const floatV v = pos < start_pos
                ? KV_LOAD(c, vc + (size_t)pos * HEAD_DIM)
                : kv_round(vloadV(c, v_new + (size_t)(pos - start_pos) * QKV_STRIDE));
            for (int r = 0; r < ROWS; r++)
                acc[r] = mad((floatV)(p_loc[r * ATT_WG + j]), v, acc[r]);
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }

    /* Sum the key groups' accumulators and write each real row. */
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
#ifdef SPLIT_COMBINE
    if (!partial)
        return;
    mem_fence(CLK_GLOBAL_MEM_FENCE);           /* this work-item's partials are written */
    barrier(CLK_GLOBAL_MEM_FENCE | CLK_LOCAL_MEM_FENCE);
    __global int *count = done + get_group_id(0) * N_KV_HEADS + kvh;
    if (lid == 0)
        last = atomic_inc(count) == (int)get_num_groups(2) - 1;
    barrier(CLK_LOCAL_MEM_FENCE);
    if (!last)
        return;
    mem_fence(CLK_GLOBAL_MEM_FENCE);
    for (int idx = lid; idx < nq * GROUP * (HEAD_DIM / 4); idx += ATT_WG) {
        const int r = idx / (HEAD_DIM / 4), c4 = idx % (HEAD_DIM / 4);
        const int t = t0 + r / GROUP, head = kvh * GROUP + r % GROUP;
        vstore4(merge_splits(part_o, part_ml, T, get_num_groups(2), t, head, c4), c4,
                out + (size_t)t * Q_DIM + head * HEAD_DIM);
    }
    if (lid == 0)
        *count = 0;
#endif
}

/* out[t, head] = the softmax-weighted merge of the n_splits partial results of that row.
   Launch: global (HEAD_DIM / 4, N_HEADS, T). */
__kernel void combine(__global const float *part_o,   /* [n_splits, T, N_HEADS, HEAD_DIM] */
                      __global const float *part_ml,  /* [n_splits, T, N_HEADS, 2] */
                      __global float *out,            /* [T, Q_DIM] */
                      const int T, const int n_splits)
{
    const int c = get_global_id(0), head = get_global_id(1), t = get_global_id(2);
    vstore4(merge_splits(part_o, part_ml, T, n_splits, t, head, c), c, out + (size_t)t * Q_DIM + head * HEAD_DIM);
}

/* Decode on CPUs (att_serial): one new token at position pos, one work-item per KV head, no local
   memory and no barriers, so that PoCL runs a work-group as one plain loop. The work-item writes the
   token's K (roped) and V to the cache, then walks the keys in blocks of 16: the block's scores of
   its GROUP query rows (VW-wide dot products along the head), one max and one rescale per row and
   block, the probabilities as one 16-wide exp2, then p * V added into the rows' accumulators. The
   new key itself comes from qkv, as in `attend`. Same arithmetic units as `attend` (log2 scores,
   fp16-rounded new K and V with KV_HALF). Launch: global (N_KV_HEADS), local (1). */
#define KB 16

/* Scores of the rows against keys k[0..n) (k: n rows of HEAD_DIM at stride HEAD_DIM, or the one key
   k_new), then the online softmax update of each row over the block: m, l, the rows' accumulators
   rescaled, and the block's probabilities into p[g][0..KB) (0 past n); 1 <= n <= KB. */
inline void score_block(const floatV q[GROUP][DV], __global const kv_t *k, const floatV *k_new, const int n,
                        float m[GROUP], float l[GROUP], floatV acc[GROUP][DV], float p[GROUP][KB])
{
    for (int g = 0; g < GROUP; g++)
        for (int j = 0; j < KB; j++)
            p[g][j] = NEG;
    for (int j = 0; j < n; j++) {
        floatV kv[DV];
        for (int c = 0; c < DV; c++)
            kv[c] = k_new ? k_new[c] : KV_LOAD(c, k + (size_t)j * HEAD_DIM);
        for (int g = 0; g < GROUP; g++) {
            floatV d = q[g][0] * kv[0];
            for (int c = 1; c < DV; c++)
                d = mad(q[g][c], kv[c], d);
            p[g][j] = hsumV(d);
        }
    }
    for (int g = 0; g < GROUP; g++) {
        const float16 s = vload16(0, p[g]);
        const float m_new = fmax(m[g], hmax16(s));
        const float a = exp2(m[g] - m_new);
        const float16 e = exp2(s - m_new);
        l[g] = mad(l[g], a, hsum16(e));
        m[g] = m_new;
        for (int c = 0; c < DV; c++)
            acc[g][c] *= a;
        vstore16(e, 0, p[g]);
    }
}

__kernel void attend_one(__global const float *qkv,   /* [1, QKV_STRIDE] */
                         __global const float *rope,  /* [ctx, 2, HEAD_DIM] */
                         __global kv_t *k_cache,      /* [n_layers, N_KV_HEADS, ctx, HEAD_DIM] */
                         __global kv_t *v_cache,      /* [n_layers, N_KV_HEADS, ctx, HEAD_DIM] */
                         __global float *out,         /* [1, Q_DIM] */
                         const int pos, const int ctx, const int layer, const int window)
{
    const int kvh = get_global_id(0);
    const size_t head_base = ((size_t)layer * N_KV_HEADS + kvh) * (size_t)ctx * HEAD_DIM;
    __global kv_t *kc = k_cache + head_base;   /* [ctx, HEAD_DIM] */
    __global kv_t *vc = v_cache + head_base;
    __global const float *k_src = qkv + Q_DIM + kvh * HEAD_DIM;
    __global const float *v_src = k_src + KV_DIM;

    floatV k_new[DV], v_new[DV];
    for (int c = 0; c < DV; c++) {
        k_new[c] = kv_round(roped(k_src, c, rope, pos));
        v_new[c] = kv_round(vloadV(c, v_src));
        KV_STORE(k_new[c], c, kc + (size_t)pos * HEAD_DIM);
        KV_STORE(v_new[c], c, vc + (size_t)pos * HEAD_DIM);
    }
    const float qscale = M_LOG2E_F * ATT_SCALE;
    floatV q[GROUP][DV], acc[GROUP][DV];
    float m[GROUP], l[GROUP], p[GROUP][KB];
    for (int g = 0; g < GROUP; g++) {
        for (int c = 0; c < DV; c++) {
            q[g][c] = roped(qkv + (kvh * GROUP + g) * HEAD_DIM, c, rope, pos) * qscale;
            acc[g][c] = (floatV)(0.0f);
        }
        m[g] = NEG;
        l[g] = 0.0f;
    }
    /* The cached keys [0, pos) in blocks of KB, then the new key at pos as a block of one. */
    for (int j0 = window ? max(0, pos - window + 1) : 0; j0 < pos; j0 += KB) {
        const int n = min(KB, pos - j0);
        score_block(q, kc + (size_t)j0 * HEAD_DIM, 0, n, m, l, acc, p);
        for (int j = 0; j < n; j++)
            for (int c = 0; c < DV; c++) {
                const floatV v = KV_LOAD(c, vc + (size_t)(j0 + j) * HEAD_DIM);
                for (int g = 0; g < GROUP; g++)
                    acc[g][c] = mad((floatV)(p[g][j]), v, acc[g][c]);
            }
    }
    score_block(q, kc, k_new, 1, m, l, acc, p);
    for (int c = 0; c < DV; c++)
        for (int g = 0; g < GROUP; g++)
            acc[g][c] = mad((floatV)(p[g][0]), v_new[c], acc[g][c]);
    for (int g = 0; g < GROUP; g++)
        for (int c = 0; c < DV; c++)
            vstoreV(acc[g][c] / l[g], c, out + (kvh * GROUP + g) * HEAD_DIM);
}
