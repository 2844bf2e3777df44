/* Attention over a paged KV cache: one step of a batch of sequences that share a pool of blocks
   (engine/paged.py). Two kernels, launched in this order on an in-order queue:

     kv_write       K of the step's tokens roped at their positions, K and V stored into their
                    sequences' blocks;
     paged_attend   causal attention of the step's tokens over their own sequence's positions
                    0..pos, all read from the pool (this step's tokens included, written by kv_write
                    before this kernel starts).

   Position p of the sequence in table row s lives in block table[s, p / BLOCK_SIZE], slot
   p % BLOCK_SIZE. A sequence's tokens in a step are consecutive positions, so the host cuts the step
   into tiles: runs of at most QT consecutive tokens of one sequence. A work-group of paged_attend
   takes one tile and one KV head; its ROWS = QT * GROUP query rows (row r: token r / GROUP of the
   tile, query head kv_head * GROUP + r % GROUP) share every K and V load. Keys 0 .. p0 + nq - 1 of
   the sequence (p0: the tile's first position, nq its tokens) are visited WG at a time:
     1. scores: work-item j looks up the block of key b + j and computes its VW-wide dot products
        with every row; the block id is kept in local memory for step 3;
     2. online softmax, one row per work-item: running max m and sum l, p = 2^(s - m), rescale
        factor 2^(m_old - m);
     3. values: work-item (kg, c) = (lid / DV, lid % DV), DV = HEAD_DIM / VW, accumulates p * V over
        keys kg, kg + KEY_GROUPS, ... for values VW*c .. VW*c + VW-1 of every row;
   then the KEY_GROUPS partial accumulators are summed through local memory. As in attention.cl,
   scores are in log2 units (Q pre-scaled by log2(e) / sqrt(HEAD_DIM)), masked scores are a finite
   -1e30 (the build uses -cl-fast-relaxed-math), and RoPE reads fused.py's table:
   roped(x) = x * rope[pos, 0] + swap_pairs(x) * rope[pos, 1].

   Buffers:
     qkv     [T, QKV_STRIDE] f32         per token: Q heads, K heads, V heads;
                                          QKV_STRIDE = (N_HEADS + 2 * N_KV_HEADS) * HEAD_DIM
     rope    [ctx, 2, HEAD_DIM] f32       cos and signed sin per position (fused.py rope_table)
     k_pool  [n_layers, n_blocks, N_KV_HEADS, BLOCK_SIZE, HEAD_DIM] f32, or fp16 with KV_HALF;
                                          K stored roped. One (layer, block, kv head) is a
                                          contiguous [BLOCK_SIZE, HEAD_DIM] matrix.
     v_pool  same shape and type as k_pool
     meta    int32, written by the host once per step:
               [0, T)                     pos: position of each token in its sequence
               [T, 2T)                    row: the token's row of the step's block table
               [tile_off + 2i, +1]        tile i: first token, token count (1..QT)
               [table_off, + rows * table_stride)  the step's block table, rows of table_stride
                                          physical block ids (only the blocks of positions
                                          0..pos of each token are read)
     out     [T, N_HEADS * HEAD_DIM] f32  attention output

   Launch kv_write:     global (DV, N_KV_HEADS, T), any local size.
   Launch paged_attend: global (WG * n_tiles, N_KV_HEADS), local (WG, 1), for the n_tiles tiles
                        starting at tile_off (the host launches once per tile size QT).

   Bytes a decode step moves (one token per sequence, each layer, context length L of a sequence,
   kv = 4 or 2 with KV_HALF): every (sequence, kv head) work-group reads the sequence's K and V once,
   2 * L * N_KV_HEADS * HEAD_DIM * kv bytes per sequence, shared by its GROUP query heads; plus its
   block ids (L / BLOCK_SIZE ints), Q and the output (2 * N_HEADS * HEAD_DIM * 4) and kv_write's
   read of K and V (2 * N_KV_HEADS * HEAD_DIM * 4) and store (2 * N_KV_HEADS * HEAD_DIM * kv).

   Model defines: HEAD_DIM (a multiple of VW), N_KV_HEADS, GROUP (query heads per KV head),
   BLOCK_SIZE (positions per block). Option: KV_HALF (fp16 pool through vload_half / vstore_half,
   core OpenCL). Tunables: QT (tokens per tile), VW (4, 8 or 16), WG (work-group size = keys per
   step; a multiple of VW and of HEAD_DIM / VW). */

#ifndef ATT_SCALE                  /* softmax scale of Q.K^T */
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
#ifndef BLOCK_SIZE
#define BLOCK_SIZE 16
#endif
#ifndef QT
#define QT 1
#endif
#ifndef WG
#define WG 64
#endif
#ifndef VW
#define VW 4
#endif

