#!/bin/sh
# Assembles kernels/gemv.cl in the warp layout with its shfl.sync reduction (gemv_reduce "shfl": LANE_SHFL,
# LANE_PTX 1, kernels/lane_xor.h) for sm_90 without a GPU (scripts/ptxas_cl.sh), and counts the
# shfl.sync (4 rows, or 8 with SWIGLU, x log2(32)) and the calls of vload4 on the weight words (the
# builtins stay calls here: RT x PREFETCH per tile in the 128-chunk walk, then RT per tail chunk).
#     scripts/ptxas_gemv_warp.sh [-DVEC=4 -DG=32 -DKSPLIT=32 -DWG_ROWS=4 -DTPW=1 -DPREFETCH=4 -DSWIGLU ...]
set -eu
# shellcheck disable=SC2086
exec "$(dirname "$0")/ptxas_cl.sh" gemv.cl "shfl.sync _Z6vload4mPU3AS1Kj" -DFORMAT=4 \
    -DLANE_SHFL -DLANE_PTX=1 -DZERO_INLINE -DUSE_IMAGE \
    ${*:--DVEC=4 -DG=32 -DKSPLIT=32 -DWG_ROWS=4 -DTPW=1 -DPREFETCH=4}
