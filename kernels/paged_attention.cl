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
   takes one tile and one KV head and runs the steps of attention_common.h (as attention.cl does)
   over keys 0 .. p0 + nq - 1 of the sequence (p0: the tile's first position, nq its tokens), ATT_WG
   at a time: its ROWS = QT * GROUP query rows share every K and V load. In step 1 work-item j looks
   up the block of key b + j, and keeps the block id in local memory for step 3.

   Buffers (qkv, rope, out: attention_common.h):
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

   Launch kv_write:     global (DV, N_KV_HEADS, T), any local size.
   Launch paged_attend: global (ATT_WG * n_tiles, N_KV_HEADS), local (ATT_WG, 1), for the n_tiles tiles
                        starting at tile_off (the host launches once per tile size QT).

   Bytes a decode step moves (one token per sequence, each layer, context length L of a sequence,
   kv = 4 or 2 with KV_HALF): every (sequence, kv head) work-group reads the sequence's K and V once,
   2 * L * N_KV_HEADS * HEAD_DIM * kv bytes per sequence, shared by its GROUP query heads; plus its
   block ids (L / BLOCK_SIZE ints), Q and the output (2 * N_HEADS * HEAD_DIM * 4) and kv_write's
   read of K and V (2 * N_KV_HEADS * HEAD_DIM * 4) and store (2 * N_KV_HEADS * HEAD_DIM * kv).

   Model defines and tunables: attention_common.h's (HEAD_DIM, N_KV_HEADS, GROUP, ATT_SCALE; QT, VW,
   ATT_WG), and BLOCK_SIZE (positions per block). Option: KV_HALF (fp16 pool). */

#ifndef BLOCK_SIZE
#define BLOCK_SIZE 16
#endif
#include "attention_common.h"

#define HEAD_BLOCK (BLOCK_SIZE * HEAD_DIM)          /* elements of one (block, kv head) */
#define POOL_BLOCK (N_KV_HEADS * HEAD_BLOCK)        /* elements of one block of one layer */

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

__kernel __attribute__((reqd_work_group_size(ATT_WG, 1, 1)))
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
    __local float p_loc[ROWS * ATT_WG];  /* [ROWS, ATT_WG] scores of ATT_WG keys, then probabilities */
    __local float m_loc[ROWS];           /* running max of each row (log2 units) */
    __local float l_loc[ROWS];           /* running sum of probabilities of each row */
    __local float a_loc[ROWS];           /* rescale factor of the current keys */
    __local int blk_loc[ATT_WG];         /* physical block of each of the current keys */
    __local floatV red[ATT_WG];          /* [KEY_GROUPS, HEAD_DIM] final reduction of one row */

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

    load_queries(q_loc, m_loc, l_loc, qkv, rope, t0, nq, p0, kvh);
    barrier(CLK_LOCAL_MEM_FENCE);

    const int c = lid % DV, kg = lid / DV;
    floatV acc[ROWS];
    clear_rows(acc);

    for (int b = 0; b < kend; b += ATT_WG) {
        const int nk = min(ATT_WG, kend - b);

        /* 1. scores of key b + lid against every row, its block looked up */
        {
            const int pos = b + lid;
            floatV sv[ROWS];
            clear_rows(sv);
            if (lid < nk) {
                const int block = blocks[pos / BLOCK_SIZE];
                blk_loc[lid] = block;
                __global const kv_t *kr = kl + at(block, pos % BLOCK_SIZE);
                for (int cc = 0; cc < DV; cc++)
                    add_scores(sv, q_loc, cc, KV_LOAD(cc, kr));
            }
            store_scores(p_loc, sv, nk, pos, p0, 0);
        }
        barrier(CLK_LOCAL_MEM_FENCE);

        softmax_block(p_loc, m_loc, l_loc, a_loc);                 /* 2. */
        barrier(CLK_LOCAL_MEM_FENCE);

        /* 3. acc = acc * a + P V over keys kg, kg + KEY_GROUPS, ... of these ATT_WG */
        rescale(acc, a_loc);
        for (int j = kg; j < nk; j += KEY_GROUPS)
            add_values(acc, p_loc, j, KV_LOAD(c, vl + at(blk_loc[j], (b + j) % BLOCK_SIZE)));
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    write_rows(acc, red, m_loc, l_loc, t0, nq, kvh, out, out, out, T, 0, 0);    /* normalised, into out */
}
