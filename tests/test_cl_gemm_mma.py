"""The tensor-core GEMM (kernels/gemm_mma.cl through Matmul) against a float64 NumPy oracle.

Here (PoCL) it runs "emulated": the same kernel, staging, tiles and epilogue, with the PTX instruction
replaced by ordinary arithmetic. On an NVIDIA device (PERFX_TEST_CL_PLATFORM=nvidia) the PTX tests run
too. Outputs are poisoned, with a guard region after them (tests/test_cl_matmul.py's `run`). The oracle
multiplies x and the dequantized weights rounded to fp16, as the kernel does; tolerance 1e-4 of the
output's largest magnitude.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.test_cl_matmul import assert_close, rand_int4, rt, run, silu_mul  # noqa: F401 (rt: fixture)

# Small tiles so that odd sizes cover several work-groups, partial tiles and every warp position.
SMALL = {"gemm_mma": "emulated", "mma_bn": 32, "mma_bt": 16, "mma_wm": 16, "mma_wn": 8, "mma_min_tokens": 2}


def h(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float64).astype(np.float16).astype(np.float64)


def oracle16(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return h(x) @ h(w).T


# Warp tiles of 2 x 2 fragments (MT = NT = 2), 2 warps side by side along the tokens.
WIDER = {**SMALL, "mma_bt": 32, "mma_wm": 32, "mma_wn": 16}


@pytest.fixture(scope="module", params=[SMALL, WIDER], ids=["1x1-fragments", "2x2-fragments"])
def mm_emulated(rt, request):
    from perfx.engine.backends.opencl.matmul import Matmul

    mm = Matmul(rt, request.param)
    assert mm.mma is not None, "the emulated kernel failed its own probe"
    return mm


@pytest.fixture(scope="module")
def mm_ptx(rt):
    from tests.conftest import nvidia_matmul

    mm = nvidia_matmul(rt)
    assert mm.mma is not None, "the tensor-core GEMM failed its probe on an NVIDIA device"
    return mm


CASES = [
    # N, K, G, T, op
    (37, 576, 32, 19, "linear"),       # 4 chunks of 128 and one of 64; partial row and token tiles
    (64, 192, 64, 33, "linear"),
    (101, 1536, 128, 5, "linear"),
    (2 * 40, 320, 32, 23, "swiglu"),   # 40 outputs: gate rows then up rows
    (2 * 12, 576, 64, 17, "swiglu"),
]


def _case(rt, N, K, G, T, seed):
    from perfx.engine.backends.opencl.matmul import DeviceMatrix

    rng = np.random.default_rng(seed)
    parts, w = rand_int4(rng, N, K, G)
    return DeviceMatrix.from_int4(rt, *parts, G), w, rng.standard_normal((T, K))


@pytest.mark.parametrize("N,K,G,T,op", CASES)
def test_emulated(rt, mm_emulated, N, K, G, T, op):
    dm, w, x = _case(rt, N, K, G, T, N * K + T)
    assert mm_emulated.scheme(T) == "mma"
    if op == "swiglu":
        assert_close(run(rt, mm_emulated, dm, x, N // 2, op="swiglu"), silu_mul(oracle16(x, w)))
    else:
        assert_close(run(rt, mm_emulated, dm, x, N), oracle16(x, w))


def test_emulated_accumulate(rt, mm_emulated):
    dm, w, x = _case(rt, 45, 256, 32, 21, 3)
    y0 = np.random.default_rng(4).standard_normal((21, 45)).astype(np.float32)
    assert_close(run(rt, mm_emulated, dm, x, 45, y0=y0), y0 + oracle16(x, w))


def test_other_formats_keep_the_portable_gemm(rt, mm_emulated):
    """int8 weights (and K % 64 != 0) are not the tensor-core kernel's: the tiled GEMM runs them."""
    from perfx.engine.backends.opencl.matmul import DeviceMatrix
    from tests.test_cl_matmul import oracle, rand_int8

    rng = np.random.default_rng(5)
    parts, w = rand_int8(rng, 40, 96)
    x = rng.standard_normal((9, 96))
    # the portable GEMM is exact to 1e-4 without fp16 rounding of x: this fails if the mma kernel ran
    assert_close(run(rt, mm_emulated, DeviceMatrix.from_q8(rt, *parts), x, 40), oracle(x, w.reshape(40, 96)))


def test_ptx_falls_back_where_the_device_lacks_it(rt, capsys):
    from perfx.engine.backends.opencl.matmul import Matmul

    if "nvidia" in rt.device.platform.name.lower():
        pytest.skip("the device has the instruction")
    mm = Matmul(rt, {"gemm_mma": "ptx"})
    assert mm.mma is None and mm.scheme(512) == "tiled"
    assert "tensor-core GEMM is not used" in capsys.readouterr().err


