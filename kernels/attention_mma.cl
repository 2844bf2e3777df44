/* Prefill attention on matrix units (flash attention with mma.sync.m16n8k16: fp16 operands, f32
   accumulators, NVIDIA inline PTX, sm_80 and later). Same inputs, outputs and rules as `attend` in
   attention.cl (read its header): RoPE from the host's table, the new tokens' K (roped) and V written
   to the cache by exactly one work-group (the one whose query tile holds them; keys at positions >=
   start_pos come from qkv, earlier ones from the cache), the causal mask, the sliding window, scores in
   log2 units (Q pre-scaled by log2(e) * ATT_SCALE). No split-KV: it serves prefill passes.

   A work-group takes one KV head and QT = ROWS / GROUP consecutive new tokens: ROWS = 16 * WARPS query
   rows (row r: token r / GROUP, query head kv_head * GROUP + r % GROUP; rows past QT * GROUP are
   empty), 16 rows per warp (32 consecutive work-items). The roped, scaled queries are converted to fp16
   and staged once in local memory, from which each warp loads its A fragments into registers. Keys are
   visited in blocks of BK: the block's K rows (roped where new) go to local memory as fp16 [BK][LDK],
   its V rows transposed as fp16 [HEAD_DIM][LDV] (the column operand of P.V). Then each warp:
     1. S = Q K^T: BK / 8 fragments of 16 rows x 8 keys (HEAD_DIM / 16 instructions each);
     2. the causal / window mask and an online softmax on the fragments in registers: a row's max and
        sum come from the 4 lanes of a quad (shfl.sync.bfly), P = 2^(S - m) in f32;
     3. O = O * 2^(m_old - m) + P V: P converted to fp16 is the A operand as it lies, since the D
        fragments of two neighbouring key fragments are the A fragment of their 16 keys;
   and at the end divides O by the row sums and writes the tile's rows.

   Fragments: mma_sync.h (its d0..d3 are c0..c3 here). Hence S fragments j = 2kk, 2kk+1 give P's A
   fragment kk: a0 = (s[2kk].c0, s[2kk].c1), a1 = (s[2kk].c2, c3), a2 = (s[2kk+1].c0, c1),
   a3 = (s[2kk+1].c2, c3).

   MMA = 0 replaces the two PTX instructions by ordinary arithmetic on the same per-lane fragments
   (each lane's registers exchanged through local memory, with barriers), so that CPUs (PoCL) check the
   fragment layouts, the staging, the softmax and the epilogue: everything but the instructions.

   Buffers: as attend (qkv [T, QKV_STRIDE], rope [ctx, 2, HEAD_DIM], k_cache / v_cache [n_layers,
   N_KV_HEADS, ctx, HEAD_DIM] f32 or fp16 with KV_HALF, out [T, N_HEADS * HEAD_DIM]).
   Launch: global (32 * WARPS * N_KV_HEADS, ceil(T / QT)), local (32 * WARPS, 1).
   Model defines: HEAD_DIM (a multiple of 16), N_KV_HEADS, GROUP (<= ROWS), ATT_SCALE, KV_HALF.
   Tunables: WARPS (16 query rows each), BK (keys per block, a multiple of 16).
   Local memory: 2 * (max(ROWS, BK) * LDK + HEAD_DIM * LDV) bytes (HEAD_DIM 128, WARPS 4, BK 64:
   35 KB; NVIDIA's OpenCL allows 48 KB), plus 28 bytes per work-item for the exchange when MMA = 0. */

#ifndef ATT_SCALE
#define ATT_SCALE rsqrt((float)HEAD_DIM)
#endif
#ifndef WARPS
#error "WARPS: its default is declared in engine/backends/opencl/specs.py"
#endif
#ifndef BK
#error "BK: its default is declared in engine/backends/opencl/specs.py"
#endif
#ifndef MMA
#define MMA 1
#endif

