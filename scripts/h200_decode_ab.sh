#!/usr/bin/env bash
# Issue 19's launch-removing options (gemv_norm_in, split_combine) on the lent H200 (kind nvidia-h200),
# from the project root there with this tree in .gpuwt/ and SmolLM2's tokenizer in .gpuwt/tok.gguf, as
# scripts/h200_run.sh: their kernel tests on the GPU; scripts/decode_ab.py (tokens/s median of 5
# alternating rounds, launches per token, each variant's decode logits and greedy tokens against the
# device's own settings) from position 0 (tg128) and from 512 (where attention splits); the launch
# profile with both options on. Figures and JSON go to $OUT.
set -u
cd .gpuwt
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1
export PYTHONUNBUFFERED=1 PERFX_HOME=/tmp/perfx
PERFX_TEST_CL_PLATFORM=nvidia timeout 400 python3 -m pytest -q -x -p no:cacheprovider tests/test_cl_norm_in.py \
  tests/test_cl_fused.py -k "norm_in or split" 2>&1 | tail -15 | tee "$OUT/tests.md"
[ -f /tmp/l7b.gguf ] || python3 -c "from perfx.engine.synthetic import write_gguf, get_shape; write_gguf(get_shape('llama-7b'), '/tmp/l7b.gguf', 'tok.gguf')"
timeout 400 python3 scripts/decode_ab.py /tmp/l7b.gguf "$OUT/decode_ab_tg128.json" 2>&1 | tee "$OUT/decode_ab_tg128.md"
timeout 400 python3 scripts/decode_ab.py /tmp/l7b.gguf "$OUT/decode_ab_512.json" --start 512 2>&1 | tee "$OUT/decode_ab_512.md"
timeout 200 python3 scripts/gpu_profile.py /tmp/l7b.gguf --prompt 512 --steps 16 \
  --set gemv_norm_in=true,split_combine=true 2>&1 | tee "$OUT/profile_fused.md"
