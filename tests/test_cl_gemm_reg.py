"""The two-level tiled GEMM (kernels/gemm_reg.cl through Matmul with tiled_reg) against a float64 NumPy
oracle, on the CPU device (PoCL, or Intel's CPU runtime with PERFX_TEST_CL_PLATFORM="Intel(R) OpenCL").

Outputs are poisoned (NaN, or random values for accumulate), with a guard region after them
(tests/test_cl_matmul.py's `run`); tolerance 1e-4 of the output's largest magnitude. Sizes are odd: rows
and tokens that fill no tile, K with its 64 and 32 tail chunks, several work-groups each way.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.test_cl_matmul import rt  # noqa: F401 (fixture)
from tests.test_cl_matmul import assert_close, f16, oracle, rand_int4, rand_int8, run, silu_mul

# Tilings: GPU's (128 x 128 of 16 x 16 work-items, K stages of 16), a small one whose work-groups do not
# divide the sizes (staging items fewer than work-items, KWW 4, VW 2), and one with padding and 8 x 8
# register tiles of 8 x 4 work-items (more staging items than work-items).
TILINGS = {
    "gpu": {},
    "small": {"reg_mwg": 16, "reg_nwg": 8, "reg_mdimc": 4, "reg_ndimc": 4, "reg_kww": 4, "reg_vw": 2},
    "pad": {"reg_mwg": 64, "reg_nwg": 32, "reg_mdimc": 8, "reg_ndimc": 4, "reg_kww": 2, "reg_vw": 4, "reg_pad": 4},
}


@pytest.fixture(scope="module", params=list(TILINGS))
def mm(rt, request):
    from perfx.engine.backends.opencl.matmul import Matmul

    return Matmul(rt, {"tiled_reg": True, **TILINGS[request.param]})


def int4_matrix(rt, rng, N: int, K: int, G: int):
    from perfx.engine.backends.opencl.matmul import DeviceMatrix

    parts, w = rand_int4(rng, N, K, G)
    return DeviceMatrix.from_int4(rt, *parts, G), w


@pytest.mark.parametrize("N,K,G,T", [
    (577, 608, 32, 37),       # K = 4*128 + 64 + 32
    (260, 1536, 64, 130),
    (132, 640, 128, 9),
    (64, 96, 32, 1),          # K = 64 + 32 only; one token
])
def test_int4(rt, mm, N, K, G, T):
    rng = np.random.default_rng(N + K + G + T)
    dm, w = int4_matrix(rt, rng, N, K, G)
    x = rng.standard_normal((T, K))
    assert_close(run(rt, mm, dm, x, N, scheme="tiled"), oracle(x, w))


def test_int4_subnormal_scales(rt, mm):
    """fp16 scales and zeros below fp16's smallest normal (6.1e-5), of both signs, held exactly (gemm_reg.cl
    converts int4's fp16 scales from their bits)."""
    from perfx.engine.backends.opencl.matmul import DeviceMatrix

    rng = np.random.default_rng(5)
    N, K, G, T = 132, 608, 32, 19
    q = rng.integers(0, 16, (N, K)).astype(np.uint8)
    scale = f16(rng.uniform(1e-7, 5e-5, (N, K // G)))
    zero = f16(scale * rng.uniform(-12, 4, (N, K // G)))
    assert np.abs(scale).max() < 6.1e-5 and (zero > 0).any() and (zero < 0).any()
    w = q * np.repeat(scale, G, axis=1).astype(np.float64) + np.repeat(zero, G, axis=1)
    x = rng.standard_normal((T, K))
    assert_close(run(rt, mm, DeviceMatrix.from_int4(rt, q, scale, zero, G), x, N, scheme="tiled"), oracle(x, w))


def test_int4_accumulate(rt, mm):
    rng = np.random.default_rng(3)
    N, K, T = 301, 608, 45
    dm, w = int4_matrix(rt, rng, N, K, 32)
    x, y0 = rng.standard_normal((T, K)), rng.standard_normal((T, N)).astype(np.float32)
    assert_close(run(rt, mm, dm, x, N, y0=y0, scheme="tiled"), y0 + oracle(x, w))


@pytest.mark.parametrize("op", ["swiglu", "geglu"])
def test_int4_gated(rt, mm, op):
    """Gate and up rows in one register tile: F = 300 is no multiple of any tiling's MWG / 2."""
    rng = np.random.default_rng(4)
    F, K, T = 300, 608, 41
    dm, w = int4_matrix(rt, rng, 2 * F, K, 32)
    x = rng.standard_normal((T, K))
    gu = oracle(x, w)
    if op == "swiglu":
        want = silu_mul(gu)
    else:
        gate, up = np.split(gu, 2, axis=-1)
        want = 0.5 * gate * (1 + np.tanh(0.7978845608 * (gate + 0.044715 * gate ** 3))) * up
    assert_close(run(rt, mm, dm, x, F, op=op, scheme="tiled"), want)


def test_int8(rt, mm):
    from perfx.engine.backends.opencl.matmul import DeviceMatrix

    rng = np.random.default_rng(8)
    N, K, T = 301, 608, 33
    parts, w = rand_int8(rng, N, K)
    dm = DeviceMatrix.from_q8(rt, *parts)
    x = rng.standard_normal((T, K))
    assert_close(run(rt, mm, dm, x, N, scheme="tiled"), oracle(x, w.reshape(N, K)))


def test_f16(rt, mm):
    from perfx.engine.backends.opencl.matmul import DeviceMatrix

    rng = np.random.default_rng(16)
    N, K, T = 301, 608, 33
    w = f16(rng.standard_normal((N, K)))
    dm = DeviceMatrix.from_f16(rt, w)
    x = rng.standard_normal((T, K))
    assert_close(run(rt, mm, dm, x, N, scheme="tiled"), oracle(x, w))


@pytest.mark.parametrize("qtypes", [("BF16",), ("F32",), ("Q4_0", "Q8_0")])
def test_other_formats(rt, mm, qtypes):
    """bf16, f32, and int8 with float32 scales and zeros (a mix of kinds)."""
    from perfx.engine.backends.opencl.matmul import DeviceMatrix
    from tests.test_cl_matmul import _qtensor

    rng = np.random.default_rng(len(qtypes))
    tensors = [_qtensor(f"t{i}", qt, rng.standard_normal((132, 512))) for i, qt in enumerate(qtypes)]
    dm = DeviceMatrix.from_qtensors(rt, tensors)
    w = np.concatenate([t.dequantize() for t in tensors]).astype(np.float64)
    x = rng.standard_normal((19, 512))
    assert_close(run(rt, mm, dm, x, dm.rows, scheme="tiled"), oracle(x, w))


def test_int4_float32_scales(rt, mm):
    """int4 with float32 scales and zeros (GGUF K-quants), values fp16 does not hold."""
    from dataclasses import replace

    from perfx.engine.backends.opencl.packing import DeviceMatrix, pack_int4

    rng = np.random.default_rng(12)
    (q, scale, zero), _ = rand_int4(rng, 101, 576, 32)
    scale, zero = scale * np.float32(1.0001), zero * np.float32(0.9999)
    w = q * np.repeat(scale, 32, axis=1).astype(np.float64) + np.repeat(zero, 32, axis=1)
    dm = replace(DeviceMatrix._upload(rt, "int4", 101, 576, 32, pack_int4(q, scale, zero, 32, dtype=np.float32)),
                 scale_f32=True)
    x = rng.standard_normal((29, 576))
    assert_close(run(rt, mm, dm, x, 101, scheme="tiled"), oracle(x, w))


def test_local_memory_refused_before_launch():
    """NVIDIA's 48 KB less the 1 KiB its driver keeps: 128 x 128 tiles fit with K stages of 16, not of 32."""
    from perfx.engine.backends.opencl.specs import GEMM_REG, check_fits
    from perfx.engine.errors import PerfxError

    tile = {p.define: p.default for p in GEMM_REG.params if p.define}
    check_fits("gemm_reg", tile, 48 * 1024 - 1024, 1024)
    with pytest.raises(PerfxError, match="local memory"):
        check_fits("gemm_reg", {**tile, "KWW": 4}, 48 * 1024 - 1024, 1024)


def test_broken_tiling_refused(rt):
    """A register tile with an odd count of vectors (no gate/up halves) is refused, naming the rule."""
    from perfx.engine.backends.opencl.matmul import Matmul
    from perfx.engine.errors import PerfxError

    rng = np.random.default_rng(0)
    dm, _ = int4_matrix(rt, rng, 64, 128, 32)
    mm = Matmul(rt, {"tiled_reg": True, "reg_mwg": 64, "reg_mdimc": 16, "reg_vw": 4})
    with pytest.raises(PerfxError, match="even count"):
        run(rt, mm, dm, rng.standard_normal((40, 128)), 64, scheme="tiled")


def test_tuner_searches_it(monkeypatch):
    """`perfx tune --kernels reg`: each tiling of its space is checked against NumPy and timed with tiled_reg on,
    and is kept only if faster than the device's gemm_tiled."""
    from perfx.engine.backends.opencl import tuner
    from tests.test_tune import opencl_selection

    space = {"reg_mwg": (16, 32), "reg_nwg": (8,), "reg_mdimc": (4,), "reg_ndimc": (4,),
             "reg_vw": (2,), "reg_kww": (2,), "reg_pad": (0,)}
    monkeypatch.setattr(tuner, "search_space", lambda kernel: space)
    result = tuner.Tuner(opencl_selection(), shapes=((72, 224),)).run(["reg"], budget_s=600, write=False)
    g = result.groups[0]
    assert (g.group, g.tried, g.worked) == ("reg", 2, 2)
    assert g.before_s is not None and g.after_s <= g.before_s
    assert g.chosen["tiled_reg"] is (g.after_s < g.before_s)