#define N_HEADS (GROUP * N_KV_HEADS)
#define Q_DIM (N_HEADS * HEAD_DIM)
#define KV_DIM (N_KV_HEADS * HEAD_DIM)
#define QKV_STRIDE (Q_DIM + 2 * KV_DIM)
#define NWI (32 * WARPS)
#define ROWS (16 * WARPS)
#define QT (ROWS / GROUP)                 /* query tokens per work-group */
#define LDK (HEAD_DIM + 8)                /* halves per local K (and Q) row */
#define LDV (BK + 8)                      /* halves per local V^T row */
#define KROWS (ROWS > BK ? ROWS : BK)     /* rows of the K buffer, which first holds Q */
#define KD (HEAD_DIM / 16)                /* k-steps of S = Q K^T */
#define NS (BK / 8)                       /* S fragments per block */
#define NO (HEAD_DIM / 8)                 /* O fragments */
#define NEG (-1.0e30f)
#define VISIBLE (-1.0e29f)

#if HEAD_DIM % 16 || BK % 16 || GROUP > ROWS
#error "attention_mma: HEAD_DIM and BK must be multiples of 16 and GROUP at most 16 * WARPS"
#endif

#ifdef KV_HALF
#define kv_t half
#define KV_LOAD2(p) vload_half2(0, (p))
#define KV_STORE2(v, p) vstore_half2_rte((v), 0, (p))
#else
#define kv_t float
#define KV_LOAD2(p) vload2(0, (p))
#define KV_STORE2(v, p) vstore2((v), 0, (p))
#endif

/* Dimensions d, d + 1 (d even) of a head vector at position pos after RoPE:
   x * cos + swap_pairs(x) * signed sin, from the table row of pos (attention.cl's `roped`). */
inline float2 roped2(__global const float *src, const int d, __global const float *rope, const int pos)
{
    __global const float *row = rope + (size_t)pos * 2 * HEAD_DIM + d;
    const float2 x = vload2(0, src + d);
    return mad(x, vload2(0, row), x.yx * vload2(0, row + HEAD_DIM));
}

/* (x, y) as an fp16 pair in one register: x in the low half. */
inline uint pack_half2(const float x, const float y)
{
    uint u;
    vstore_half2_rte((float2)(x, y), 0, (__private half *)&u);
    return u;
}

#include "mma_sync.h"

#if MMA
#define UNROLL _Pragma("unroll")          /* fragment loops into registers (not with the emulation's barriers) */
#define SHFL_XOR(v, mask) shfl_xor((v), (mask))

/* v of the lane whose index differs from this one's by the bits of mask. */
inline float shfl_xor(const float v, const int mask)
{
    uint r;
    asm volatile("shfl.sync.bfly.b32 %0, %1, %2, 0x1f, 0xffffffff;" : "=r"(r) : "r"(as_uint(v)), "r"(mask));
    return as_float(r);
}
#else
#define UNROLL
#define SHFL_XOR(v, mask) shfl_emulated((v), (mask), xs, lid)