@pytest.mark.parametrize("N,K,G,T,op", CASES + [(12288 // 8, 4096, 32, 512, "linear"), (2 * 1000, 4096, 32, 77, "swiglu")])
def test_ptx(rt, mm_ptx, N, K, G, T, op):
    dm, w, x = _case(rt, N, K, G, T, N + K + T)
    if op == "swiglu":
        assert_close(run(rt, mm_ptx, dm, x, N // 2, op="swiglu", scheme="mma"), silu_mul(oracle16(x, w)))
    else:
        assert_close(run(rt, mm_ptx, dm, x, N, scheme="mma"), oracle16(x, w))


def test_emulated_geglu(rt, mm_emulated):
    """GeGLU (Gemma's gate through GELU-tanh) on the tensor-core GEMM: act(gate) * up, not the gate rows alone."""
    from perfx.engine.backends.numpy_backend import gelu_tanh

    F = 40
    dm, w, x = _case(rt, 2 * F, 320, 32, 23, 7)
    gu = oracle16(x, w)
    assert_close(run(rt, mm_emulated, dm, x, F, op="geglu"), gelu_tanh(gu[:, :F]) * gu[:, F:])


# The pipeline's options (gemm_mma.cl's header), each alone and all together, on warp tiles of 16 x 16
# (ldmatrix's B pairs) and 4 warps: stages of 32 (a quarter or half of a chunk), two local buffers, a chunk's
# words loaded once, the half2 dequantization's bit steps, ldmatrix's row addresses and fragments.
PIPE_TILES = {"gemm_mma": "emulated", "mma_bn": 32, "mma_bt": 32, "mma_wm": 16, "mma_wn": 16, "mma_min_tokens": 2}
PIPELINES = {
    "ks32": {"mma_ks": 32},
    "ks32-2buffers": {"mma_ks": 32, "mma_buffers": 2},
    "ks32-2buffers-words-once": {"mma_ks": 32, "mma_buffers": 2, "mma_words_once": 1},
    "ks64-2buffers-words-once": {"mma_buffers": 2, "mma_words_once": 1},
    "words-once": {"mma_words_once": 1},
    "half2": {"mma_deq": "half2"},
    "ldmatrix": {"mma_ldmatrix": "auto"},
    "all": {"mma_ks": 32, "mma_buffers": 2, "mma_words_once": 1, "mma_deq": "half2", "mma_ldmatrix": "auto"},
}
# On NVIDIA's tiles (128 x 128, warps of 32 x 64) two buffers of 64-element stages do not fit 48 KB: 64 x 64.
PTX_PIPELINES = {**PIPELINES,
                 "ks64-2buffers-words-once": {"mma_buffers": 2, "mma_words_once": 1, "mma_bn": 64, "mma_bt": 64,
                                              "mma_wm": 32, "mma_wn": 32},
                 "128-registers": {"mma_maxrreg": 128},
                 "all-128-registers": {**PIPELINES["all"], "mma_maxrreg": 128},
                 "all-warps-32x32": {**PIPELINES["all"], "mma_wn": 32}}
PIPE_CASES = [
    (37, 576, 32, 19, "linear"),       # 4 chunks of 128 and one of 64; partial tiles
    (101, 384, 128, 9, "linear"),      # one group per chunk
    (2 * 12, 320, 64, 35, "swiglu"),   # a 64-chunk, two token tiles
]


def _pipeline_matmul(rt, options: dict, base: dict = PIPE_TILES):
    from perfx.engine.backends.opencl.matmul import Matmul

    mm = Matmul(rt, {**base, **options})
    assert mm.mma is not None, "the kernel failed its own probe"
    assert all(mm.mma.options[k] == v for k, v in options.items()), "the probe fell back to the default pipeline"
    return mm


def _check(rt, mm, N, K, G, T, op, seed):
    dm, w, x = _case(rt, N, K, G, T, seed)
    if op == "swiglu":
        assert_close(run(rt, mm, dm, x, N // 2, op="swiglu", scheme="mma"), silu_mul(oracle16(x, w)))
    else:
        assert_close(run(rt, mm, dm, x, N, scheme="mma"), oracle16(x, w))


@pytest.mark.parametrize("name", PIPELINES)
def test_emulated_pipeline(rt, name):
    mm = _pipeline_matmul(rt, PIPELINES[name])
    for N, K, G, T, op in PIPE_CASES:
        _check(rt, mm, N, K, G, T, op, N * K + T)


def test_pipeline_rules():
    from perfx.engine.backends.opencl.specs import check_rules
    from perfx.engine.errors import PerfxError

    tile = {"BN": 32, "BT": 32, "WM": 16, "WN": 16, "KS": 64, "BUFS": 1}
    check_rules("gemm_mma", tile)
    for bad in ({"KS": 48}, {"BUFS": 3}, {"WN": 8, "LDSM": 1}, {"BT": 16, "WN": 8, "KS": 32}):
        with pytest.raises(PerfxError):
            check_rules("gemm_mma", {**tile, **bad})


def test_pipeline_falls_back_where_the_device_lacks_it(rt, capsys):
    from perfx.engine.backends.opencl.matmul import Matmul

    if "nvidia" in rt.device.platform.name.lower():
        pytest.skip("the device has the instructions")
    mm = Matmul(rt, {"gemm_mma": "ptx", "mma_deq": "half2", "mma_ldmatrix": "auto"})
    err = capsys.readouterr().err
    assert mm.mma is None
    assert "mma_deq = half2, mma_ldmatrix = auto is not used" in err and "tensor-core GEMM is not used" in err


@pytest.mark.parametrize("name", PTX_PIPELINES)
def test_ptx_pipeline(rt, name):
    """On an NVIDIA device: each option on NVIDIA's tiles (128 x 128, warps of 32 x 64), the shapes of a
    7B prefill cut in rows, with and without a 64-chunk."""
    from tests.conftest import nvidia_matmul

    options = PTX_PIPELINES[name]
    mm = nvidia_matmul(rt, **options)
    assert mm.mma is not None, "the tensor-core GEMM failed its probe"
    assert all(mm.mma.options[k] == v for k, v in options.items() if k in mm.mma.options), \
        "the probe fell back to the default pipeline (stderr says why)"
    for N, K, G, T, op in PIPE_CASES + [(12288 // 8, 4096, 32, 512, "linear"), (4096 // 8, 11008, 32, 200, "linear"),
                                        (2 * 1000, 4096, 32, 77, "swiglu")]:
        _check(rt, mm, N, K, G, T, op, N + K + T)
