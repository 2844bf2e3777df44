#!/usr/bin/env bash
# A session on the lent H200 (recipe: ../shared/gpu/README.md; figures: docs/performance.md), run from the
# project root there with .gpu/ carried (the GPU wheels and llama.cpp's source) and results under $OUT:
#
#   bash scripts/h200.sh check [TOK.gguf] [SMOL.gguf]
#       starts llama.cpp's CUDA build in the background, installs perfx, runs the GPU tests (the PTX
#       kernels, the fused decode kernels, the SmolLM2 agreement tests on SMOL.gguf, a real model cut
#       short by scripts/truncate_gguf.py), writes the LLaMA-7B-shaped and SmolLM2-shaped files with
#       random Q4_0 weights and TOK.gguf's tokenizer, and the 7B file's launch budget (perfx bench --profile)
#   bash scripts/h200.sh ab
#       the decode options of the NVIDIA entry against the shipped settings (scripts/decode_ab.py), and the
#       dot-product GEMV against the float one (scripts/gemv_dp_bench.py)
#   bash scripts/h200.sh warp
#       the GEMV's warp layout (off in kernels/tuning.toml): its tests with the PTX reduction, its layouts
#       against the shipped GEMV with weights from DRAM (scripts/gemv_warp_bench.py), a 7B decode A/B
#   bash scripts/h200.sh prefill
#       the prefill GEMMs' options (off in kernels/tuning.toml): gemm_mma's pipeline (double-buffered stages,
#       half2 dequantization, ldmatrix) and the portable two-level tiled GEMM (gemm_reg), each tested with
#       the PTX paths, then checked against NumPy and timed on the 7B prefill's products
#   bash scripts/h200.sh compare
#       waits for llama.cpp's build, then perfx bench --vs llama.cpp on both files, alternating
#
# The steps run as calls within one lease (the machine keeps /tmp while it is held).
set -u
export PYTHONUNBUFFERED=1 PERFX_HOME=/tmp/perfx
out=${OUT:-/tmp/out}
mkdir -p "$out"
models=/tmp/l7b.gguf,/tmp/s135.gguf
case "${1:-}" in
check)
  tok=${2:-tok.gguf} smol=${3:-}
  bash .gpu/llama-cpp-cuda.sh start
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv,noheader
  PERFX_TEST_CL_PLATFORM=nvidia timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cl_gemm_mma.py \
    tests/test_cl_attention_mma.py tests/test_cl_norm_in.py tests/test_cl_gemv_dp.py 2>&1 | tail -3
  PERFX_TEST_CL_PLATFORM=nvidia timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cl_fused.py \
    -k "key_lanes or key-lanes" 2>&1 | tail -1
  [ -n "$smol" ] && PERFX_TEST_GGUF=$smol timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cl_model.py \
    -k "smollm2 and not perplexity" 2>&1 | tail -1
  python3 -c "from perfx.engine.synthetic import write_gguf as w, get_shape as s
w(s('llama-7b'), '/tmp/l7b.gguf', '$tok'); w(s('smollm2-135m'), '/tmp/s135.gguf', '$tok')"
  timeout 120 python3 -m perfx.cli bench -m /tmp/l7b.gguf --device gpu -p 512 -n 16 -r 1 --profile 2>&1 | tee "$out/profile.md"
  ;;
ab)
  # the decode options of the NVIDIA entry, each against the shipped settings, alternating; the dot-product GEMV
  timeout 240 python3 scripts/decode_ab.py /tmp/l7b.gguf "$out/decode_ab.json" --tokens 64 --rounds 3 --start 512 \
    --variant shipped: --variant launches:gemv_norm_in=false,split_combine=false \
    --variant lanes:att_key_lanes=1,split_min_chunk=128,split_wgs=0 \
    --variant dp:gemv_dp=ptx,gemv_norm_in=false 2>&1 | tail -7 | tee "$out/decode_ab.md"
  timeout 200 python3 scripts/gemv_dp_bench.py --json "$out/gemv_dp.json" \
    --grid "dp_vec=4,8;dp_ksplit=32;dp_wg_rows=2,4;dp_tpw=1" 2>&1 | tee "$out/gemv_dp.md" | tail -16
  ;;
warp)
  PERFX_TEST_CL_PLATFORM=nvidia timeout 400 python3 -m pytest -q -p no:cacheprovider tests/test_cl_gemv_warp.py \
    tests/test_cl_gemv_dp.py 2>&1 | tail -3
  timeout 400 python3 scripts/gemv_warp_bench.py --json "$out/gemv_warp.json" 2>&1 | tee "$out/gemv_warp.md" | tail -12
  timeout 300 python3 scripts/decode_ab.py /tmp/l7b.gguf "$out/decode_warp.json" --tokens 64 --rounds 3 \
    --variant shipped: --variant warp:gemv_ksplit=32,gemv_wg_rows=4,gemv_prefetch=4,gemv_reduce=shfl \
    --variant warp_once:gemv_ksplit=32,gemv_wg_rows=4,gemv_prefetch=4,gemv_reduce=once \
    --variant warp_waves:gemv_ksplit=32,gemv_wg_rows=4,gemv_prefetch=4,gemv_reduce=shfl,gemv_waves=4 \
    2>&1 | tail -6 | tee "$out/decode_warp.md"
  ;;
prefill)
  PERFX_TEST_CL_PLATFORM=nvidia timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_cl_gemm_mma.py -k ptx \
    tests/test_cl_gemm_reg.py 2>&1 | tail -3
  timeout 400 python3 scripts/gpu_sweep.py --parts mma2 --out "$out/mma2.json" 2>&1 | tee "$out/mma2.md" | tail -20
  timeout 300 python3 scripts/gemm_reg_sweep.py --out "$out/gemm_reg.json" --platform nvidia 2>&1 \
    | tee "$out/gemm_reg.md" | tail -12
  ;;
compare)
  bash .gpu/llama-cpp-cuda.sh wait || exit 1
  timeout 540 python3 -m perfx.cli bench -m $models --device gpu -p 512 -n 128 -r 3 --vs llama.cpp \
    --llama-bench "$PWD/.gpu/llama-bench" 2>&1 | tee "$out/vs.md"
  ;;
*) echo "usage: $0 check [TOK.gguf] [SMOL.gguf] | ab | warp | prefill | compare"; exit 2;;
esac
