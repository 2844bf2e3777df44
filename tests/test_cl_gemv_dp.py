"""The int4 GEMV by integer dot products (kernels/gemv_dp.cl through Matmul) against a float64 NumPy oracle.

Here (PoCL) it runs "emulated": the same kernel, layout, pieces, tails and epilogues, with dp2a and prmt
replaced by ordinary arithmetic on the same registers. On an NVIDIA device (PERFX_TEST_CL_PLATFORM=nvidia)
the PTX tests run too. Outputs are poisoned, with a guard region after them (tests/test_cl_matmul.py's
`run`). The oracle multiplies the weights with x as its int16 blocks hold it over the whole 128-chunks
and the float x in the tail chunks (matmul.xq_view); tolerance 1e-4 of the output's largest magnitude.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.test_cl_matmul import assert_close, rand_int4, rt, run, silu_mul  # noqa: F401 (rt: fixture)

# Small work-groups so that odd sizes cover several work-groups and partial tiles; pieces of 8, 4 and 16
# lanes; K split 4 ways (the partial sums by butterfly exchanges, gemv_kernel.h LANE_XOR), 64 ways (the
# tree in local memory) and not at all.
EMULATED = [{"gemv_dp": "emulated", "dp_vec": 8, "dp_ksplit": 4, "dp_wg_rows": 2, "dp_tpw": 1},
            {"gemv_dp": "emulated", "dp_vec": 4, "dp_ksplit": 64, "dp_wg_rows": 1, "dp_tpw": 2, "use_image": True},
            {"gemv_dp": "emulated", "dp_vec": 16, "dp_ksplit": 1, "dp_wg_rows": 4, "dp_tpw": 1}]


def _oracle(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    from perfx.engine.backends.opencl.packing import xq_view

    return xq_view(x) @ w.T


@pytest.fixture(scope="module", params=EMULATED, ids=["vec8-ksplit4-butterfly", "vec4-ksplit64-tree-tpw2-image", "vec16-whole-chunks"])
def mm_emulated(rt, request):
    from perfx.engine.backends.opencl.matmul import Matmul

    mm = Matmul(rt, request.param)
    assert mm.dp is not None, "the emulated kernel failed its own probe"
    return mm


@pytest.fixture(scope="module")
def mm_ptx(rt):
    from tests.conftest import nvidia_matmul

    mm = nvidia_matmul(rt, gemv_dp="ptx")
    assert mm.dp is not None, "the dot-product GEMV failed its probe on an NVIDIA device"
    return mm


CASES = [
    # N, K, G, T, op
    (37, 608, 32, 1, "linear"),        # K = 4*128 + 64 + 32: both tail chunks; N not a multiple of 4
    (37, 608, 32, 3, "linear"),
    (45, 448, 64, 3, "linear"),        # a 64-tail, group 64
    (101, 1536, 128, 1, "linear"),
    (98, 1280, 128, 3, "linear"),
    (2 * 36, 352, 32, 1, "swiglu"),    # 36 outputs: gate rows then up rows; a 64- and a 32-tail
    (2 * 40, 576, 64, 3, "swiglu"),
    (2 * 20, 640, 128, 1, "geglu"),
]


def _case(rt, N, K, G, T, seed):
    from perfx.engine.backends.opencl.packing import DeviceMatrix

    rng = np.random.default_rng(seed)
    parts, w = rand_int4(rng, N, K, G)
    return DeviceMatrix.from_int4(rt, *parts, G), w, rng.standard_normal((T, K))


def _check(rt, mm, N, K, G, T, op, seed):
    from perfx.engine.backends.numpy_backend import gelu_tanh

    dm, w, x = _case(rt, N, K, G, T, seed)
    if op == "linear":
        assert_close(run(rt, mm, dm, x, N, scheme="gemv"), _oracle(x, w))
        return
    gu = _oracle(x, w)
    F = N // 2
    want = silu_mul(gu) if op == "swiglu" else gelu_tanh(gu[:, :F]) * gu[:, F:]
    assert_close(run(rt, mm, dm, x, F, op=op, scheme="gemv"), want)


@pytest.mark.parametrize("N,K,G,T,op", CASES)
def test_emulated(rt, mm_emulated, N, K, G, T, op):
    _check(rt, mm_emulated, N, K, G, T, op, N * K + T + G)
    assert any(name == "gemv_dp" for name, _ in rt.requested.values())


@pytest.mark.parametrize("T", [1, 3])
def test_emulated_accumulate(rt, mm_emulated, T):
    dm, w, x = _case(rt, 45, 608, 32, T, 3)
    y0 = np.random.default_rng(4).standard_normal((T, 45)).astype(np.float32)
    assert_close(run(rt, mm_emulated, dm, x, 45, y0=y0, scheme="gemv"), y0 + _oracle(x, w))


def test_rows_do_not_depend_on_token_count(rt, mm_emulated):
    """Each token of a T = 3 launch gets exactly the bits of the same token alone (serving's batches)."""
    dm, _, x = _case(rt, 37, 608, 32, 3, 5)
    batch = run(rt, mm_emulated, dm, x, 37, scheme="gemv")
    for t in range(3):
        assert np.array_equal(run(rt, mm_emulated, dm, x[t : t + 1], 37, scheme="gemv")[0], batch[t])


def test_x_in_pairs_of_planes(rt, mm_emulated):
    """quantize (xq.h XQ_PAIRS) puts element 32g + 16h + l of a whole chunk at 8l + 2g + h, the tail in
    natural order, with the int16 values and scales of matmul.quantize_xq."""
    import pyopencl as cl

    from perfx.engine.backends.opencl.packing import quantize_xq

    T, K, G = 2, 608, 32
    x = np.random.default_rng(9).standard_normal((T, K)).astype(np.float32)
    program = rt.program("gemv_dp", FORMAT=4, G=G, **mm_emulated.dp.defines())
    xb, xs, xq, xd = rt.to_device(x), rt.empty(4 * T * K // G), rt.empty(2 * T * K), rt.empty(4 * T * K // 32)
    quantize = cl.Kernel(program, "quantize")
    quantize.set_args(xb, xs, xq, xd, np.int32(K))
    cl.enqueue_nd_range_kernel(rt.queue, quantize, (T * K // G,), None)
    want_q, want_d = quantize_xq(x)
    e = np.arange(K)
    g, h, lane = (e & 127) >> 5, (e >> 4) & 1, e & 15
    pos = np.where((e & ~127) + 128 <= K, (e & ~127) + 8 * lane + 2 * g + h, e)
    assert np.array_equal(rt.read(xq, (T, K), np.int16)[:, pos], want_q)
    assert np.array_equal(rt.read(xd, (T, K // 32)), want_d)


def test_scale_f32_and_norms_keep_the_float_gemv(rt, mm_emulated):
    """int4 with float32 scales (K-quants), and a GEMV with the norm epilogue or prologue, are not this
    kernel's: Matmul.dp.takes says no (gemv.cl runs them)."""
    from perfx.engine.backends.opencl.matmul import Norm, NormIn

    dm, _, _ = _case(rt, 8, 128, 32, 1, 1)
    assert mm_emulated.dp.takes(dm, None)
    assert not mm_emulated.dp.takes(type(dm)(**{**vars(dm), "scale_f32": True}), None)
    assert not mm_emulated.dp.takes(dm, Norm(dm.buf, dm.buf, None, 0, 1e-5))
    assert not mm_emulated.dp.takes(dm, None, NormIn(dm.buf, 1e-5))


def test_ptx_falls_back_where_the_device_lacks_it(rt, capsys):
    from perfx.engine.backends.opencl.matmul import Matmul

    if "nvidia" in rt.device.platform.name.lower():
        pytest.skip("the device has the instructions")
    mm = Matmul(rt, {"gemv_dp": "ptx"})
    assert mm.dp is None
    assert "integer dot-product GEMV is not used" in capsys.readouterr().err


def test_ptx_work_groups_fill_whole_warps(rt, capsys):
    """shfl.sync over all 32 lanes needs work-groups of whole warps: the spec refuses 16 x 1 before a build."""
    from perfx.engine.backends.opencl.matmul import Matmul

    mm = Matmul(rt, {"gemv_dp": "ptx", "dp_ksplit": 16, "dp_wg_rows": 1})
    assert mm.dp is None
    assert "whole warps" in capsys.readouterr().err


@pytest.mark.parametrize("N,K,G,T,op", CASES + [(12288, 4096, 32, 1, "linear"), (2 * 11008, 4096, 32, 1, "swiglu"),
                                                  (4096, 11008, 128, 3, "linear")])
def test_ptx(rt, mm_ptx, N, K, G, T, op):
    _check(rt, mm_ptx, N, K, G, T, op, N + K + T)


@pytest.mark.parametrize("T", [1, 3])
def test_ptx_accumulate(rt, mm_ptx, T):
    dm, w, x = _case(rt, 45, 608, 32, T, 3)
    y0 = np.random.default_rng(4).standard_normal((T, 45)).astype(np.float32)
    assert_close(run(rt, mm_ptx, dm, x, 45, y0=y0, scheme="gemv"), y0 + _oracle(x, w))


def test_tiny_model_decodes_the_same_with_it(tmp_path, monkeypatch):
    """A tiny Q4_0 model decoding with every int4 GEMV on the dot-product kernel (emulated; the norms
    keep their own launches so that the residual projections take it too) gives the same greedy tokens,
    and decode logits within 1e-3 of the largest, as with the device's own GEMV."""
    from perfx.engine import Sampling, load_model
    from perfx.engine.backends.opencl import backend
    from perfx.engine.backends.opencl.devices import select
    from perfx.engine.errors import PerfxError
    from tests.conftest import TinySpec, write_tiny_gguf

    try:
        device = select("opencl").info.id
    except PerfxError as e:
        pytest.skip(f"no usable OpenCL device: {e}")
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, TinySpec(qtype="Q4_0", dim=128, ffn_dim=352, tied=False, ctx_len=64, seed=7))
    ids, s = [3, 1, 4, 1, 5, 9, 2, 6], Sampling(temperature=0, max_tokens=12)
    plain = load_model(path, device=device, ctx=64)
    want_tokens, want_logits = plain.generate(ids, s)[0], plain.forward([7], len(ids))

    real, made = backend.Matmul, []

    def with_dp(rt, params=None):
        made.append(real(rt, {**(params or {}), "gemv_dp": "emulated", "gemv_norm": False}))
        return made[-1]

    monkeypatch.setattr(backend, "Matmul", with_dp)
    dp = load_model(path, device=device, ctx=64)
    assert made and made[-1].dp is not None
    assert dp.generate(ids, s)[0] == want_tokens
    got_logits = dp.forward([7], len(ids))
    assert np.abs(got_logits - want_logits).max() <= 1e-3 * np.abs(want_logits).max()
    assert any(name == "gemv_dp" for name, _ in made[-1].rt.requested.values())