#define N_HEADS (GROUP * N_KV_HEADS)
#define Q_DIM (N_HEADS * HEAD_DIM)
#define KV_DIM (N_KV_HEADS * HEAD_DIM)
#define QKV_STRIDE (Q_DIM + 2 * KV_DIM)
#define ROWS (QT * GROUP)
#define DV (HEAD_DIM / VW)
#define KEY_GROUPS (WG / DV)
#define HEAD_BLOCK (BLOCK_SIZE * HEAD_DIM)          /* elements of one (block, kv head) */
#define POOL_BLOCK (N_KV_HEADS * HEAD_BLOCK)        /* elements of one block of one layer */
#define NEG (-1.0e30f)
#define VISIBLE (-1.0e29f)

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define floatV CAT(float, VW)
#define vloadV CAT(vload, VW)
#define vstoreV CAT(vstore, VW)

#if VW == 4
#define SWAP_PAIRS(x) ((x).s1032)
#define HSUM(v) (((v).s0 + (v).s1) + ((v).s2 + (v).s3))
#define HMAX(v) fmax(fmax((v).s0, (v).s1), fmax((v).s2, (v).s3))
#elif VW == 8
#define SWAP_PAIRS(x) ((x).s10325476)
#define HSUM(v) hsum4((v).lo + (v).hi)
#define HMAX(v) hmax4(fmax((v).lo, (v).hi))
#elif VW == 16
#define SWAP_PAIRS(x) ((x).s1032547698badcfe)
#define HSUM(v) hsum8((v).lo + (v).hi)
#define HMAX(v) hmax8(fmax((v).lo, (v).hi))
#else
#error "VW must be 4, 8 or 16"
#endif

inline float hsum4(const float4 v) { return (v.x + v.y) + (v.z + v.w); }
inline float hsum8(const float8 v) { return hsum4(v.lo + v.hi); }
inline float hmax4(const float4 v) { return fmax(fmax(v.x, v.y), fmax(v.z, v.w)); }
inline float hmax8(const float8 v) { return hmax4(fmax(v.lo, v.hi)); }

#ifdef KV_HALF
#define kv_t half
#define KV_LOAD(i, p) CAT(vload_half, VW)((i), (p))
#define KV_STORE(v, i, p) CAT(vstore_half, VW)((v), (i), (p))
#else
#define kv_t float
#define KV_LOAD(i, p) vloadV((i), (p))
#define KV_STORE(v, i, p) vstoreV((v), (i), (p))
#endif

/* Values VW*c .. VW*c + VW-1 of the head vector at src after RoPE at position pos. */
inline floatV roped(__global const float *src, const int c, __global const float *rope, const int pos)
{
    __global const float *row = rope + (size_t)pos * 2 * HEAD_DIM;
    const floatV x = vloadV(c, src);
    return mad(x, vloadV(c, row), SWAP_PAIRS(x) * vloadV(c, row + HEAD_DIM));
}

/* Element offset of slot `slot` of block `block` from the start of one (layer, kv head) in the pool. */
inline size_t at(const int block, const int slot)
{
    return (size_t)block * POOL_BLOCK + (size_t)slot * HEAD_DIM;
}

__kernel void kv_write(__global const float *qkv,  /* [T, QKV_STRIDE] */
                       __global const float *rope, /* [ctx, 2, HEAD_DIM] */
                       __global kv_t *k_pool,      /* [n_layers, n_blocks, N_KV_HEADS, BLOCK_SIZE, HEAD_DIM] */
                       __global kv_t *v_pool,
                       __global const int *meta,
                       const int T, const int layer, const int n_blocks,
                       const int table_off, const int table_stride)
{
    const int c = get_global_id(0), kvh = get_global_id(1), t = get_global_id(2);
    const int pos = meta[t], row = meta[T + t];
    const int block = meta[table_off + row * table_stride + pos / BLOCK_SIZE];
    const size_t dst = (size_t)layer * n_blocks * POOL_BLOCK + kvh * HEAD_BLOCK + at(block, pos % BLOCK_SIZE);
    __global const float *k = qkv + (size_t)t * QKV_STRIDE + Q_DIM + kvh * HEAD_DIM;
    KV_STORE(roped(k, c, rope, pos), c, k_pool + dst);
    KV_STORE(vloadV(c, k + KV_DIM), c, v_pool + dst);
}

