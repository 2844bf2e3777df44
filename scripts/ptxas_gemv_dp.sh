#!/bin/sh
# Assembles kernels/gemv_dp.cl's PTX path (DP_PTX 1: prmt.b32 and dp2a by inline PTX) for sm_90 without a
# GPU (scripts/ptxas_cl.sh) and counts the instructions put in: one unrolled piece of DPIECE is 4 rows x
# 4 words x (2 prmt + 4 dp2a).
#     scripts/ptxas_gemv_dp.sh [-DVEC=4 -DG=32 -DKSPLIT=32 -DWG_ROWS=4 -DTPW=1 -DSWIGLU ...]
set -eu
# shellcheck disable=SC2086
exec "$(dirname "$0")/ptxas_cl.sh" gemv_dp.cl "dp2a prmt.b32 shfl.sync" -DFORMAT=4 -DDP_PTX=1 \
    ${*:--DVEC=4 -DG=32 -DKSPLIT=32 -DWG_ROWS=4 -DTPW=1}
