#!/usr/bin/env bash
# The closing run on the lent H200, from the project root there (this tree in .gpuwt/, llama.cpp's source
# in .gpu/): PTX and model tests, the mma tile sweep, the GEMM table, the launch profile, then
# perfx bench --vs llama.cpp --llama-bench on the 7B-shaped and SmolLM2-shaped files.
set -u
root=$PWD
bash .gpu/llama-cpp-cuda.sh start
cd .gpuwt
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1
export PYTHONUNBUFFERED=1 PERFX_HOME=/tmp/perfx
PERFX_TEST_CL_PLATFORM=nvidia timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_cl_gemm_mma.py 2>&1 | tail -3
PERFX_TEST_GGUF=$PWD/smol.gguf timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_cl_model.py -k "smollm2 and not perplexity" 2>&1 | tail -3
timeout 150 python3 scripts/gpu_sweep.py --parts mma --write 2>&1 | tee "$OUT/sweep.md"
timeout 150 python3 scripts/gemm_chart.py measure --out "$OUT/gemm.json" > "$OUT/gemm.md" 2>&1
python3 -c "from perfx.engine.synthetic import write_gguf as w, get_shape as s; w(s('llama-7b'), '/tmp/l7b.gguf', 'tok.gguf'); w(s('smollm2-135m'), '/tmp/s135.gguf', 'tok.gguf')"
timeout 120 python3 scripts/gpu_profile.py /tmp/l7b.gguf --prompt 512 --steps 16 > "$OUT/profile.md" 2>&1
grep -A12 "^## prefill" "$OUT/profile.md" | head -8
bash "$root/.gpu/llama-cpp-cuda.sh" wait >/dev/null 2>&1 || (cd "$root" && bash .gpu/llama-cpp-cuda.sh wait)
timeout 300 perfx bench -m /tmp/l7b.gguf,/tmp/s135.gguf --device gpu -p 512 -n 128 -r 3 --vs llama.cpp \
  --llama-bench "$root/.gpu/llama-bench" 2>&1 | tee "$OUT/vs.md"