inline float shfl_emulated(const float v, const int mask, __local float *xs, const int lid)
{
    xs[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    const float r = xs[lid ^ mask];
    barrier(CLK_LOCAL_MEM_FENCE);
    return r;
}
#endif

__kernel __attribute__((reqd_work_group_size(NWI, 1, 1)))
void attend_mma(__global const float *qkv,   /* [T, QKV_STRIDE] */
                __global const float *rope,  /* [ctx, 2, HEAD_DIM] */
                __global kv_t *k_cache,      /* [n_layers, N_KV_HEADS, ctx, HEAD_DIM] */
                __global kv_t *v_cache,      /* [n_layers, N_KV_HEADS, ctx, HEAD_DIM] */
                __global float *out,         /* [T, Q_DIM] */
                const int T, const int start_pos, const int ctx, const int layer,
                const int window)            /* sliding window, 0: none */
{
    __local uint Kw[KROWS * LDK / 2];        /* Q [ROWS][LDK], then each block's K [BK][LDK], fp16 */
    __local uint Vw[HEAD_DIM * LDV / 2];     /* V^T [HEAD_DIM][LDV] of each block, fp16 */
    __local half *Kh = (__local half *)Kw;
    __local half *Vh = (__local half *)Vw;
#if !MMA
    __local uint xa[4 * NWI], xb[2 * NWI];   /* the warps' A and B registers */
    __local float xs[NWI];                   /* the values being shuffled */
#endif

    const int lid = get_local_id(0), lane = lid & 31, warp = lid >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int kvh = get_group_id(0);
    const int t0 = (get_num_groups(1) - 1 - get_group_id(1)) * QT;   /* the longest tiles (last tokens) first */
    const int nq = min(QT, T - t0);          /* real tokens in this tile */
    const int p0 = start_pos + t0;           /* position of the tile's first token */
    const int kend = p0 + nq;                /* keys [0, kend) are visible to some row */

    const size_t head_base = ((size_t)layer * N_KV_HEADS + kvh) * (size_t)ctx * HEAD_DIM;
    __global kv_t *kc = k_cache + head_base; /* [ctx, HEAD_DIM] */
    __global kv_t *vc = v_cache + head_base;
    __global const float *k_new = qkv + Q_DIM + kvh * HEAD_DIM;  /* token t at t * QKV_STRIDE */
    __global const float *v_new = k_new + KV_DIM;

    /* The tile's own new tokens go to the cache. */
    for (int i = lid; i < nq * HEAD_DIM / 2; i += NWI) {
        const int pos = p0 + i / (HEAD_DIM / 2), d = i % (HEAD_DIM / 2) * 2;
        const size_t src = (size_t)(pos - start_pos) * QKV_STRIDE;
        KV_STORE2(roped2(k_new + src, d, rope, pos), kc + (size_t)pos * HEAD_DIM + d);
        KV_STORE2(vload2(0, v_new + src + d), vc + (size_t)pos * HEAD_DIM + d);
    }

    /* Q of the tile, roped and scaled, as fp16 in Kw; then each warp's A fragments. */
    const float qscale = M_LOG2E_F * ATT_SCALE;
    for (int i = lid; i < ROWS * HEAD_DIM / 2; i += NWI) {
        const int r = i / (HEAD_DIM / 2), d = i % (HEAD_DIM / 2) * 2, tq = r / GROUP;
        float2 v = (float2)(0.0f);
        if (tq < nq && r < QT * GROUP)
            v = roped2(qkv + (size_t)(t0 + tq) * QKV_STRIDE + (kvh * GROUP + r % GROUP) * HEAD_DIM, d, rope,
                       p0 + tq) * qscale;
        vstore_half2_rte(v, 0, Kh + r * LDK + d);
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    uint qa[KD][4];
    UNROLL for (int kd = 0; kd < KD; kd++) {
        const int a = (warp * 16 + g) * (LDK / 2) + kd * 8 + q;
        qa[kd][0] = Kw[a];
        qa[kd][1] = Kw[a + 8 * (LDK / 2)];
        qa[kd][2] = Kw[a + 4];
        qa[kd][3] = Kw[a + 8 * (LDK / 2) + 4];
    }

    /* This lane's two rows (g and g + 8 of the warp): their positions, -1 for an empty row. */
    int qpos[2];
    UNROLL for (int h = 0; h < 2; h++) {
        const int r = warp * 16 + g + 8 * h, tq = r / GROUP;
        qpos[h] = tq < nq && r < QT * GROUP ? p0 + tq : -1;
    }
    float m[2] = {NEG, NEG}, l[2] = {0.0f, 0.0f};   /* running max (log2 units), this lane's part of the sum */
    float o[NO][4];
    UNROLL for (int n = 0; n < NO; n++)
        UNROLL for (int e = 0; e < 4; e++)
            o[n][e] = 0.0f;

    const int kstart = window ? max(0, p0 - window + 1) : 0;   /* the first key a row of the tile sees */
    for (int b = kstart; b < kend; b += BK) {
        barrier(CLK_LOCAL_MEM_FENCE);                           /* the previous block (or Q) is read */
        /* K [BK][HEAD_DIM] and V^T [HEAD_DIM][BK] of keys b .. b + BK - 1 as fp16; zeros past kend. */
        for (int i = lid; i < BK * HEAD_DIM / 2; i += NWI) {
            const int j = i / (HEAD_DIM / 2), d = i % (HEAD_DIM / 2) * 2, pos = b + j;
            float2 k = (float2)(0.0f);
            if (pos < start_pos)
                k = KV_LOAD2(kc + (size_t)pos * HEAD_DIM + d);
            else if (pos < kend)
                k = roped2(k_new + (size_t)(pos - start_pos) * QKV_STRIDE, d, rope, pos);
            vstore_half2_rte(k, 0, Kh + j * LDK + d);
        }
        for (int i = lid; i < BK / 2 * HEAD_DIM / 2; i += NWI) {
            /* 32 consecutive items: 4 dimension pairs x 8 key pairs (32-byte pieces of global rows, a
               word per bank in local memory) */
            const int d = 2 * ((i >> 5) % (HEAD_DIM / 8) * 4 + (i & 3));
            const int j = 2 * ((i >> 5) / (HEAD_DIM / 8) * 8 + (i >> 2 & 7));
            float2 v[2];
            for (int u = 0; u < 2; u++) {
                const int pos = b + j + u;
                v[u] = pos < start_pos ? KV_LOAD2(vc + (size_t)pos * HEAD_DIM + d)
                     : pos < kend ? vload2(0, v_new + (size_t)(pos - start_pos) * QKV_STRIDE + d) : (float2)(0.0f);
            }
            vstore_half2_rte((float2)(v[0].x, v[1].x), 0, Vh + d * LDV + j);
            vstore_half2_rte((float2)(v[0].y, v[1].y), 0, Vh + (d + 1) * LDV + j);
        }
        barrier(CLK_LOCAL_MEM_FENCE);

        /* 1. S = Q K^T */
        float s[NS][4];
        UNROLL for (int j = 0; j < NS; j++) {
            UNROLL for (int e = 0; e < 4; e++)
                s[j][e] = 0.0f;
            UNROLL for (int kd = 0; kd < KD; kd++) {
                const int k = (j * 8 + g) * (LDK / 2) + kd * 8 + q;
                MMA_16816(s[j], qa[kd], Kw[k], Kw[k + 4]);
            }
        }

        /* 2. mask, row max over the quad, P = 2^(S - m) */
        float mx[2] = {NEG, NEG};
        UNROLL for (int j = 0; j < NS; j++)
            UNROLL for (int e = 0; e < 4; e++) {
                const int key = b + j * 8 + 2 * q + (e & 1), qp = qpos[e >> 1];
                const bool visible = key <= qp && (!window || key > qp - window);
                s[j][e] = visible ? s[j][e] : NEG;
                mx[e >> 1] = fmax(mx[e >> 1], s[j][e]);
            }
        float alpha[2];
        UNROLL for (int h = 0; h < 2; h++) {
            mx[h] = fmax(mx[h], SHFL_XOR(mx[h], 1));
            mx[h] = fmax(mx[h], SHFL_XOR(mx[h], 2));
            const float m_new = fmax(m[h], mx[h]);
            alpha[h] = exp2(m[h] - m_new);
            m[h] = m_new;
            l[h] *= alpha[h];
        }
        UNROLL for (int j = 0; j < NS; j++)
            UNROLL for (int e = 0; e < 4; e++) {
                const float p = s[j][e] > VISIBLE ? exp2(s[j][e] - m[e >> 1]) : 0.0f;
                l[e >> 1] += p;
                s[j][e] = p;
            }

        /* 3. O = O * alpha + P V, P's A fragments from the S fragments */
        UNROLL for (int n = 0; n < NO; n++)
            UNROLL for (int e = 0; e < 4; e++)
                o[n][e] *= alpha[e >> 1];
        UNROLL for (int kk = 0; kk < BK / 16; kk++) {
            const uint pa[4] = {pack_half2(s[2 * kk][0], s[2 * kk][1]), pack_half2(s[2 * kk][2], s[2 * kk][3]),
                                pack_half2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                pack_half2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            UNROLL for (int n = 0; n < NO; n++) {
                const int v = (n * 8 + g) * (LDV / 2) + kk * 8 + q;
                MMA_16816(o[n], pa, Vw[v], Vw[v + 4]);
            }
        }
    }

    /* The rows' sums over the quad; O / l of each real row. */
    UNROLL for (int h = 0; h < 2; h++) {
        l[h] += SHFL_XOR(l[h], 1);
        l[h] += SHFL_XOR(l[h], 2);
    }
    UNROLL for (int h = 0; h < 2; h++) {
        const int r = warp * 16 + g + 8 * h;
        if (qpos[h] < 0)
            continue;
        __global float *dst = out + (size_t)(t0 + r / GROUP) * Q_DIM + (kvh * GROUP + r % GROUP) * HEAD_DIM + 2 * q;
        const float inv = 1.0f / l[h];
        UNROLL for (int n = 0; n < NO; n++)
            vstore2((float2)(o[n][2 * h], o[n][2 * h + 1]) * inv, 0, dst + n * 8);
    }
}