__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void paged_attend(__global const float *qkv,     /* [T, QKV_STRIDE] */
                  __global const float *rope,    /* [ctx, 2, HEAD_DIM] */
                  __global const kv_t *k_pool,   /* [n_layers, n_blocks, N_KV_HEADS, BLOCK_SIZE, HEAD_DIM] */
                  __global const kv_t *v_pool,
                  __global const int *meta,
                  __global float *out,           /* [T, Q_DIM] */
                  const int T, const int layer, const int n_blocks,
                  const int tile_off, const int table_off, const int table_stride)
{
    __local floatV q_loc[ROWS * DV];     /* [ROWS, HEAD_DIM] roped, pre-scaled queries */
    __local float p_loc[ROWS * WG];      /* [ROWS, WG] scores of WG keys, then probabilities */
    __local float m_loc[ROWS];           /* running max of each row (log2 units) */
    __local float l_loc[ROWS];           /* running sum of probabilities of each row */
    __local float a_loc[ROWS];           /* rescale factor of the current keys */
    __local int blk_loc[WG];             /* physical block of each of the current keys */
    __local floatV red[WG];              /* [KEY_GROUPS, HEAD_DIM] final reduction of one row */

    const int lid = get_local_id(0);
    const int kvh = get_group_id(1);
    const int t0 = meta[tile_off + 2 * get_group_id(0)];
    const int nq = meta[tile_off + 2 * get_group_id(0) + 1];
    const int p0 = meta[t0];
    const int kend = p0 + nq;                 /* keys [0, kend) are visible to some row */
    __global const int *blocks = meta + table_off + meta[T + t0] * table_stride;
    const size_t head = (size_t)layer * n_blocks * POOL_BLOCK + kvh * HEAD_BLOCK;
    __global const kv_t *kl = k_pool + head;  /* + at(block, slot): one key */
    __global const kv_t *vl = v_pool + head;

    const float qscale = M_LOG2E_F * ATT_SCALE;
    for (int idx = lid; idx < ROWS * DV; idx += WG) {
        const int r = idx / DV, c = idx % DV, tq = r / GROUP, g = r % GROUP;
        floatV q = (floatV)(0.0f);
        if (tq < nq)
            q = roped(qkv + (size_t)(t0 + tq) * QKV_STRIDE + (kvh * GROUP + g) * HEAD_DIM, c, rope, p0 + tq);
        q_loc[idx] = q * qscale;
    }
    for (int r = lid; r < ROWS; r += WG) {
        m_loc[r] = NEG;
        l_loc[r] = 0.0f;
    }
    barrier(CLK_LOCAL_MEM_FENCE);

    const int c = lid % DV, kg = lid / DV;
    floatV acc[ROWS];
    for (int r = 0; r < ROWS; r++)
        acc[r] = (floatV)(0.0f);

    for (int b = 0; b < kend; b += WG) {
        const int nk = min(WG, kend - b);

        /* 1. scores of key b + lid against every row */
        {
            const int pos = b + lid;
            floatV sv[ROWS];
            for (int r = 0; r < ROWS; r++)
                sv[r] = (floatV)(0.0f);
            if (lid < nk) {
                const int block = blocks[pos / BLOCK_SIZE];
                blk_loc[lid] = block;
                __global const kv_t *kr = kl + at(block, pos % BLOCK_SIZE);
                for (int cc = 0; cc < DV; cc++) {
                    const floatV k = KV_LOAD(cc, kr);
                    for (int r = 0; r < ROWS; r++)
                        sv[r] = mad(q_loc[r * DV + cc], k, sv[r]);
                }
            }
            for (int r = 0; r < ROWS; r++) {
                const bool visible = lid < nk && pos <= p0 + r / GROUP;
                p_loc[r * WG + lid] = visible ? HSUM(sv[r]) : NEG;
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);

        /* 2. online softmax, one row per work-item */
        for (int r = lid; r < ROWS; r += WG) {
            __local float *pr = p_loc + r * WG;
            floatV mx = (floatV)(NEG);
            for (int j = 0; j < WG / VW; j++)
                mx = fmax(mx, vloadV(j, pr));
            const float m_old = m_loc[r];
            const float m_new = fmax(m_old, HMAX(mx));
            floatV sum = (floatV)(0.0f);
            for (int j = 0; j < WG / VW; j++) {
                const floatV s = vloadV(j, pr);
                const floatV p = select((floatV)(0.0f), exp2(s - m_new), s > (floatV)(VISIBLE));
                vstoreV(p, j, pr);
                sum += p;
            }
            const float a = exp2(m_old - m_new);
            a_loc[r] = a;
            m_loc[r] = m_new;
            l_loc[r] = mad(l_loc[r], a, HSUM(sum));
        }
        barrier(CLK_LOCAL_MEM_FENCE);

        /* 3. acc = acc * a + P V over keys kg, kg + KEY_GROUPS, ... of these WG */
        for (int r = 0; r < ROWS; r++)
            acc[r] *= a_loc[r];
        for (int j = kg; j < nk; j += KEY_GROUPS) {
            const floatV v = KV_LOAD(c, vl + at(blk_loc[j], (b + j) % BLOCK_SIZE));
            for (int r = 0; r < ROWS; r++)
                acc[r] = mad((floatV)(p_loc[r * WG + j]), v, acc[r]);
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }

    /* Sum the key groups' accumulators and write each real row. */
    for (int r = 0; r < ROWS; r++) {
        red[lid] = acc[r];
        barrier(CLK_LOCAL_MEM_FENCE);
        if (kg == 0 && r / GROUP < nq) {
            floatV o = red[c];
            for (int k = 1; k < KEY_GROUPS; k++)
                o += red[k * DV + c];
            const int t = t0 + r / GROUP, h = kvh * GROUP + r % GROUP;
            vstoreV(o / l_loc[r], c, out + (size_t)t * Q_DIM + h * HEAD_DIM);
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
}
