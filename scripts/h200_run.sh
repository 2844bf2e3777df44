#!/usr/bin/env bash
# One run on the lent H200 (kind nvidia-h200), from the project root there, this tree in .gpuwt/:
# PTX tests, the GEMM table, the 7B-shaped GGUF (random Q4_0, SmolLM2's tokenizer from .gpuwt/tok.gguf),
# perfx bench and the launch profile on it, then llama-bench (CUDA) on the same file.
# Start llama.cpp's build first: bash .gpu/llama-cpp-cuda.sh start (docs/performance.md, GPU section).
set -u
root=$PWD
cd .gpuwt
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1
export PYTHONUNBUFFERED=1 PERFX_HOME=/tmp/perfx
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv
PERFX_TEST_CL_PLATFORM=nvidia timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_cl_gemm_mma.py 2>&1 | tail -15
[ -f smol8.gguf ] && PERFX_TEST_GGUF=$PWD/smol8.gguf timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_cl_model.py -k "smollm2 and not perplexity" 2>&1 | tail -5
[ "${SKIP_GEMM:-0}" = 1 ] || timeout 300 python3 scripts/gemm_chart.py measure --out "$OUT/gemm.json" 2>&1 | tee "$OUT/gemm.md"
[ "${SWEEP:-1}" = 1 ] && timeout 300 python3 scripts/gpu_sweep.py --write 2>&1 | tee "$OUT/sweep.md"
time python3 -c "from perfx.engine.synthetic import write_gguf, get_shape; write_gguf(get_shape('llama-7b'), '/tmp/l7b.gguf', 'tok.gguf')"
timeout 200 perfx bench -m /tmp/l7b.gguf --device gpu -p 512 -n 128 -r 3 2>&1 | tee "$OUT/bench.md"
timeout 200 python3 scripts/gpu_profile.py /tmp/l7b.gguf --prompt 512 --steps 16 2>&1 | tee "$OUT/profile.md"
cd "$root"
if [ "${LLAMA:-1}" = 1 ]; then
  bash .gpu/llama-cpp-cuda.sh wait && .gpu/llama-bench -m /tmp/l7b.gguf -p 512 -n 128 -ngl 99 -fa 0,1 -r 3 2>&1 | tee "$OUT/llama.md"
fi
