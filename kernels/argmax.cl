/* Greedy decoding: the index of the largest logit, as one int32, in two stages.

   Ties go to the smallest index (numpy.argmax's rule). NaN logits are never chosen.

   Stage 1, argmax_partial: ARGMAX_GROUPS work-groups of ARGMAX_WG work-items. Work-item g
   (global id) reads float4 number g, g + G, g + 2G, ... (G = the global size, so neighbouring
   work-items read neighbouring memory), then the work-group reduces in local memory.
     logits   [n]              f32
     part_val [ARGMAX_GROUPS]  f32    out: best value of each work-group
     part_idx [ARGMAX_GROUPS]  int32  out: its index (INT_MAX when the group saw nothing)
   Launch: global (ARGMAX_WG * ARGMAX_GROUPS), local (ARGMAX_WG).

   Stage 2, argmax_final: one work-group of ARGMAX_WG reduces the partials.
     out [1] int32
   Launch: global (ARGMAX_WG), local (ARGMAX_WG).

   Tunables: ARGMAX_WG (a power of two), ARGMAX_GROUPS. */

#ifndef ARGMAX_WG
#error "ARGMAX_WG: its default is declared in engine/backends/opencl/specs.py"
#endif
#ifndef ARGMAX_GROUPS
#error "ARGMAX_GROUPS: its default is declared in engine/backends/opencl/specs.py"
#endif

#define EMPTY_VAL (-MAXFLOAT)
#define EMPTY_IDX INT_MAX

/* Fold candidate (v, i) into the best (bv, bi). */
inline void take(float v, int i, float *bv, int *bi)
{
    if (v > *bv || (v == *bv && i < *bi)) {
        *bv = v;
        *bi = i;
    }
}

/* Reduce (bv, bi) over the work-group; the winner ends in sv[0], si[0]. */
inline void wg_argmax(float bv, int bi, __local float *sv, __local int *si)
{
    const int lid = get_local_id(0);
    sv[lid] = bv;
    si[lid] = bi;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int half_n = ARGMAX_WG / 2; half_n > 0; half_n >>= 1) {
        if (lid < half_n) {
            float v = sv[lid];
            int i = si[lid];
            take(sv[lid + half_n], si[lid + half_n], &v, &i);
            sv[lid] = v;
            si[lid] = i;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
}

__kernel __attribute__((reqd_work_group_size(ARGMAX_WG, 1, 1)))
void argmax_partial(__global const float *logits, const int n, __global float *part_val,
                    __global int *part_idx)
{
    __local float sv[ARGMAX_WG];
    __local int si[ARGMAX_WG];
    const int gid = get_global_id(0);
    const int gsize = get_global_size(0);
    const int n4 = n >> 2;

    float bv = EMPTY_VAL;
    int bi = EMPTY_IDX;
    for (int i = gid; i < n4; i += gsize) {
        const float4 v = vload4(i, logits);
        /* Indices grow along this loop, so strict comparisons keep the first of equal values. */
        if (v.x > bv) { bv = v.x; bi = 4 * i; }
        if (v.y > bv) { bv = v.y; bi = 4 * i + 1; }
        if (v.z > bv) { bv = v.z; bi = 4 * i + 2; }
        if (v.w > bv) { bv = v.w; bi = 4 * i + 3; }
    }
    const int tail = 4 * n4 + gid;
    if (tail < n)
        take(logits[tail], tail, &bv, &bi);

    wg_argmax(bv, bi, sv, si);
    if (get_local_id(0) == 0) {
        part_val[get_group_id(0)] = sv[0];
        part_idx[get_group_id(0)] = si[0];
    }
}

__kernel __attribute__((reqd_work_group_size(ARGMAX_WG, 1, 1)))
void argmax_final(__global const float *part_val, __global const int *part_idx,
                  __global int *out)
{
    __local float sv[ARGMAX_WG];
    __local int si[ARGMAX_WG];
    const int lid = get_local_id(0);

    float bv = EMPTY_VAL;
    int bi = EMPTY_IDX;
    for (int g = lid; g < ARGMAX_GROUPS; g += ARGMAX_WG)
        take(part_val[g], part_idx[g], &bv, &bi);

    wg_argmax(bv, bi, sv, si);
    if (lid == 0)
        out[0] = si[0] == EMPTY_IDX ? 0 : si[0];
}
