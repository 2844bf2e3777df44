"""OpenCL matrix products (kernels/gemv.cl, kernels/gemm.cl via Matmul) against a float64 NumPy oracle.

Every output buffer is poisoned (NaN, or random values for accumulate) before a run, and has a guard
region after it that must come back untouched. Tolerance: 1e-4 of the output's largest magnitude.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # idle BLAS threads would spin against PoCL's

import numpy as np
import pytest

cl = pytest.importorskip("pyopencl")

from perfx.engine.errors import PerfxError
from perfx.engine.formats.tensors import QTensor
from tests.conftest import held_by_xq

RTOL = 1e-4
GUARD = 64          # floats after each output that must stay untouched
SENTINEL = 1.0e30

# Parameters of the GPU-style code paths (narrow pieces, K split across work-items with a local-memory
# reduction, local X tiles, few chunks staged per barrier), run here on the CPU device.
GPU_LIKE = {
    "gemv_vec": 4, "gemv_ksplit": 8, "gemv_wg_rows": 4, "use_image": True,
    "few_vec": 4, "few_wg_rows": 4,
    "tiled_vec": 4, "tiled_bn": 32, "tiled_bt": 16, "tiled_rr": 2, "tiled_tr": 2, "tiled_kc": 1,
    "tiled_x_local": 1,
}


def _builds(device) -> bool:
    """Whether the device's compiler works at all (a broken PoCL install fails every build)."""
    try:
        cl.Program(cl.Context([device]), "__kernel void probe(__global float* y) { y[0] = 1.0f; }").build()
        return True
    except cl.Error:
        return False


def _pick_device():
    """PERFX_TEST_CL_PLATFORM (a substring of platform name, version or device name) if set, else the
    first PoCL or CPU device, else any device; only devices that can build a kernel."""
    wanted = os.environ.get("PERFX_TEST_CL_PLATFORM", "").lower()
    try:
        platforms = cl.get_platforms()
    except cl.Error:
        return None
    candidates = []
    for p in platforms:
        try:
            devices = p.get_devices()
        except cl.Error:
            continue
        for d in devices:
            label = f"{p.name} {p.version} {d.name}".lower()
            if wanted and wanted not in label:
                continue
            cpu = bool(d.type & cl.device_type.CPU)
            candidates.append((0 if "pocl" in label or "portable" in label or cpu else 1, len(candidates), d))
    for *_, device in sorted(candidates, key=lambda c: c[:2]):
        if _builds(device):
            return device
    return None


@pytest.fixture(scope="session")
def rt():
    device = _pick_device()
    if device is None:
        pytest.skip("no OpenCL device")
    from perfx.engine.backends.opencl.runtime import Runtime

    return Runtime(device)


@pytest.fixture(scope="session")
def mm(rt):
    from perfx.engine.backends.opencl.matmul import Matmul

    return Matmul(rt)


@pytest.fixture(scope="session")
def mm_gpu_like(rt):
    from perfx.engine.backends.opencl.matmul import Matmul

    return Matmul(rt, GPU_LIKE)


@pytest.fixture(scope="session")
def mm_nvidia(rt):
    from perfx.engine.backends.opencl.matmul import DEFAULT_PARAMS, Matmul
    from perfx.engine.backends.opencl.tuning import vendor_params

    return Matmul(rt, vendor_params("gpu", "nvidia", "matmul", DEFAULT_PARAMS))


# ---- helpers --------------------------------------------------------------------------------------


def f16(a: np.ndarray) -> np.ndarray:
    """Values that fp16 holds exactly (as the device stores scales in fp16)."""
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)


