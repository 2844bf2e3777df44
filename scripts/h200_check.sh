#!/usr/bin/env bash
# A short check on the lent H200 of the shipped NVIDIA entry (no tuner file): the PTX and model tests,
# then pp512 on the 7B-shaped file. From the project root there, this tree in .gpuwt/.
set -u
cd .gpuwt
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1
export PYTHONUNBUFFERED=1 PERFX_HOME=/tmp/perfx-check
PERFX_TEST_CL_PLATFORM=nvidia timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/test_cl_gemm_mma.py 2>&1 | tail -1
PERFX_TEST_GGUF=$PWD/smol.gguf timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/test_cl_model.py -k "smollm2 and not perplexity" 2>&1 | tail -1
python3 -c "from perfx.engine.synthetic import write_gguf as w, get_shape as s; w(s('llama-7b'), '/tmp/l7b.gguf', 'tok.gguf')"
timeout 90 perfx bench -m /tmp/l7b.gguf --device gpu -p 512 -n 0 -r 3 2>&1 | grep -E "pp512|device"