def rand_int4(rng, N: int, K: int, G: int):
    q = rng.integers(0, 16, (N, K)).astype(np.uint8)
    scale = f16(rng.uniform(0.002, 0.02, (N, K // G)))
    zero = f16(-scale * rng.uniform(4, 12, (N, K // G)))
    w = q * np.repeat(scale, G, axis=1).astype(np.float64) + np.repeat(zero, G, axis=1)
    return (q, scale, zero), w


def rand_int8(rng, N: int, K: int):
    q = rng.integers(-127, 128, (N, K)).astype(np.int8)
    scale = f16(rng.uniform(0.001, 0.01, (N, K // 32)))
    return (q, scale), q.reshape(N, K // 32, 32) * scale[..., None].astype(np.float64)


def run(rt, mm, w, x: np.ndarray, out_cols: int, *, op: str = "linear", y0: np.ndarray | None = None,
        scheme: str | None = None) -> np.ndarray:
    """Run linear / swiglu / geglu on x [T, K] into a poisoned (or y0-filled) output with a guard region."""
    T = x.shape[0]
    y = np.full(T * out_cols + GUARD, SENTINEL, np.float32)
    y[: T * out_cols] = np.nan if y0 is None else y0.reshape(-1)
    xb = rt.to_device(x.astype(np.float32))
    yb = cl.Buffer(rt.ctx, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR, hostbuf=y)
    if op in ("swiglu", "geglu"):
        mm.swiglu(xb, w, T, yb, scheme=scheme, act="gelu_tanh" if op == "geglu" else "silu")
    else:
        mm.linear(xb, w, T, yb, accumulate=y0 is not None, scheme=scheme)
    got = rt.read(yb, y.shape)
    assert np.all(got[T * out_cols :] == SENTINEL), "write past the end of the output"
    return got[: T * out_cols].reshape(T, out_cols)


def oracle(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ w.T


def int_dot(mm, w, T: int, scheme: str | None = None) -> bool:
    """Whether the product takes x in int16 blocks (the int4 and int8 GEMV's INT_DOT path, x86 AVX-512BW)."""
    return mm.int_dot and w.fmt in ("int4", "int8") and (scheme or mm.scheme(T)) == "gemv"


def x_for(mm, w, x: np.ndarray, scheme: str | None = None) -> np.ndarray:
    """x as the product of mm on matrix w sees it."""
    from perfx.engine.backends.opencl.packing import xq_view

    return xq_view(x) if int_dot(mm, w, x.shape[0], scheme) else x


def silu_mul(gu: np.ndarray) -> np.ndarray:
    gate, up = np.split(gu, 2, axis=-1)
    return gate / (1.0 + np.exp(-gate)) * up


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert np.all(np.isfinite(got)), "output has NaN/inf (unwritten or poisoned entries)"
    scale = np.abs(want).max()
    err = np.abs(got - want).max()
    assert err <= RTOL * scale, f"max error {err:.3g} > {RTOL} x {scale:.3g}"


# ---- int4 -----------------------------------------------------------------------------------------

INT4_CASES = [
    # N, K, G, T, scheme (None: Matmul's choice)
    (960, 576, 32, 1, None),
    (577, 576, 32, 1, None),
    (577, 576, 32, 3, None),
    (577, 576, 32, 17, "few"),
    (577, 576, 32, 17, "tiled"),
    (577, 576, 32, 300, None),
    (1536, 1536, 128, 1, None),
    (1536, 1536, 128, 3, "tiled"),
    (1536, 1536, 128, 300, None),
    (3072, 576, 64, 1, None),
    (3072, 576, 64, 17, None),
    (960, 1536, 64, 40, None),
    (64, 608, 32, 5, "few"),      # K = 4*128 + 64 + 32: every tail chunk
    (64, 608, 32, 5, "tiled"),
]


@pytest.mark.parametrize("N,K,G,T,scheme", INT4_CASES)
def test_int4_linear(rt, mm, N, K, G, T, scheme):
    from perfx.engine.backends.opencl.matmul import DeviceMatrix

    rng = np.random.default_rng(N * 7 + K + G + T)
    parts, w = rand_int4(rng, N, K, G)
    dm = DeviceMatrix.from_int4(rt, *parts, G)
    x = rng.standard_normal((T, K))
    assert_close(run(rt, mm, dm, x, N, scheme=scheme), oracle(x_for(mm, dm, x, scheme), w))


@pytest.mark.parametrize("T,scheme", [(1, None), (5, None), (40, None), (3, "tiled")])
def test_int4_accumulate(rt, mm, T, scheme):
    from perfx.engine.backends.opencl.matmul import DeviceMatrix

    N, K, G = 577, 1536, 32
    rng = np.random.default_rng(T)
    parts, w = rand_int4(rng, N, K, G)
    dm = DeviceMatrix.from_int4(rt, *parts, G)
    x, y0 = rng.standard_normal((T, K)), rng.standard_normal((T, N)).astype(np.float32)
    assert_close(run(rt, mm, dm, x, N, y0=y0, scheme=scheme), y0 + oracle(x_for(mm, dm, x, scheme), w))


@pytest.mark.parametrize("T,scheme", [(1, None), (3, None), (17, "few"), (17, "tiled"), (300, None)])
def test_int4_swiglu(rt, mm, T, scheme):
    from perfx.engine.backends.opencl.matmul import DeviceMatrix

    F, K, G = 1536, 576, 32
    rng = np.random.default_rng(100 + T)
    parts, w = rand_int4(rng, 2 * F, K, G)
    dm = DeviceMatrix.from_int4(rt, *parts, G)
    x = rng.standard_normal((T, K))
    assert_close(run(rt, mm, dm, x, F, op="swiglu", scheme=scheme), silu_mul(oracle(x_for(mm, dm, x, scheme), w)))


# ---- int8 and fp16 --------------------------------------------------------------------------------


def test_int8_output_matrix(rt, mm):
    """The tied embedding / output shape, 49152 x 576, decode and a few tokens."""
    from perfx.engine.backends.opencl.matmul import DeviceMatrix

    N, K = 49152, 576
    rng = np.random.default_rng(8)
    parts, w = rand_int8(rng, N, K)
    dm = DeviceMatrix.from_q8(rt, *parts)
    for T in (1, 3):
        x = rng.standard_normal((T, K))
        assert_close(run(rt, mm, dm, x, N), oracle(x_for(mm, dm, x), w.reshape(N, K)))


@pytest.mark.parametrize("T,scheme,accumulate", [(1, None, False), (17, "few", True), (300, None, False)])
def test_int8_odd_rows(rt, mm, T, scheme, accumulate):
    from perfx.engine.backends.opencl.matmul import DeviceMatrix

    N, K = 577, 1536
    rng = np.random.default_rng(9 + T)
    parts, w = rand_int8(rng, N, K)
    dm = DeviceMatrix.from_q8(rt, *parts)
    x = rng.standard_normal((T, K))
    y0 = rng.standard_normal((T, N)).astype(np.float32) if accumulate else None
    want = oracle(x_for(mm, dm, x, scheme), w.reshape(N, K)) + (y0 if accumulate else 0)
    assert_close(run(rt, mm, dm, x, N, y0=y0, scheme=scheme), want)


@pytest.mark.parametrize("T", [1, 3, 40])
def test_f16(rt, mm, T):
    from perfx.engine.backends.opencl.matmul import DeviceMatrix

    N, K = 577, 608
    rng = np.random.default_rng(16 + T)
    w = f16(rng.standard_normal((N, K)))
    dm = DeviceMatrix.from_f16(rt, w)
    x = rng.standard_normal((T, K))
    assert_close(run(rt, mm, dm, x, N), oracle(x, w))


# ---- GPU-style parameters -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,T,scheme,op", [
    ("int4", 1, None, "linear"), ("int4", 1, None, "swiglu"), ("int4", 5, None, "linear"),
    ("int4", 40, None, "swiglu"), ("int8", 1, None, "linear"), ("int8", 40, None, "linear"),
    ("f16", 1, None, "linear"), ("int4", 5, "tiled", "linear"),
])
def test_gpu_like_params(rt, mm_gpu_like, fmt, T, scheme, op):
    from perfx.engine.backends.opencl.matmul import DeviceMatrix

    N, K = 1024, 608
    rng = np.random.default_rng(zlib.crc32(f"{fmt} {T} {op}".encode()))
    if fmt == "int4":
        parts, w = rand_int4(rng, N, K, 32)
        dm = DeviceMatrix.from_int4(rt, *parts, 32)
    elif fmt == "int8":
        parts, w = rand_int8(rng, N, K)
        w, dm = w.reshape(N, K), DeviceMatrix.from_q8(rt, *parts)
    else:
        w = f16(rng.standard_normal((N, K)))
        dm = DeviceMatrix.from_f16(rt, w)
    x = rng.standard_normal((T, K))
    want = oracle(x, w)
    if op == "swiglu":
        assert_close(run(rt, mm_gpu_like, dm, x, N // 2, op="swiglu", scheme=scheme), silu_mul(want))
    else:
        assert_close(run(rt, mm_gpu_like, dm, x, N, scheme=scheme), want)


@pytest.mark.parametrize("T,scheme", [(1, None), (5, "few"), (300, "tiled"), (40, "tiled")])
def test_nvidia_params(rt, mm_nvidia, T, scheme):
    """The NVIDIA parameters: X read from global memory by chunk groups that start at the K tails."""
    from perfx.engine.backends.opencl.matmul import DeviceMatrix

    N, K = 577, 608
    rng = np.random.default_rng(T)
    parts, w = rand_int4(rng, N, K, 32)
    dm = DeviceMatrix.from_int4(rt, *parts, 32)
    x = rng.standard_normal((T, K))
    assert_close(run(rt, mm_nvidia, dm, x, N, scheme=scheme), oracle(x_for(mm_nvidia, dm, x, scheme), w))


@pytest.mark.parametrize("G,N,K,op,params", [
    (32, 577, 608, "linear", {"gemv_ksplit": 32, "gemv_wg_rows": 2, "gemv_tpw": 3, "gemv_zero_inline": True}),
    (64, 1032, 1536, "swiglu", {"gemv_ksplit": 16, "gemv_wg_rows": 1, "gemv_tpw": 3, "gemv_zero_inline": True}),
    (128, 1001, 1536, "linear", {"gemv_ksplit": 64, "gemv_wg_rows": 1, "gemv_tpw": 4, "gemv_zero_inline": True}),
    (64, 999, 576, "linear", {"gemv_vec": 16, "gemv_tpw": 2, "gemv_zero_inline": True}),
    (32, 576, 576, "swiglu", {"gemv_vec": 16, "gemv_tpw": 5}),
])
def test_gemv_tiles_per_item_and_inline_zeros(rt, G, N, K, op, params):
    """Several row tiles per work-item (tiles past the end clamped, outputs skipped), the K split reduced
    as a tree, and the int4 zero terms summed from each work-item's own x instead of xsum."""
    from perfx.engine.backends.opencl.matmul import DeviceMatrix, Matmul

    rng = np.random.default_rng(zlib.crc32(f"{G} {N} {K} {op}".encode()))
    parts, w = rand_int4(rng, N, K, G)
    dm = DeviceMatrix.from_int4(rt, *parts, G)
    x = rng.standard_normal((1, K)) + 0.5        # a mean away from zero makes wrong zero terms visible
    mm = Matmul(rt, {"gemv_vec": 4, **params})
    want = oracle(x_for(mm, dm, x), w)
    if op == "swiglu":
        assert_close(run(rt, mm, dm, x, N // 2, op="swiglu"), silu_mul(want))
    else:
        assert_close(run(rt, mm, dm, x, N), want)


@pytest.mark.parametrize("fmt,N,K,G,T,hs_group,params,int16_h", [
    ("int4", 576, 1536, 32, 1, 32, {}, False),           # down: K = 1536, sums for a group-32 GEMV next
    ("int4", 576, 1536, 32, 1, 32, {}, True),            # ... and h in int16 for an int-dot GEMV next
    ("int4", 577, 576, 32, 3, None, {}, False),          # odd rows, three tokens, no sums
    ("int4", 1536, 1536, 128, 1, 128, {}, False),        # group 128
    ("int4", 1536, 1536, 128, 2, 64, {}, True),          # int16 h, sums of 64
    ("int4", 608, 608, 32, 1, 32, {}, True),             # every tail chunk, in K and in h
    ("int4", 576, 576, 64, 2, 64, GPU_LIKE, False),      # K split across work-items, x as an image
    ("int8", 577, 576, 32, 1, None, {}, False),
])
def test_residual_norm(rt, fmt, N, K, G, T, hs_group, params, int16_h):
    """y += x W^T, then h = rmsnorm(y) * w and h's group sums (and h in int16 blocks, with the sums
    of what those blocks hold), written by the GEMV's last work-item; the launch after it finds its
    counter back at zero."""
    from perfx.engine.backends.opencl.matmul import DeviceMatrix, Matmul, Norm, XPrep

    rng = np.random.default_rng(zlib.crc32(f"{fmt} {N} {K} {G} {T}".encode()))
    if fmt == "int4":
        parts, w = rand_int4(rng, N, K, G)
        dm = DeviceMatrix.from_int4(rt, *parts, G)
    else:
        parts, w = rand_int8(rng, N, K)
        dm, w = DeviceMatrix.from_q8(rt, *parts), w.reshape(N, K)
    mm = Matmul(rt, params)
    norm_w = rng.uniform(0.5, 1.5, N).astype(np.float32)
    eps = 1e-5
    def poisoned(n: int, dtype, fill) -> cl.Buffer:
        a = np.full(n + GUARD, fill, dtype)
        a[n:] = SENTINEL if dtype == np.float32 else 77
        return cl.Buffer(rt.ctx, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR, hostbuf=a)

    for _launch in range(2):
        x, y0 = rng.standard_normal((T, K)), rng.standard_normal((T, N)).astype(np.float32)
        yb = rt.to_device(y0)
        n_sums = N // hs_group if hs_group else 1
        hb, hsb = poisoned(T * N, np.float32, np.nan), poisoned(T * n_sums, np.float32, np.nan)
        hqb, hdb = poisoned(T * N, np.int16, -32768), poisoned(T * N // 32, np.float32, np.nan)
        hx = (XPrep(hsb, hqb, hdb) if int16_h else XPrep(hsb)) if hs_group else None
        mm.residual_norm(rt.to_device(x.astype(np.float32)), dm, T, yb, Norm(rt.to_device(norm_w), hb, hx, hs_group or 0, eps))
        want_y = y0 + oracle(x_for(mm, dm, x, "gemv"), w)
        want_h = want_y / np.sqrt(np.mean(want_y * want_y, axis=-1, keepdims=True) + eps) * norm_w
        assert_close(rt.read(yb, (T, N)), want_y)
        got_h, got_hs = rt.read(hb, T * N + GUARD), rt.read(hsb, T * n_sums + GUARD)
        assert np.all(got_h[T * N:] == SENTINEL) and np.all(got_hs[T * n_sums:] == SENTINEL)
        got_h = got_h[:T * N].reshape(T, N)
        assert_close(got_h, want_h)
        sums_of = want_h
        if int16_h:                       # h's int16 blocks, as quantize_xq makes them of h
            got_q, got_d = rt.read(hqb, T * N + GUARD, np.int16), rt.read(hdb, T * N // 32 + GUARD)
            assert np.all(got_q[T * N:] == 77) and np.all(got_d[T * N // 32:] == SENTINEL)
            sums_of = held_by_xq(got_h, got_q[:T * N], got_d[:T * N // 32].reshape(T, N // 32))
        if hs_group:
            assert_close(got_hs[:T * n_sums].reshape(T, n_sums), sums_of.reshape(T, n_sums, hs_group).sum(-1))
        else:
            assert np.all(np.isnan(got_hs[:T * n_sums]))
        assert rt.read(mm.done, 1, np.int32)[0] == 0


def test_int_dot_where_the_cpu_has_avx512bw(rt):
    """PoCL on an x86 CPU with AVX-512BW builds the int-dot GEMV and uses it by default; asked not to,
    or with GPU-style parameters, the float GEMV runs."""
    from perfx.engine.backends.opencl.matmul import Matmul

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "Portable" not in rt.device.platform.name or " avx512bw" not in flags:
        pytest.skip("needs PoCL on an x86 CPU with AVX-512BW")
    assert Matmul(rt).int_dot
    assert not Matmul(rt, {"gemv_int_dot": False}).int_dot
    assert not Matmul(rt, GPU_LIKE).int_dot


@pytest.mark.parametrize("fmt,N,K,G,T,op", [
    ("int4", 577, 576, 32, 1, "linear"), ("int4", 1536, 1536, 128, 3, "linear"), ("int4", 512, 608, 32, 1, "swiglu"),
    ("int4", 256, 640, 64, 2, "acc"), ("int8", 577, 576, 32, 1, "linear"),
])
def test_int_dot_with_256_bit_instructions(rt, fmt, N, K, G, T, op):
    """gemv_int_dot_256: the integer products as two 256-bit vpmaddwd (the AVX2 form), same results."""
    from perfx.engine.backends.opencl.matmul import DeviceMatrix, Matmul

    mm = Matmul(rt, {"gemv_int_dot_256": True})
    if not mm.int_dot:
        pytest.skip("the device does not build the int-dot GEMV")
    rng = np.random.default_rng(zlib.crc32(f"{fmt} {N} {K} {G} {T} {op}".encode()))
    if fmt == "int4":
        parts, w = rand_int4(rng, N, K, G)
        dm = DeviceMatrix.from_int4(rt, *parts, G)
    else:
        parts, w = rand_int8(rng, N, K)
        dm, w = DeviceMatrix.from_q8(rt, *parts), w.reshape(N, K)
    x = rng.standard_normal((T, K))
    want = oracle(x_for(mm, dm, x, "gemv"), w)
    if op == "swiglu":
        assert_close(run(rt, mm, dm, x, N // 2, op="swiglu", scheme="gemv"), silu_mul(want))
    else:
        y0 = rng.standard_normal((T, N)).astype(np.float32) if op == "acc" else None
        assert_close(run(rt, mm, dm, x, N, y0=y0, scheme="gemv"), want + (y0 if op == "acc" else 0))


def test_gemv_ksplit_must_be_power_of_two(rt):
    from perfx.engine.backends.opencl.matmul import DeviceMatrix, Matmul

    rng = np.random.default_rng(1)
    parts, _ = rand_int4(rng, 64, 128, 32)
    with pytest.raises(PerfxError, match="power of two"):
        run(rt, Matmul(rt, {"gemv_ksplit": 12}), DeviceMatrix.from_int4(rt, *parts, 32),
            rng.standard_normal((1, 128)), 64)


# ---- GGUF blocks through from_qtensors ------------------------------------------------------------


def _qtensor(name: str, qtype: str, w: np.ndarray) -> QTensor:
    from gguf import GGMLQuantizationType
    from gguf import quants as gguf_quants

    raw = gguf_quants.quantize(w.astype(np.float32), GGMLQuantizationType[qtype])
    return QTensor(name, qtype, w.shape, raw)


@pytest.mark.parametrize("qtypes", [("Q4_1", "Q4_1", "Q4_1"), ("Q4_0", "Q4_0"), ("Q4_0", "Q4_1"), ("Q8_0",),
                                    ("F16", "F16"), ("F32",)])
def test_from_qtensors_exact(rt, mm, qtypes):
    """GGUF blocks -> split_q4 / split_q8_0 -> device layout: equal to dequantize() @ x."""
    from perfx.engine.backends.opencl.matmul import DeviceMatrix

    rng = np.random.default_rng(len(qtypes))
    K = 576
    tensors = [_qtensor(f"t{i}", qt, rng.standard_normal((rows, K)))
               for i, (qt, rows) in enumerate(zip(qtypes, (576, 192, 192)))]
    dm = DeviceMatrix.from_qtensors(rt, tensors)
    w = np.concatenate([t.dequantize() for t in tensors]).astype(np.float64)
    assert dm.rows == w.shape[0] and dm.cols == K
    assert dm.fmt == {"Q4_1": "int4", "Q4_0": "int4", "Q8_0": "int8", "F16": "f16", "F32": "f32"}[qtypes[0]]
    for T in (1, 7, 33):
        x = rng.standard_normal((T, K))
        assert_close(run(rt, mm, dm, x, w.shape[0]), oracle(x_for(mm, dm, x), w))


def test_from_qtensors_int4_groups(rt, mm):
    """perfx's INT4 (AWQ-like, group 128) stacked with Q4_0 rows: groups of 32, scales repeated, exact."""
    from perfx.engine.backends.opencl.matmul import DeviceMatrix

    rng = np.random.default_rng(128)
    K = 512
    (q, scale, zero), w_awq = rand_int4(rng, 256, K, 128)
    raw = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    awq = QTensor("awq", "INT4", (256, K), raw, scale.astype(np.float16), zero.astype(np.float16), 128)
    q40 = _qtensor("q40", "Q4_0", rng.standard_normal((64, K)))
    dm = DeviceMatrix.from_qtensors(rt, [awq, q40])
    assert (dm.fmt, dm.group, dm.rows) == ("int4", 32, 320)
    w = np.concatenate([w_awq, q40.dequantize().astype(np.float64)])
    for T in (1, 5, 40):
        x = rng.standard_normal((T, K))
        assert_close(run(rt, mm, dm, x, 320), oracle(x_for(mm, dm, x), w))


@pytest.mark.parametrize("qtypes,form", [(("BF16",), ("bf16", 0)), (("Q4_0", "Q8_0"), ("int8x", 32))])
def test_from_qtensors_other_types_exact(rt, mm, qtypes, form):
    """BF16, or a mix of kinds, is held exactly too (engine/backends/opencl/weights.py), not requantized."""
    from perfx.engine.backends.opencl.matmul import DeviceMatrix

    rng = np.random.default_rng(6)
    tensors = [_qtensor(f"t{i}", qt, rng.standard_normal((128, 512))) for i, qt in enumerate(qtypes)]
    dm = DeviceMatrix.from_qtensors(rt, tensors)
    assert (dm.fmt, dm.group, dm.rows) == (*form, 128 * len(qtypes))
    w = np.concatenate([t.dequantize() for t in tensors]).astype(np.float64)
    x = rng.standard_normal((2, 512))
    assert_close(run(rt, mm, dm, x, dm.rows), oracle(x_for(mm, dm, x), w))


# ---- errors ---------------------------------------------------------------------------------------


def test_errors(rt, mm):
    from perfx.engine.backends.opencl.matmul import DeviceMatrix, Matmul

    rng = np.random.default_rng(0)
    parts, _ = rand_int4(rng, 12, 64, 32)
    dm = DeviceMatrix.from_int4(rt, *parts, 32)
    x, y = rt.to_device(np.zeros((2, 64), np.float32)), rt.empty(4 * 2 * 12)
    with pytest.raises(PerfxError, match="swiglu"):
        mm.swiglu(x, dm, 1, y)                                   # 12 rows: halves of 6
    with pytest.raises(PerfxError, match="scheme"):
        mm.linear(x, dm, 2, y, scheme="blocked")
    with pytest.raises(PerfxError, match="too small"):
        mm.linear(x, dm, 3, y)
    with pytest.raises(PerfxError, match="multiple of 32"):
        DeviceMatrix.from_f16(rt, np.zeros((4, 48), np.float32))
    with pytest.raises(PerfxError, match="group"):
        DeviceMatrix.from_int4(rt, *rand_int4(rng, 4, 192, 64)[0], 128)
    with pytest.raises(PerfxError, match="unknown matmul parameters"):
        Matmul(rt, {"gemv_vec": 8, "nonsense": 1})


@pytest.mark.parametrize("qtypes", [("Q4_1", "Q4_0"), ("Q8_0",), ("F16", "F32")])
def test_large_matrix_packed_in_pieces(rt, monkeypatch, qtypes):
    """A matrix loaded LOAD_ROWS rows at a time is byte for byte the matrix packed at once."""
    from perfx.engine.backends.opencl import packing

    rng = np.random.default_rng(len(qtypes))
    rows = [200, 77][: len(qtypes)] if len(qtypes) > 1 else [333]
    tensors = [_qtensor(f"t{i}", q, rng.standard_normal((n, 160)).astype(np.float32))
               for i, (q, n) in enumerate(zip(qtypes, rows))]
    whole = packing.DeviceMatrix.from_qtensors(rt, tensors)
    monkeypatch.setattr(packing, "LOAD_ROWS", 64)
    pieces = packing.DeviceMatrix.from_qtensors(rt, tensors)
    assert (pieces.fmt, pieces.rows, pieces.cols, pieces.group, pieces.nbytes) == \
           (whole.fmt, whole.rows, whole.cols, whole.group, whole.nbytes)
    n = whole.nbytes // 4
    np.testing.assert_array_equal(rt.read(pieces.buf, n, np.uint32), rt.read(whole.buf, n, np.uint32))


@pytest.mark.parametrize("fmt,op,params", [
    ("int4", "linear", {}), ("int4", "swiglu", {}), ("int8", "linear", {}), ("f16", "linear", {}),
    ("int4", "linear", GPU_LIKE), ("int4", "swiglu", {**GPU_LIKE, "gemv_zero_inline": True, "gemv_tpw": 3}),
])
def test_gemv_rows_do_not_depend_on_token_count(rt, fmt, op, params):
    """The GEMV over T tokens gives each token's row bit for bit as the same token alone, and matches
    the oracle (serving's batch invariance)."""
    from perfx.engine.backends.opencl.matmul import DeviceMatrix, Matmul

    N, K, T = 584, 608, 7
    rng = np.random.default_rng(zlib.crc32(f"{fmt} {op} {len(params)}".encode()))
    if fmt == "int4":
        parts, w = rand_int4(rng, N, K, 32)
        dm = DeviceMatrix.from_int4(rt, *parts, 32)
    elif fmt == "int8":
        parts, w = rand_int8(rng, N, K)
        w, dm = w.reshape(N, K), DeviceMatrix.from_q8(rt, *parts)
    else:
        w = f16(rng.standard_normal((N, K)))
        dm = DeviceMatrix.from_f16(rt, w)
    mm = Matmul(rt, params)
    x = rng.standard_normal((T, K))
    cols = N // 2 if op == "swiglu" else N
    together = run(rt, mm, dm, x, cols, op=op, scheme="gemv")
    for t in (0, 3, T - 1):
        alone = run(rt, mm, dm, x[t:t + 1], cols, op=op, scheme="gemv")
        np.testing.assert_array_equal(together[t], alone[0])
    want = oracle(x_for(mm, dm, x, "gemv"), w)
    assert_close(together, silu_mul(want) if op == "swiglu" else want)
